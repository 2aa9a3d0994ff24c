package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// GGUF value types.
const (
	typeUint8 = iota
	typeInt8
	typeUint16
	typeInt16
	typeUint32
	typeInt32
	typeFloat32
	typeBool
	typeString
	typeArray
	typeUint64
	typeInt64
	typeFloat64
)

// maxDims is more dimensions than any tensor has (ggml stops at 4).
const maxDims = 8

// checkLengths walks a GGUF's metadata and tensor table and refuses any count or length that
// the bytes left in the file cannot hold. fs/ggml allocates whatever a length says before it
// reads, so a corrupt or hostile file claiming a 80 GB string kills the process with an
// out-of-memory error that no recover() catches; this walk reads only small fixed fields.
func checkLengths(r io.ReadSeeker) error {
	size, err := r.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		return err
	}
	c := &checker{r: bufio.NewReaderSize(r, 1<<16), left: size}
	magic, err := c.bytes(4)
	if err != nil {
		return err
	}
	switch string(magic) {
	case "GGUF":
		c.order = binary.LittleEndian
	case "FUGG":
		c.order = binary.BigEndian
	default:
		return nil // not GGUF: fs/ggml says so itself
	}
	version, err := c.u32()
	if err != nil {
		return err
	}
	var tensors, kvs uint64
	if version == 1 {
		a, err1 := c.u32()
		b, err2 := c.u32()
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		tensors, kvs = uint64(a), uint64(b)
	} else {
		a, err1 := c.u64()
		b, err2 := c.u64()
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		tensors, kvs = a, b
	}
	// Every key-value takes at least 8+1+4+1 bytes, every tensor entry 8+1+4+8+4+8.
	if err := c.fits(kvs, 14, "key-value count"); err != nil {
		return err
	}
	if err := c.fits(tensors, 33, "tensor count"); err != nil {
		return err
	}
	for range kvs {
		if err := c.skipString("key"); err != nil {
			return err
		}
		t, err := c.u32()
		if err != nil {
			return err
		}
		if err := c.skipValue(t, 0); err != nil {
			return err
		}
	}
	for range tensors {
		if err := c.skipString("tensor name"); err != nil {
			return err
		}
		dims, err := c.u32()
		if err != nil {
			return err
		}
		if dims > maxDims {
			return fmt.Errorf("corrupt GGUF: a tensor with %d dimensions", dims)
		}
		if err := c.skip(uint64(dims)*8 + 4 + 8); err != nil {
			return err
		}
	}
	return nil
}

type checker struct {
	r     *bufio.Reader
	order binary.ByteOrder
	left  int64
	buf   [8]byte
}

func (c *checker) bytes(n int) ([]byte, error) {
	if int64(n) > c.left {
		return nil, fmt.Errorf("truncated GGUF: %w", io.ErrUnexpectedEOF)
	}
	if _, err := io.ReadFull(c.r, c.buf[:n]); err != nil {
		return nil, fmt.Errorf("truncated GGUF: %w", err)
	}
	c.left -= int64(n)
	return c.buf[:n], nil
}

func (c *checker) u32() (uint32, error) {
	b, err := c.bytes(4)
	if err != nil {
		return 0, err
	}
	return c.order.Uint32(b), nil
}

func (c *checker) u64() (uint64, error) {
	b, err := c.bytes(8)
	if err != nil {
		return 0, err
	}
	return c.order.Uint64(b), nil
}

// fits refuses n items of at least each bytes when the file has less left than that.
func (c *checker) fits(n, each uint64, what string) error {
	if n > uint64(c.left)/each {
		return fmt.Errorf("truncated or corrupt GGUF: %s %d does not fit in the %d bytes left", what, n, c.left)
	}
	return nil
}

func (c *checker) skip(n uint64) error {
	if n > uint64(c.left) {
		return fmt.Errorf("truncated GGUF: %d bytes claimed, %d left", n, c.left)
	}
	if _, err := c.r.Discard(int(n)); err != nil {
		return fmt.Errorf("truncated GGUF: %w", err)
	}
	c.left -= int64(n)
	return nil
}

func (c *checker) skipString(what string) error {
	n, err := c.u64()
	if err != nil {
		return err
	}
	if n > uint64(c.left) {
		return fmt.Errorf("truncated or corrupt GGUF: a %s of %d bytes with %d left in the file", what, n, c.left)
	}
	return c.skip(n)
}

func (c *checker) skipValue(t uint32, depth int) error {
	switch t {
	case typeUint8, typeInt8, typeBool:
		return c.skip(1)
	case typeUint16, typeInt16:
		return c.skip(2)
	case typeUint32, typeInt32, typeFloat32:
		return c.skip(4)
	case typeUint64, typeInt64, typeFloat64:
		return c.skip(8)
	case typeString:
		return c.skipString("string value")
	case typeArray:
		if depth > 2 {
			return errors.New("corrupt GGUF: arrays nested too deep")
		}
		et, err := c.u32()
		if err != nil {
			return err
		}
		n, err := c.u64()
		if err != nil {
			return err
		}
		each := minSize(et)
		if each == 0 {
			return fmt.Errorf("corrupt GGUF: array of unknown type %d", et)
		}
		if err := c.fits(n, each, "array length"); err != nil {
			return err
		}
		if et != typeString && et != typeArray {
			return c.skip(n * each)
		}
		for range n {
			if err := c.skipValue(et, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("corrupt GGUF: value of unknown type %d", t)
}

// minSize is the fewest bytes a value of type t takes: a string at least its 8-byte length, an
// array its 12-byte header; 0 for an unknown type.
func minSize(t uint32) uint64 {
	switch t {
	case typeUint8, typeInt8, typeBool:
		return 1
	case typeUint16, typeInt16:
		return 2
	case typeUint32, typeInt32, typeFloat32:
		return 4
	case typeUint64, typeInt64, typeFloat64, typeString:
		return 8
	case typeArray:
		return 12
	}
	return 0
}
