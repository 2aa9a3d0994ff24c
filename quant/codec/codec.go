// Package codec holds the codecs that compress activations for the wire between pipeline
// stages. It is pure Go, apart from the weight formats in package quant (which link ggml),
// so that the frame decoders that use it can be fuzzed without building ggml.
package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unsafe"
)

// Codec is how a stage encodes the hidden-state activations it sends to the next stage.
// The zero value is not a codec, so a frame that forgot to say is caught instead of being
// read as f32.
type Codec uint8

const (
	// CodecF32 sends raw IEEE-754 binary32, little-endian: exact, 4 bytes per value.
	CodecF32 Codec = 1
	// CodecF16 sends IEEE-754 binary16 (round to nearest even): 2 bytes per value, relative
	// error under 2^-11 for values in the half range (about 6e-5 to 65504).
	CodecF16 Codec = 2
	// CodecQ8 sends blocks of Q8Block values as one float32 scale (the block's absmax/127)
	// and Q8Block int8s: 1.0625 bytes per value, error at most absmax/254 per block.
	CodecQ8 Codec = 3
)

// Q8Block is the number of values that share one scale in CodecQ8. A hidden size that is a
// multiple of it (every model's is) keeps blocks inside one token.
const Q8Block = 64

// q8BlockBytes is a full block on the wire: the float32 scale, then the int8s.
const q8BlockBytes = 4 + Q8Block

// ErrCodec is wrapped by every error this file returns for a bad codec or bad encoded data.
var ErrCodec = errors.New("activation codec")

// Codecs lists the codec names ParseCodec accepts.
func Codecs() []string { return []string{"f32", "f16", "q8"} }

// String returns the codec's name, as ParseCodec reads it.
func (c Codec) String() string {
	switch c {
	case CodecF32:
		return "f32"
	case CodecF16:
		return "f16"
	case CodecQ8:
		return "q8"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Valid reports whether c is a known codec.
func (c Codec) Valid() bool { return c >= CodecF32 && c <= CodecQ8 }

// ParseCodec reads a codec name ("f32", "f16" or "q8").
func ParseCodec(s string) (Codec, error) {
	switch s {
	case "f32":
		return CodecF32, nil
	case "f16":
		return CodecF16, nil
	case "q8":
		return CodecQ8, nil
	}
	return 0, fmt.Errorf("%w: unknown codec %q (want one of f32, f16, q8)", ErrCodec, s)
}

// MarshalText makes codecs readable in JSON and flags.
func (c Codec) MarshalText() ([]byte, error) {
	if !c.Valid() {
		return nil, fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
	}
	return []byte(c.String()), nil
}

// UnmarshalText is ParseCodec for encoding.TextUnmarshaler.
func (c *Codec) UnmarshalText(b []byte) error {
	v, err := ParseCodec(string(b))
	if err != nil {
		return err
	}
	*c = v
	return nil
}

// EncodedSize is the number of bytes n values take in codec c. It fails only for an unknown
// codec or a negative n.
func EncodedSize(c Codec, n int) (int, error) {
	if n < 0 {
		return 0, fmt.Errorf("%w: negative value count %d", ErrCodec, n)
	}
	switch c {
	case CodecF32:
		return 4 * n, nil
	case CodecF16:
		return 2 * n, nil
	case CodecQ8:
		return n + 4*((n+Q8Block-1)/Q8Block), nil
	}
	return 0, fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
}

// DecodedLen is the number of values that size bytes of codec c hold, or an error when no
// count encodes to exactly size bytes.
func DecodedLen(c Codec, size int) (int, error) {
	if size < 0 {
		return 0, fmt.Errorf("%w: negative size %d", ErrCodec, size)
	}
	switch c {
	case CodecF32:
		if size%4 != 0 {
			return 0, fmt.Errorf("%w: f32 data of %d bytes is not a multiple of 4", ErrCodec, size)
		}
		return size / 4, nil
	case CodecF16:
		if size%2 != 0 {
			return 0, fmt.Errorf("%w: f16 data of %d bytes is not a multiple of 2", ErrCodec, size)
		}
		return size / 2, nil
	case CodecQ8:
		full, rest := size/q8BlockBytes, size%q8BlockBytes
		if rest == 0 {
			return full * Q8Block, nil
		}
		if rest <= 4 {
			return 0, fmt.Errorf("%w: q8 data of %d bytes ends in a block with no values", ErrCodec, size)
		}
		return full*Q8Block + rest - 4, nil
	}
	return 0, fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
}

// Append encodes src in codec c and appends it to dst, growing dst at most once; with enough
// capacity in dst it does not allocate. Non-finite values are carried as they are by f32 and
// f16 (f16 turns values beyond ±65504 into ±Inf); in q8 a NaN or Inf makes its whole block
// decode as NaN, so CheckFinite on the far side still catches it.
func (c Codec) Append(dst []byte, src []float32) ([]byte, error) {
	size, err := EncodedSize(c, len(src))
	if err != nil {
		return dst, err
	}
	start := len(dst)
	dst = grow(dst, size)
	out := dst[start : start+size]
	switch c {
	case CodecF32:
		encodeF32(out, src)
	case CodecF16:
		encodeF16(out, src)
	case CodecQ8:
		encodeQ8(out, src)
	}
	return dst, nil
}

// Decode decodes src, which must hold exactly len(dst) values in codec c, into dst. It
// allocates nothing. NaN and Inf decode as they are: call CheckFinite where they matter.
func (c Codec) Decode(dst []float32, src []byte) error {
	size, err := EncodedSize(c, len(dst))
	if err != nil {
		return err
	}
	if len(src) != size {
		return fmt.Errorf("%w: %d values of %s take %d bytes, got %d", ErrCodec, len(dst), c, size, len(src))
	}
	switch c {
	case CodecF32:
		decodeF32(dst, src)
	case CodecF16:
		decodeF16(dst, src)
	case CodecQ8:
		decodeQ8(dst, src)
	}
	return nil
}

// CheckFinite returns an error naming the first NaN or Inf in v, or nil.
func CheckFinite(v []float32) error {
	for i, f := range v {
		if math.Float32bits(f)&0x7f800000 == 0x7f800000 {
			return fmt.Errorf("%w: value %d of %d is %v", ErrNonFinite, i, len(v), f)
		}
	}
	return nil
}

// ErrNonFinite is returned by CheckFinite.
var ErrNonFinite = errors.New("non-finite activation")

func grow(b []byte, n int) []byte {
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), len(b)+n)
		copy(nb, b)
		b = nb
	}
	return b[:len(b)+n]
}

