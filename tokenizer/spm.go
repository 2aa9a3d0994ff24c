package tokenizer

import "strings"

// symbol is a piece of a word during merging, linked to its neighbours.
type symbol struct {
	start, n   int // bytes of the text
	prev, next int
	id         int32 // BPE: the symbol id of the text
}

// spmBigram is a candidate merge of two neighbouring symbols into a token.
type spmBigram struct {
	left, right int
	score       float32
	size        int
}

// spmQueue pops the best merge first: the highest score, then the leftmost, as llama.cpp's
// llm_bigram_spm::comparator orders them.
type spmQueue = bigramQueue[spmBigram]

func (x spmBigram) before(y spmBigram) bool {
	return x.score > y.score || (x.score == y.score && x.left < y.left)
}

const spmSpace = "\u2581" // ▁, SentencePiece's space

// spmWords reports whether no token holds a ▁ right after another character than ▁: then no
// merge crosses the start of a run of ▁, and the text can be merged word by word with the
// same result as whole (merges in different words never touch the same symbols, and their
// order within a word is the same) but with a far smaller queue.
func spmWords(tokens []string) bool {
	for _, s := range tokens {
		for i := 1; i < len(s); i++ {
			if strings.HasPrefix(s[i:], spmSpace) && !strings.HasSuffix(s[:i], spmSpace) {
				return false
			}
		}
	}
	return true
}

// spm tokenizes an escaped text, word by word where the vocabulary allows it.
func (e *encoder) spm(text string) error {
	if !e.t.spmWords {
		return e.spmMerge(text)
	}
	word := func(w string) error {
		if span, ok := e.words[w]; ok { // a word always merges the same way
			e.out = append(e.out, e.out[span[0]:span[1]]...)
			return nil
		}
		from := len(e.out)
		if err := e.spmMerge(w); err != nil {
			return err
		}
		e.remember(w, from)
		return nil
	}
	start := 0
	for i := 1; i < len(text); i++ {
		if strings.HasPrefix(text[i:], spmSpace) && !strings.HasSuffix(text[:i], spmSpace) {
			if err := word(text[start:i]); err != nil {
				return err
			}
			start = i
		}
	}
	return word(text[start:])
}

// spmMerge is llama.cpp's llm_tokenizer_spm_session: start from characters, merge the pair whose
// token scores highest until none is left, and spell what did not become a token in bytes.
func (e *encoder) spmMerge(text string) error {
	t := e.t
	syms := make([]symbol, 0, len(text))
	for off := 0; off < len(text); {
		n := min(utf8Len(text[off]), len(text)-off)
		syms = append(syms, symbol{start: off, n: n, prev: len(syms) - 1, next: len(syms) + 1})
		off += n
	}
	if len(syms) == 0 {
		return nil
	}
	if err := e.check(len(text)); err != nil {
		return err
	}
	syms[len(syms)-1].next = -1
	q := make(spmQueue, 0, len(syms))
	try := func(l, r int) {
		if l < 0 || r < 0 {
			return
		}
		s := text[syms[l].start : syms[l].start+syms[l].n+syms[r].n]
		id, ok := t.ids[s]
		if !ok {
			return
		}
		var score float32
		if t.v.Scores != nil {
			score = t.v.Scores[id]
		}
		q.push(spmBigram{left: l, right: r, score: score, size: len(s)})
	}
	for i := 1; i < len(syms); i++ {
		try(i-1, i)
	}
	for len(q) > 0 {
		b := q.pop()
		l, r := &syms[b.left], &syms[b.right]
		if l.n == 0 || r.n == 0 || l.n+r.n != b.size {
			continue
		}
		l.n += r.n
		r.n = 0
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = b.left
		}
		try(l.prev, b.left)
		try(b.left, l.next)
	}
	for i := 0; i != -1; i = syms[i].next {
		s := text[syms[i].start : syms[i].start+syms[i].n]
		if id, ok := t.ids[s]; ok {
			e.out = append(e.out, id)
			continue
		}
		for j := 0; j < len(s); j++ {
			e.out = append(e.out, t.spmByte(s[j]))
		}
	}
	return nil
}

// spmByte is the token of a byte that no token spells: <0xXX>, else the byte itself, else
// the unknown token.
func (t *Tokenizer) spmByte(b byte) int32 {
	const hex = "0123456789ABCDEF"
	if id, ok := t.ids[string([]byte{'<', '0', 'x', hex[b>>4], hex[b&15], '>'})]; ok {
		return id
	}
	if id, ok := t.ids[string([]byte{b})]; ok {
		return id
	}
	return t.v.UNK
}
