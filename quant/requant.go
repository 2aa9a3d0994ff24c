package quant

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"strings"
	"sync"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
)

// Requantize rewrites the GGUF at in to out with its weight matrices stored in format f. Norms,
// biases and other 1-D tensors stay as they are, and a matrix whose rows do not fill the
// format's blocks falls back to q8_0 or f16, as llama.cpp's quantizer does. progress, if not
// nil, is called with the fraction of tensors done.
func Requantize(ctx context.Context, in, out string, f Format, progress func(float32)) error {
	src, err := os.Open(in)
	if err != nil {
		return fmt.Errorf("requantize: %w", err)
	}
	defer src.Close()
	meta, err := gguf.Decode(src)
	if err != nil {
		return fmt.Errorf("requantize %s: %w", in, err)
	}
	base := meta.Tensors().Offset
	items := meta.Tensors().Items()
	var (
		mu   sync.Mutex
		done int
	)
	tick := func() {
		if progress == nil {
			return
		}
		mu.Lock()
		done++
		p := float32(done) / float32(len(items))
		mu.Unlock()
		progress(p)
	}
	ts := make([]*fsggml.Tensor, 0, len(items))
	for _, t := range items {
		target := targetFormat(t, f)
		sec := io.NewSectionReader(src, int64(base+t.Offset), int64(t.Size()))
		nt := &fsggml.Tensor{Name: t.Name, Kind: uint32(target.Tensor), Shape: t.Shape}
		if fsggml.TensorType(t.Kind) == target.Tensor {
			nt.WriterTo = writerFunc(func(w io.Writer) (int64, error) {
				defer tick()
				return io.Copy(w, sec)
			})
		} else {
			from := fsggml.TensorType(t.Kind)
			nt.WriterTo = writerFunc(func(w io.Writer) (int64, error) {
				defer tick()
				return convertRows(ctx, w, sec, Format{Tensor: from}, target, t.Shape[0], t.Elements())
			})
		}
		ts = append(ts, nt)
	}
	kv := maps.Clone(meta.KV())
	kv["general.file_type"] = f.File
	kv["general.quantization_version"] = uint32(2)
	if err := gguf.WriteAtomic(out, kv, ts); err != nil {
		return fmt.Errorf("requantize: %w", err)
	}
	return nil
}

// targetFormat picks the format of one tensor when the file becomes f.
func targetFormat(t *fsggml.Tensor, f Format) Format {
	cur, known := FormatOf(fsggml.TensorType(t.Kind))
	if !known || len(t.Shape) < 2 || strings.HasSuffix(t.Name, "_norm.weight") || strings.HasSuffix(t.Name, ".bias") {
		if known {
			return cur
		}
		return Format{Tensor: fsggml.TensorType(t.Kind)}
	}
	q8, _ := FormatOf(fsggml.TensorTypeQ8_0)
	f16, _ := FormatOf(fsggml.TensorTypeF16)
	for _, c := range []Format{f, q8, f16} {
		if c.Fits(t.Shape[0]) {
			return c
		}
	}
	f32, _ := FormatOf(fsggml.TensorTypeF32)
	return f32
}

// convertRows re-encodes a tensor in chunks of whole rows so memory stays bounded whatever
// the tensor's size.
func convertRows(ctx context.Context, w io.Writer, r io.Reader, from Format, to Format, ncols, n uint64) (int64, error) {
	const chunkValues = 1 << 22
	rows := max(1, chunkValues/ncols)
	inRow := from.Tensor.RowSize(ncols)
	buf := make([]byte, rows*inRow)
	var written int64
	for left := n / ncols; left > 0; {
		if err := ctx.Err(); err != nil {
			return written, err
		}
		k := min(rows, left)
		b := buf[:k*inRow]
		if _, err := io.ReadFull(r, b); err != nil {
			return written, fmt.Errorf("read tensor data: %w", err)
		}
		vals, err := Decode(from.Tensor, b, k*ncols)
		if err != nil {
			return written, err
		}
		enc, err := to.Encode(vals, ncols)
		if err != nil {
			return written, err
		}
		m, err := w.Write(enc)
		written += int64(m)
		if err != nil {
			return written, err
		}
		left -= k
	}
	return written, nil
}

type writerFunc func(io.Writer) (int64, error)

func (f writerFunc) WriteTo(w io.Writer) (int64, error) { return f(w) }