// hostLittleEndian is decided once from the memory layout; it is a constant in all but name.
var hostLittleEndian = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()

func encodeF32(out []byte, src []float32) {
	if hostLittleEndian && len(src) > 0 {
		// The wire format is the host's own layout: one memmove instead of a loop.
		copy(out, unsafe.Slice((*byte)(unsafe.Pointer(&src[0])), 4*len(src)))
		return
	}
	for i, f := range src {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(f))
	}
}

func decodeF32(dst []float32, src []byte) {
	if hostLittleEndian && len(dst) > 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&dst[0])), 4*len(dst)), src)
		return
	}
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
}

func encodeF16(out []byte, src []float32) {
	out = out[:2*len(src)]
	for i, f := range src {
		binary.LittleEndian.PutUint16(out[2*i:], halfFromFloat(f))
	}
}

func decodeF16(dst []float32, src []byte) {
	src = src[:2*len(dst)]
	for i := range dst {
		dst[i] = floatFromHalf(binary.LittleEndian.Uint16(src[2*i:]))
	}
}

// halfFromFloat converts to binary16 with round to nearest even, after F. Giesen's
// float_to_half_fast3_rtne: exact for every float32 (checked against x448/float16 in tests).
func halfFromFloat(f float32) uint16 {
	const (
		f16Inf      = 0x7c00
		f16QNaN     = 0x7e00
		f32Inf      = 0x7f800000
		overflow    = (127 + 16) << 23                   // 2^16: at or above it is Inf (or NaN)
		normalMin   = (127 - 14) << 23                   // 2^-14: the smallest normal half
		denormMagic = ((127 - 15) + (23 - 10) + 1) << 23 // 0.5: adding it rounds to a half subnormal
		rebias      = (127 - 15) << 23                   // float32 exponent bias minus half's
	)
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	b &= 0x7fffffff
	switch {
	case b >= overflow:
		if b > f32Inf {
			return sign | f16QNaN
		}
		return sign | f16Inf
	case b < normalMin:
		// The FPU's own round to nearest even does the work: the sum's low mantissa bits
		// are the half subnormal.
		v := math.Float32frombits(b) + math.Float32frombits(denormMagic)
		return sign | uint16(math.Float32bits(v)-denormMagic)
	default:
		odd := (b >> 13) & 1
		b = b - rebias + 0xfff + odd
		return sign | uint16(b>>13)
	}
}

// floatFromHalf widens binary16 to float32, exactly (Giesen's half_to_float: one rebias, and
// a float subtraction to normalize subnormals).
func floatFromHalf(h uint16) float32 {
	const shiftedExp = 0x7c00 << 13 // a half's exponent field, moved to float32's position
	o := uint32(h&0x7fff) << 13
	exp := o & shiftedExp
	o += (127 - 15) << 23
	switch exp {
	case shiftedExp: // Inf, NaN (payload kept)
		o += (128 - 16) << 23
	case 0: // zero and subnormals
		o += 1 << 23
		o = math.Float32bits(math.Float32frombits(o) - 0x1p-14)
	}
	return math.Float32frombits(o | uint32(h&0x8000)<<16)
}

func encodeQ8(out []byte, src []float32) {
	for len(src) > 0 {
		n := min(len(src), Q8Block)
		blk := src[:n]
		// For non-negative floats the bit patterns order like the values, and NaN and Inf sort
		// above every finite value: one integer max finds absmax and spots non-finite values.
		var maxBits uint32
		for _, f := range blk {
			maxBits = max(maxBits, math.Float32bits(f)&0x7fffffff)
		}
		q := out[4 : 4+n]
		switch {
		case maxBits >= 0x7f800000:
			binary.LittleEndian.PutUint32(out, 0x7fc00000) // NaN scale: the block decodes to NaN
			clear(q)
		case maxBits == 0:
			binary.LittleEndian.PutUint32(out, 0)
			clear(q)
		default:
			absmax := math.Float32frombits(maxBits)
			inv := 127 / absmax
			binary.LittleEndian.PutUint32(out, math.Float32bits(absmax/127))
			for i, f := range blk {
				v := f * inv
				// Round half away from zero: add ±0.5 (the sign of v) and truncate.
				half := math.Float32frombits(0x3f000000 | math.Float32bits(v)&0x80000000)
				q[i] = byte(int8(max(-127, min(127, int32(v+half)))))
			}
		}
		out = out[4+n:]
		src = src[n:]
	}
}

func decodeQ8(dst []float32, src []byte) {
	for len(dst) > 0 {
		n := min(len(dst), Q8Block)
		scale := math.Float32frombits(binary.LittleEndian.Uint32(src))
		q := src[4 : 4+n]
		blk := dst[:n]
		for i := range blk {
			blk[i] = float32(int8(q[i])) * scale
		}
		dst = dst[n:]
		src = src[4+n:]
	}
}
