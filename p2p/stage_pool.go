package p2p

import (
	"math/bits"
	"sync"
)

// Buffer pools: a session keeps small buffers between frames and borrows large ones from the
// host's pools for one frame, so idle sessions hold almost nothing.

// keepBytes is the largest buffer a session keeps for itself between frames: a decode step
// of any model fits (one token of a 16384-wide model is 64 KiB in f32), so decoding never
// allocates. Anything larger (a prefill's activations, logits) is lent from the host's pools
// for one frame and given back after it.
const keepBytes = 128 << 10

// poolClasses are the pools' size classes: powers of two from 2*keepBytes to 2 GiB.
const poolClasses = 14

// poolClass is the smallest class that holds b bytes, or -1 if b is past the largest.
func poolClass(b int) int {
	k := bits.Len(uint((b - 1) / (2 * keepBytes)))
	if k >= poolClasses {
		return -1
	}
	return k
}

// heldBytes is the memory a buffer of b bytes takes: its own size when a session keeps it,
// its size class when it is lent.
func heldBytes(b int) int64 {
	if b <= keepBytes {
		return int64(b)
	}
	if k := poolClass(b); k >= 0 {
		return int64(2*keepBytes) << k
	}
	return int64(b)
}

// bufPool lends large buffers to frames. A sync.Pool per size class lets back-to-back
// prefills reuse one buffer without allocating, and drops what stays unused over two
// garbage collections, so a burst's buffers do not outlive it.
type bufPool[T any] struct {
	elem    int // bytes per element
	classes [poolClasses]sync.Pool
}

func (p *bufPool[T]) get(n int) *[]T {
	k := poolClass(n * p.elem)
	if k < 0 {
		b := make([]T, n)
		return &b
	}
	if v, ok := p.classes[k].Get().(*[]T); ok {
		*v = (*v)[:n]
		return v
	}
	b := make([]T, n, (2*keepBytes<<k)/p.elem)
	return &b
}

func (p *bufPool[T]) put(b *[]T) {
	if k := poolClass(cap(*b) * p.elem); k >= 0 && cap(*b)*p.elem == 2*keepBytes<<k {
		p.classes[k].Put(b)
	}
}

// scratch is a buffer reused across frames: the session's own while it stays within
// keepBytes, lent from a pool for one frame when it needs more.
type scratch[T any] struct {
	own  []T
	lent *[]T
}

// get returns n elements of memory, valid until put.
func (s *scratch[T]) get(p *bufPool[T], n int) []T {
	if n*p.elem <= keepBytes {
		if cap(s.own) < n {
			s.own = make([]T, n)
		}
		return s.own[:n]
	}
	if s.lent != nil && cap(*s.lent) < n {
		s.put(p)
	}
	if s.lent == nil {
		s.lent = p.get(n)
	}
	return (*s.lent)[:n]
}

// put gives a lent buffer back.
func (s *scratch[T]) put(p *bufPool[T]) {
	if s.lent != nil {
		p.put(s.lent)
		s.lent = nil
	}
}
