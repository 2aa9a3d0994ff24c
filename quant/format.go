package quant

import (
	"fmt"
	"slices"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"
	ggml "github.com/ollama/ollama/ml/backend/ggml"
)

// Format is a weight storage format: the GGUF tensor type and the file type that names a
// model made mostly of it.
type Format struct {
	Name   string
	Tensor fsggml.TensorType
	File   fsggml.FileType
}

// File type numbers from GGUF's llama_ftype; the engine leaves some of them unexported.
var formats = []Format{
	{"f32", fsggml.TensorTypeF32, fsggml.FileTypeF32},
	{"f16", fsggml.TensorTypeF16, fsggml.FileTypeF16},
	{"bf16", fsggml.TensorTypeBF16, fsggml.FileTypeBF16},
	{"q8_0", fsggml.TensorTypeQ8_0, fsggml.FileTypeQ8_0},
	{"q4_0", fsggml.TensorTypeQ4_0, fsggml.FileType(2)},
	{"q4_1", fsggml.TensorTypeQ4_1, fsggml.FileType(3)},
	{"q5_0", fsggml.TensorTypeQ5_0, fsggml.FileType(8)},
	{"q5_1", fsggml.TensorTypeQ5_1, fsggml.FileType(9)},
	{"q2_k", fsggml.TensorTypeQ2_K, fsggml.FileType(10)},
	{"q3_k", fsggml.TensorTypeQ3_K, fsggml.FileType(12)},
	{"q4_k", fsggml.TensorTypeQ4_K, fsggml.FileTypeQ4_K_M},
	{"q5_k", fsggml.TensorTypeQ5_K, fsggml.FileType(17)},
	{"q6_k", fsggml.TensorTypeQ6_K, fsggml.FileType(18)},
	{"mxfp4", fsggml.TensorTypeMXFP4, fsggml.FileType(4)}, // gpt-oss's experts; the engine names file type 4 MXFP4
}

// Formats lists the names ParseFormat accepts.
func Formats() []string {
	names := make([]string, len(formats))
	for i, f := range formats {
		names[i] = f.Name
	}
	return names
}

// ParseFormat parses a format name such as "q4_0" (case-insensitive; "q4_k_m" means q4_k).
func ParseFormat(s string) (Format, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "_m"), "_s")
	i := slices.IndexFunc(formats, func(f Format) bool { return f.Name == s })
	if i < 0 {
		return Format{}, fmt.Errorf("unknown weight format %q (known: %s)", s, strings.Join(Formats(), ", "))
	}
	return formats[i], nil
}

// FormatOf names the format of a tensor type.
func FormatOf(t fsggml.TensorType) (Format, bool) {
	i := slices.IndexFunc(formats, func(f Format) bool { return f.Tensor == t })
	if i < 0 {
		return Format{}, false
	}
	return formats[i], true
}

// Fits reports whether rows of ncols values can be stored in the format: quantized formats
// pack whole blocks (32 or 256 values).
func (f Format) Fits(ncols uint64) bool { return ncols%f.Tensor.BlockSize() == 0 }

// RowBytes is the size of one row of ncols values.
func (f Format) RowBytes(ncols uint64) uint64 { return f.Tensor.RowSize(ncols) }

// Encode stores rows of ncols float32 values in the format with ggml's own quantizer.
func (f Format) Encode(src []float32, ncols uint64) ([]byte, error) {
	if ncols == 0 || uint64(len(src))%ncols != 0 {
		return nil, fmt.Errorf("encode %s: %d values are not whole rows of %d", f.Name, len(src), ncols)
	}
	if !f.Fits(ncols) {
		return nil, fmt.Errorf("encode %s: rows of %d values do not fill blocks of %d", f.Name, ncols, f.Tensor.BlockSize())
	}
	if f.Tensor == fsggml.TensorTypeF32 {
		return f32Bytes(src), nil
	}
	return ggml.Quantize(f.Tensor, src, []uint64{ncols, uint64(len(src)) / ncols}), nil
}

// Decode expands n values stored in tensor type t to float32.
func Decode(t fsggml.TensorType, data []byte, n uint64) ([]float32, error) {
	if n == 0 {
		return nil, nil
	}
	if want := t.RowSize(n); uint64(len(data)) != want {
		return nil, fmt.Errorf("decode %s: %d bytes for %d values, want %d", t, len(data), n, want)
	}
	if t == fsggml.TensorTypeF32 {
		return f32Floats(data), nil
	}
	if _, ok := FormatOf(t); !ok {
		return nil, fmt.Errorf("decode: unsupported tensor type %s", t)
	}
	return ggml.ConvertToF32(data, uint32(t), n), nil
}
