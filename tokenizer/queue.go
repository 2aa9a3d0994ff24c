package tokenizer

// bigramQueue is the binary heap both merge loops pop their next bigram from, best first by
// the bigram's own order. Hand-rolled and typed: container/heap's boxing and interface calls
// took a third (BPE) to two thirds (SentencePiece) of the encoding time.
type bigramQueue[T interface{ before(T) bool }] []T

func (q *bigramQueue[T]) push(b T) {
	*q = append(*q, b)
	h := *q
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if !h[i].before(h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (q *bigramQueue[T]) pop() T {
	h := *q
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h = h[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(h) && h[l].before(h[m]) {
			m = l
		}
		if r < len(h) && h[r].before(h[m]) {
			m = r
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	*q = h
	return top
}
