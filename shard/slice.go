package shard

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/internal/progress"
)

// sliceTensor reports whether a tensor of the whole model belongs in the slice file for r.
// Names are kept as they are and block_count stays the model's, so the engine places each
// layer at its true index and leaves the others empty.
func sliceTensor(name string, r Range, layers int, tied bool) bool {
	if l, ok := blockOf(name); ok {
		return r.Contains(l)
	}
	first, last := r.Start == 0, r.End == layers
	switch {
	case strings.HasPrefix(name, "token_embd."):
		return first || (last && tied)
	case strings.HasPrefix(name, "output_norm."), strings.HasPrefix(name, "output."):
		return last
	case strings.HasPrefix(name, "rope_freqs."):
		return true // shared by every layer
	}
	return first // anything else model-wide travels with the embeddings
}

// WriteSlice writes a GGUF at dst holding only the tensors a stage serving r needs, with the
// model's metadata unchanged but for a key naming the model (srcSHA256) it was cut from. It
// reads only those tensors' bytes from src. report, if not nil, gets the fraction written.
func WriteSlice(ctx context.Context, src, srcSHA256 string, r Range, dst string, report func(float32)) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("write slice: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("write slice: %w", err)
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		return fmt.Errorf("write slice of %s: %w", filepath.Base(src), err)
	}
	info, err := modelInfo(src, st.Size(), meta)
	if err != nil {
		return fmt.Errorf("write slice: %w", err)
	}
	if err := r.Validate(info.Layers); err != nil {
		return err
	}

	base := meta.Tensors().Offset
	var (
		keep  []*fsggml.Tensor
		total int64
	)
	for _, t := range meta.Tensors().Items() {
		if !sliceTensor(t.Name, r, info.Layers, info.TiedEmbedding) {
			continue
		}
		total += int64(t.Size())
		keep = append(keep, t)
	}
	done := &progress.Counter{Total: total, Report: report}
	out := make([]*fsggml.Tensor, 0, len(keep))
	for _, t := range keep {
		sec := io.NewSectionReader(f, int64(base+t.Offset), int64(t.Size()))
		out = append(out, &fsggml.Tensor{
			Name:     t.Name,
			Kind:     t.Kind,
			Shape:    t.Shape,
			WriterTo: &copyTensor{ctx: ctx, src: sec, done: done},
		})
	}
	if r.Start == 0 && !slices.ContainsFunc(keep, func(t *fsggml.Tensor) bool { return strings.HasPrefix(t.Name, "output.") }) {
		// ollama's loader takes a file without an output group for a model with tied
		// embeddings and loads token_embd a second time as output.weight: 590 MB for a 70B
		// vocabulary that a first stage never multiplies by. A one-float output tensor,
		// which nothing binds, keeps it from doing so.
		out = append(out, &fsggml.Tensor{Name: absentOutput, Kind: 0, Shape: []uint64{1}, WriterTo: zeros(4)})
	}
	kv := maps.Clone(meta.KV())
	kv[sliceOfKey] = srcSHA256
	return gguf.WriteAtomic(dst, kv, out)
}

// absentOutput names the placeholder tensor of a first stage's slice that has no LM head.
const absentOutput = "output.strata_absent"

type zeros int64

func (z zeros) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(make([]byte, z))
	return int64(n), err
}

type copyTensor struct {
	ctx  context.Context
	src  io.Reader
	done *progress.Counter
}

func (c *copyTensor) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, 1<<20)
	var n int64
	for {
		if err := c.ctx.Err(); err != nil {
			return n, err
		}
		k, err := c.src.Read(buf)
		if k > 0 {
			if _, werr := w.Write(buf[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
			c.done.Add(int64(k))
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// SliceCache keeps slice files in a directory, keyed by the model's sha256 and the range, so a
// node that serves the same layers again starts without cutting the model anew.
type SliceCache struct {
	Dir string
}

// Path is where the slice of the model with the given digest for r lives.
func (c SliceCache) Path(modelSHA256 string, r Range) string {
	// v2: first-stage slices carry the absentOutput placeholder; v1 files are cut anew.
	return filepath.Join(c.Dir, fmt.Sprintf("%s-%d-%d.v2.gguf", modelSHA256[:min(16, len(modelSHA256))], r.Start, r.End))
}

// Ensure returns the path of the slice of model for r, writing it if it is not cached.
func (c SliceCache) Ensure(ctx context.Context, model, modelSHA256 string, r Range, report func(float32)) (string, error) {
	p := c.Path(modelSHA256, r)
	if _, err := os.Stat(p); err == nil {
		if report != nil {
			report(1)
		}
		return p, nil
	}
	if err := WriteSlice(ctx, model, modelSHA256, r, p, report); err != nil {
		return "", err
	}
	return p, nil
}
