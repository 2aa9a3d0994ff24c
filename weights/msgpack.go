package weights

import "fmt"

// reader decodes the few msgpack forms a manifest uses, straight from a byte slice. msgpack
// v5's Decoder allocates whatever length a header claims; here no length passes unchecked
// against the bytes left. The first error sticks and later calls return zero values.
type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w at byte %d: %s", ErrBadManifest, r.off, fmt.Sprintf(format, args...))
	}
}

func (r *reader) left() int { return len(r.b) - r.off }

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > r.left() {
		r.fail("%d bytes claimed, %d left", n, r.left())
		return nil
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s
}

func (r *reader) code() byte {
	s := r.take(1)
	if s == nil {
		return 0
	}
	return s[0]
}

// be reads an n-byte big-endian unsigned integer (n = 1, 2, 4 or 8).
func (r *reader) be(n int) uint64 {
	s := r.take(n)
	if s == nil {
		return 0
	}
	var v uint64
	for _, c := range s {
		v = v<<8 | uint64(c)
	}
	return v
}

func (r *reader) uint() uint64 {
	c := r.code()
	switch {
	case r.err != nil:
		return 0
	case c <= 0x7f:
		return uint64(c)
	case c == 0xcc:
		return r.be(1)
	case c == 0xcd:
		return r.be(2)
	case c == 0xce:
		return r.be(4)
	case c == 0xcf:
		v := r.be(8)
		if v > 1<<62 {
			r.fail("integer %d out of range", v)
		}
		return v
	}
	r.fail("want an unsigned integer, got code %#x", c)
	return 0
}

func (r *reader) array() int {
	c := r.code()
	var n uint64
	switch {
	case r.err != nil:
		return 0
	case c&0xf0 == 0x90:
		n = uint64(c & 0x0f)
	case c == 0xdc:
		n = r.be(2)
	case c == 0xdd:
		n = r.be(4)
	default:
		r.fail("want an array, got code %#x", c)
		return 0
	}
	if n > uint64(r.left()) { // every item takes at least a byte
		r.fail("array of %d items with %d bytes left", n, r.left())
		return 0
	}
	return int(n)
}

func (r *reader) str(limit int) []byte {
	c := r.code()
	var n uint64
	switch {
	case r.err != nil:
		return nil
	case c&0xe0 == 0xa0:
		n = uint64(c & 0x1f)
	case c == 0xd9:
		n = r.be(1)
	case c == 0xda:
		n = r.be(2)
	case c == 0xdb:
		n = r.be(4)
	default:
		r.fail("want a string, got code %#x", c)
		return nil
	}
	if n > uint64(limit) {
		r.fail("string of %d bytes, limit %d", n, limit)
		return nil
	}
	return r.take(int(n))
}

func (r *reader) bin(limit int) []byte {
	c := r.code()
	var n uint64
	switch {
	case r.err != nil:
		return nil
	case c == 0xc4:
		n = r.be(1)
	case c == 0xc5:
		n = r.be(2)
	case c == 0xc6:
		n = r.be(4)
	default:
		r.fail("want bytes, got code %#x", c)
		return nil
	}
	if n > uint64(limit) {
		r.fail("%d bytes, limit %d", n, limit)
		return nil
	}
	return r.take(int(n))
}
