package pipeline

import (
	"errors"
	"fmt"
	"sync"

	"github.com/strata-llm/strata/pipeline/grammar"
	"github.com/strata-llm/strata/shard"
)

// Where a grammar's mask is applied. The last stage samples, but under a grammar the entry
// node does: it asks the last stage for the step's logits (StepInput.WantLogits, which every
// chain already supports), masks them and samples with the same Sampler and the same
// (seed, position), so an unconstrained token is the one the last stage would have drawn.
// This keeps the grammar, its per-generation state and its mask cache in the one place
// that already holds the session's tokens and replays them after a failure, and needs no
// change to the stage protocol: no stage has to compile schemas or know the token bytes,
// and a replay (which samples nothing) costs nothing extra. The price is the logits
// travelling back along the chain, 4 bytes per vocabulary entry per token (512 KB for a
// 128k vocabulary), only for constrained requests. Sending the mask forward instead
// (16 KB as a bitset) would be the next step if that traffic ever matters.

// grammarCache holds the grammar view of the model's vocabulary (its trie, built on first
// use) and the constraints of recent grammars, so that requests with the same schema share
// their mask caches.
type grammarCache struct {
	once  sync.Once
	vocab *grammar.Vocab
	err   error

	mu   sync.Mutex
	byKy map[string]*grammar.Constraint
}

// grammarCacheMax bounds the constraints kept (each caches at most a few MB of masks).
const grammarCacheMax = 16

func (c *grammarCache) matcher(tok *shard.Tokenizer, g *grammar.Grammar) (*grammar.Matcher, error) {
	c.once.Do(func() { c.vocab, c.err = grammar.VocabFromTokenizer(tok) })
	if c.err != nil {
		return nil, c.err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	k := g.Key()
	con := c.byKy[k]
	if con == nil {
		if c.byKy == nil || len(c.byKy) >= grammarCacheMax {
			c.byKy = map[string]*grammar.Constraint{}
		}
		con = grammar.NewConstraint(g, c.vocab)
		c.byKy[k] = con
	}
	return con.Matcher(), nil
}

// ErrGrammar means the grammar left no token to take: the model's vocabulary cannot spell
// what the grammar requires next.
var ErrGrammar = errors.New("grammar allows no token")

// pick returns the step's token: the last stage's sample, or, under a grammar, one sampled
// here from the step's logits with every token the grammar forbids masked out.
//
// Under a grammar the step carries no logprobs: the API refuses logprobs with a grammar.
func (s *run) pick(res StepResult, pos int) (StepResult, error) {
	if s.matcher == nil {
		return res, nil
	}
	if len(res.Logits) == 0 {
		return StepResult{}, errors.New("constrained step: the chain returned no logits")
	}
	if err := s.matcher.Apply(res.Logits, s.left); err != nil {
		return StepResult{}, err
	}
	tok, _ := s.sampler.Sample(res.Logits, s.sampling, s.recent(pos+1), int32(pos))
	if tok < 0 {
		return StepResult{}, fmt.Errorf("%w after %d completion tokens", ErrGrammar, len(s.tokens)-pos-1)
	}
	if err := s.matcher.Accept(tok); err != nil {
		return StepResult{}, fmt.Errorf("constrained step: %w", err)
	}
	return StepResult{Token: tok}, nil
}
