// Package quant holds Strata's number formats: the weight quantization formats a model file
// is stored in (and requantized between), and, through package quant/codec, the codecs that
// compress activations for the wire between pipeline stages.
package quant

import "github.com/strata-llm/strata/quant/codec"

// The activation codecs live in quant/codec, which does not link ggml (so the wire decoders
// can be fuzzed without an instrumented ggml build); these names keep quant's API.

// Codec is how a stage encodes the hidden-state activations it sends to the next stage.
type Codec = codec.Codec

const (
	CodecF32 = codec.CodecF32 // exact, 4 bytes per value
	CodecF16 = codec.CodecF16 // IEEE binary16, 2 bytes per value
	CodecQ8  = codec.CodecQ8  // blocks of Q8Block int8s and a float32 scale
)

// Q8Block is the number of values that share one scale in CodecQ8.
const Q8Block = codec.Q8Block

var (
	// ErrCodec is wrapped by every error for a bad codec or bad encoded data.
	ErrCodec = codec.ErrCodec
	// ErrNonFinite is wrapped by CheckFinite's errors.
	ErrNonFinite = codec.ErrNonFinite
)

// Codecs lists the codec names ParseCodec accepts.
func Codecs() []string { return codec.Codecs() }

// ParseCodec reads a codec name: f32, f16 or q8.
func ParseCodec(s string) (Codec, error) { return codec.ParseCodec(s) }

// EncodedSize is the number of bytes n values take in codec c.
func EncodedSize(c Codec, n int) (int, error) { return codec.EncodedSize(c, n) }

// DecodedLen is the number of values size bytes of codec c decode to.
func DecodedLen(c Codec, size int) (int, error) { return codec.DecodedLen(c, size) }

// CheckFinite returns an error wrapping ErrNonFinite if v holds a NaN or an infinity.
func CheckFinite(v []float32) error { return codec.CheckFinite(v) }
