package tokenizer

import "unicode/utf8"

// bpeBigram is a candidate merge of two neighbouring symbols.
type bpeBigram struct {
	left, right int
	lid, rid    int32 // the symbols' ids when queued; a merge since makes the bigram stale
	rank        int32
	result      int32
}

// bpeQueue pops the lowest rank first, then the leftmost, as llama.cpp's llm_bigram_bpe
// comparator orders them (this is where "!!!!!!" differs from the engine's order). It is a
// hand-rolled binary heap: container/heap's interface calls cost a third of the time here.
type bpeQueue = bigramQueue[bpeBigram]

func (x bpeBigram) before(y bpeBigram) bool {
	return x.rank < y.rank || (x.rank == y.rank && x.left < y.left)
}

// bpe is llama.cpp's llm_tokenizer_bpe_session on one raw fragment: pre-tokenize into words,
// map each word's bytes to GPT-2's alphabet, and merge each word by rank.
func (e *encoder) bpe(text string) error {
	t := e.t
	cpts, widths := decodeCpts(text, make([]rune, 0, len(text)), make([]uint8, 0, len(text)))
	lens := []int{len(cpts)}
	for _, s := range t.split {
		lens = s.split(cpts, lens)
	}
	var (
		syms []symbol
		q    bpeQueue
		buf  []byte
	)
	ci, bi := 0, 0 // codepoint and byte offsets of the current word
	for _, n := range lens {
		nb := 0
		for _, w := range widths[ci : ci+n] {
			nb += int(w)
		}
		word := text[bi : bi+nb]
		ci += n
		bi += nb
		if err := e.check(nb); err != nil {
			return err
		}
		// A word always merges the same way: a long text reuses the ids of words seen before.
		if span, ok := e.words[word]; ok {
			e.out = append(e.out, e.out[span[0]:span[1]]...)
			continue
		}
		from := len(e.out)
		if t.ignore {
			buf = buf[:0]
			for i := 0; i < len(word); i++ {
				buf = append(buf, byteToPiece[word[i]]...)
			}
			if id, ok := t.ids[string(buf)]; ok {
				e.out = append(e.out, id)
				e.remember(word, from)
				continue
			}
		}
		syms = syms[:0]
		for i := 0; i < len(word); i++ {
			syms = append(syms, symbol{prev: i - 1, next: i + 1, id: t.byteSym[word[i]]})
		}
		syms[len(syms)-1].next = -1
		q = q[:0]
		add := func(l, r int) {
			if l < 0 || r < 0 {
				return
			}
			m, ok := t.merges[uint64(uint32(syms[l].id))<<32|uint64(uint32(syms[r].id))]
			if ok {
				q.push(bpeBigram{left: l, right: r, lid: syms[l].id, rid: syms[r].id, rank: m.rank, result: m.result})
			}
		}
		for i := 1; i < len(syms); i++ {
			add(i-1, i)
		}
		for len(q) > 0 {
			b := q.pop()
			l, r := &syms[b.left], &syms[b.right]
			if l.n < 0 || r.n < 0 || l.id != b.lid || r.id != b.rid || l.next != b.right {
				continue
			}
			l.id = b.result
			r.n = -1 // merged away
			l.next = r.next
			if r.next >= 0 {
				syms[r.next].prev = b.left
			}
			add(l.prev, b.left)
			add(b.left, l.next)
		}
		for i := 0; i != -1; i = syms[i].next {
			id := syms[i].id
			if int(id) < len(t.v.Tokens) {
				e.out = append(e.out, id)
				continue
			}
			// Not a token: llama.cpp looks up each byte of the text on its own, and keeps
			// those that are tokens.
			s := t.symString(id)
			for j := 0; j < len(s); j++ {
				if tid, ok := t.ids[s[j:j+1]]; ok {
					e.out = append(e.out, tid)
				}
			}
		}
		e.remember(word, from)
	}
	return nil
}

// remember notes where a word's ids are in the output, for texts long enough to repeat words.
func (e *encoder) remember(word string, from int) {
	if e.words == nil {
		e.words = make(map[string][2]int)
	}
	if len(e.words) < 1<<16 {
		e.words[word] = [2]int{from, len(e.out)}
	}
}

// validUTF8 reports whether s round-trips through the pre-tokenizer unchanged.
func validUTF8(s string) bool { return utf8.ValidString(s) }
