package shard

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
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
	keep := sliceKeeps(meta, info, r)
	var total int64
	for _, t := range keep {
		total += int64(t.Size())
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

// sliceKeeps lists the model's tensors a slice for r holds.
func sliceKeeps(meta *fsggml.GGML, info *ModelInfo, r Range) []*fsggml.Tensor {
	var keep []*fsggml.Tensor
	for _, t := range meta.Tensors().Items() {
		if sliceTensor(t.Name, r, info.Layers, info.TiedEmbedding) {
			keep = append(keep, t)
		}
	}
	return keep
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

// Ensure returns the path of the slice of model for r, writing it if it is not cached. A
// cached slice is checked first (its tensor table against the model's, its size, its digest
// recorded beside it): one that a crash or a full disk left damaged is deleted and cut again
// rather than loaded, or retried, forever.
func (c SliceCache) Ensure(ctx context.Context, model, modelSHA256 string, r Range, report func(float32)) (string, error) {
	p := c.Path(modelSHA256, r)
	if _, err := os.Stat(p); err == nil {
		err := VerifySlice(model, modelSHA256, r, p)
		if err == nil {
			if report != nil {
				report(1)
			}
			return p, nil
		}
		slog.Warn("cached slice is damaged; cutting it again", "path", p, "err", err)
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return "", fmt.Errorf("remove damaged slice: %w", err)
		}
		_ = os.Remove(digestPath(p))
	}
	if err := WriteSlice(ctx, model, modelSHA256, r, p, report); err != nil {
		return "", err
	}
	if err := writeDigest(p); err != nil {
		return "", err
	}
	return p, nil
}

// RemoveStale deletes the temporary files that a crash in the middle of cutting a slice left
// in the cache (they can be as large as the slice). Call it before anything else writes to
// the cache: a write in progress has one too.
func (c SliceCache) RemoveStale() (int, error) {
	ents, err := os.ReadDir(c.Dir)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, fmt.Errorf("clean slice cache: %w", err)
	}
	n := 0
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") && e.Type().IsRegular() {
			if err := os.Remove(filepath.Join(c.Dir, e.Name())); err != nil {
				return n, fmt.Errorf("clean slice cache: %w", err)
			}
			n++
		}
	}
	return n, nil
}

func digestPath(slice string) string { return slice + ".sha256" }

// writeDigest records the slice file's sha256 and size beside it.
func writeDigest(slice string) error {
	sum, size, err := fileDigest(slice)
	if err != nil {
		return fmt.Errorf("digest slice: %w", err)
	}
	dp := digestPath(slice)
	tmp := dp + ".tmp"
	if err := os.WriteFile(tmp, fmt.Appendf(nil, "%s %d\n", sum, size), 0o644); err != nil {
		return fmt.Errorf("digest slice: %w", err)
	}
	if err := os.Rename(tmp, dp); err != nil {
		return fmt.Errorf("digest slice: %w", err)
	}
	return nil
}

func fileDigest(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// VerifySlice checks a slice file against the model it was cut from: the model it names, its
// tensor table (names, types, shapes) against what a slice for r holds, its size against
// where its last tensor ends, and its bytes against the digest recorded beside it (a slice
// from before digests were kept gets one, once its table checks out).
func VerifySlice(model, modelSHA256 string, r Range, slice string) error {
	want, err := expectedTable(model, r)
	if err != nil {
		return err
	}
	f, err := os.Open(slice)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		return err
	}
	if got := meta.KV().String(sliceOfKey); got != modelSHA256 {
		return fmt.Errorf("cut from model %.16s, not %.16s", got, modelSHA256)
	}
	items := meta.Tensors().Items()
	if len(items) != len(want) {
		return fmt.Errorf("%d tensors, a slice for %s holds %d", len(items), r, len(want))
	}
	var end uint64
	for _, t := range items {
		w, ok := want[t.Name]
		if !ok {
			return fmt.Errorf("tensor %s does not belong in a slice for %s", t.Name, r)
		}
		if t.Kind != w.Kind || !slices.Equal(t.Shape, w.Shape) {
			return fmt.Errorf("tensor %s is type %d shape %v, the model's is type %d shape %v", t.Name, t.Kind, t.Shape, w.Kind, w.Shape)
		}
		end = max(end, meta.Tensors().Offset+t.Offset+t.Size())
	}
	if uint64(st.Size()) < end {
		return fmt.Errorf("truncated: %d bytes, its tensors end at %d", st.Size(), end)
	}
	rec, err := os.ReadFile(digestPath(slice))
	if os.IsNotExist(err) {
		return writeDigest(slice)
	}
	if err != nil {
		return err
	}
	var sum string
	var size int64
	if _, err := fmt.Sscanf(string(rec), "%s %d", &sum, &size); err != nil {
		return fmt.Errorf("digest file: %w", err)
	}
	if size != st.Size() {
		return fmt.Errorf("%d bytes, %d when it was cut", st.Size(), size)
	}
	got, _, err := fileDigest(slice)
	if err != nil {
		return err
	}
	if got != sum {
		return fmt.Errorf("sha256 %.16s, %.16s when it was cut", got, sum)
	}
	return nil
}

// expectedTable is the tensor table a slice of model for r must have, by name.
func expectedTable(model string, r Range) (map[string]*fsggml.Tensor, error) {
	f, err := os.Open(model)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", filepath.Base(model), err)
	}
	info, err := modelInfo(model, st.Size(), meta)
	if err != nil {
		return nil, err
	}
	want := map[string]*fsggml.Tensor{}
	for _, t := range sliceKeeps(meta, info, r) {
		want[t.Name] = t
	}
	if r.Start == 0 && !slices.ContainsFunc(meta.Tensors().Items(), func(t *fsggml.Tensor) bool {
		return strings.HasPrefix(t.Name, "output.") && want[t.Name] != nil
	}) {
		want[absentOutput] = &fsggml.Tensor{Name: absentOutput, Kind: 0, Shape: []uint64{1}}
	}
	return want, nil
}
