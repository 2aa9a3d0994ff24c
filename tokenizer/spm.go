package tokenizer

import "container/heap"

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
type spmQueue []spmBigram

func (q spmQueue) Len() int { return len(q) }
func (q spmQueue) Less(i, j int) bool {
	return q[i].score > q[j].score || (q[i].score == q[j].score && q[i].left < q[j].left)
}
func (q spmQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *spmQueue) Push(x any)   { *q = append(*q, x.(spmBigram)) }
func (q *spmQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// spm is llama.cpp's llm_tokenizer_spm_session: start from characters, merge the pair whose
// token scores highest until none is left, and spell what did not become a token in bytes.
func (e *encoder) spm(text string) error {
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
		heap.Push(&q, spmBigram{left: l, right: r, score: score, size: len(s)})
	}
	for i := 1; i < len(syms); i++ {
		try(i-1, i)
	}
	for q.Len() > 0 {
		b := heap.Pop(&q).(spmBigram)
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
		if err := e.check(1); err != nil {
			return err
		}
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
