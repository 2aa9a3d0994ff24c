package pipeline

import (
	"context"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/ollama/ollama/tokenizer"
)

// ErrPromptTooLarge means a prompt has more bytes than the context could hold even if every
// token were the vocabulary's longest: it is refused before any tokenizing. It is an
// ErrContextLength.
var ErrPromptTooLarge = fmt.Errorf("%w: prompt too large", ErrContextLength)

// promptBounds are what a generator knows of its vocabulary to refuse, without tokenizing, a
// prompt that cannot fit: no token covers more bytes of text than its vocabulary entry has
// (byte-level BPE spells a byte as one or two bytes, SentencePiece a space as three), and each
// occurrence of a special token's text is one token.
type promptBounds struct {
	longest  int      // bytes of the longest vocabulary entry
	specials []string // special token texts, none inside another
	// disjoint: no special's text ends with the start of another's, so occurrences of
	// different specials never overlap and their counts add up.
	disjoint bool
}

func newPromptBounds(v *tokenizer.Vocabulary) promptBounds {
	var b promptBounds
	var sp []string
	for i, s := range v.Values {
		b.longest = max(b.longest, len(s))
		if i < len(v.Types) && (v.Types[i] == tokenizer.TOKEN_TYPE_CONTROL || v.Types[i] == tokenizer.TOKEN_TYPE_USER_DEFINED) && len(s) > 1 {
			sp = append(sp, s)
		}
	}
	// A special inside another would be counted inside the longer one's occurrences too.
	for i, s := range sp {
		inside := false
		for j, o := range sp {
			if i != j && len(o) > len(s) && strings.Contains(o, s) {
				inside = true
				break
			}
		}
		if !inside {
			b.specials = append(b.specials, s)
		}
	}
	b.longest = max(b.longest, 1)
	b.disjoint = true
	for _, x := range b.specials {
		for _, y := range b.specials {
			for k := 1; k < min(len(x), len(y)) && b.disjoint; k++ {
				if x[len(x)-k:] == y[:k] {
					b.disjoint = false
				}
			}
		}
	}
	return b
}

// minTokens is a lower bound on the tokens prompt encodes to.
func (b promptBounds) minTokens(prompt string) int {
	n := (len(prompt) + b.longest - 1) / b.longest
	sum := 0
	for _, s := range b.specials {
		if strings.Contains(prompt, s) {
			c := strings.Count(prompt, s)
			n, sum = max(n, c), sum+c
		}
	}
	if b.disjoint {
		n = max(n, sum)
	}
	return n
}

// encode tokenizes a rendered prompt within the generator's bounds: a prompt that cannot fit
// in the context is refused before any work, tokenizing waits for a free slot, and a caller
// whose ctx ends gets its answer at once (the bounded work already started finishes on its
// own, holding its slot, so abandoned requests still count against the cap).
func (g *Generator) encode(ctx context.Context, prompt string) ([]int32, error) {
	return g.encodeWith(ctx, prompt, false)
}

// encodeWith is encode; truncating, a prompt too long is cut to what may fit instead of
// refused (the caller cuts its tokens to the context).
func (g *Generator) encodeWith(ctx context.Context, prompt string, truncating bool) ([]int32, error) {
	g.boundsOnce.Do(func() { g.bounds = newPromptBounds(g.tok.Vocabulary()) })
	if limit := g.MaxPromptBytes(); len(prompt) > limit {
		if !truncating {
			return nil, fmt.Errorf("%w: the rendered prompt is %d bytes; a context of %d tokens holds at most %d bytes of this model's text",
				ErrPromptTooLarge, len(prompt), g.maxContext, limit)
		}
		for limit > 0 && !utf8.RuneStart(prompt[limit]) {
			limit--
		}
		prompt = prompt[:limit]
	}
	if n := g.bounds.minTokens(prompt); n >= g.maxContext && !truncating {
		return nil, fmt.Errorf("%w: the prompt is at least %d tokens, the context %d, which leaves no room to generate", ErrContextLength, n, g.maxContext)
	}
	select {
	case g.encodeSlots <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	type result struct {
		ids []int32
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer func() { <-g.encodeSlots }()
		ids, err := g.Encode(prompt)
		done <- result{ids, err}
	}()
	select {
	case r := <-done:
		return r.ids, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// MaxPromptBytes is the longest rendered prompt the generator tokenizes: its context times
// the vocabulary's longest entry. Longer prompts cannot fit, whatever their text.
func (g *Generator) MaxPromptBytes() int {
	g.boundsOnce.Do(func() { g.bounds = newPromptBounds(g.tok.Vocabulary()) })
	return g.maxContext * g.bounds.longest
}
