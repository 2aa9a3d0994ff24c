package quant_test

import (
	"context"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
)

// TestRequantizeK: k-quants pack blocks of 256, so they need the small preset's 512-wide rows.
// Matrices become q4_k, norms stay f32, and the weights decode close to the originals.
func TestRequantizeK(t *testing.T) {
	in := testkit.Model(t, testkit.SynthOptions{Preset: "small", Layers: 2, Seed: 1, Type: "f32"})
	out := filepath.Join(t.TempDir(), "q4k.gguf")
	f, err := quant.ParseFormat("q4_k_m")
	if err != nil {
		t.Fatal(err)
	}
	var last float32
	if err := quant.Requantize(context.Background(), in, out, f, func(p float32) { last = p }); err != nil {
		t.Fatal(err)
	}
	if last != 1 {
		t.Fatalf("progress ended at %v", last)
	}
	srcOff, src := tensors(t, in)
	dstOff, dst := tensors(t, out)
	for name, st := range src {
		dt := dst[name]
		if dt == nil {
			t.Fatalf("%s missing after requantizing", name)
		}
		want := fsggml.TensorTypeQ4_K
		if len(st.Shape) < 2 {
			want = fsggml.TensorTypeF32
		}
		if got := fsggml.TensorType(dt.Kind); got != want {
			t.Errorf("%s: %s, want %s", name, got, want)
		}
	}
	// The decoded q4_k weights of one matrix track the f32 ones: q4_k's error is a few
	// percent of a block's range.
	name := "blk.1.ffn_down.weight"
	a, b := tensorData(t, in, srcOff, src[name]), tensorData(t, out, dstOff, dst[name])
	var num, den float64
	for i := range a {
		d := float64(a[i] - b[i])
		num += d * d
		den += float64(a[i]) * float64(a[i])
	}
	if rel := math.Sqrt(num / den); rel > 0.15 || rel == 0 {
		t.Fatalf("%s: relative RMS error %.4f after q4_k", name, rel)
	}
}

// TestRequantizeHostileFile: a key length of 2^63 makes fs/ggml's decoder panic; Requantize
// must say the file is corrupt instead.
func TestRequantizeHostileFile(t *testing.T) {
	data, err := os.ReadFile(testkit.TinyModel(t))
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(data[24:], 1<<63) // the first key's length
	dir := t.TempDir()
	in := filepath.Join(dir, "hostile.gguf")
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, _ := quant.ParseFormat("q8_0")
	err = quant.Requantize(context.Background(), in, filepath.Join(dir, "out.gguf"), f, nil)
	if err == nil || !strings.Contains(err.Error(), "GGUF") {
		t.Fatalf("got %v, want a corrupt-GGUF error", err)
	}
}

// tensors returns a GGUF's tensor table by name and where its tensor data starts.
func tensors(t *testing.T, path string) (uint64, map[string]*fsggml.Tensor) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	meta, err := gguf.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]*fsggml.Tensor{}
	for _, ts := range meta.Tensors().Items() {
		m[ts.Name] = ts
	}
	return meta.Tensors().Offset, m
}

func tensorData(t *testing.T, path string, base uint64, ts *fsggml.Tensor) []float32 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, ts.Size())
	if _, err := f.ReadAt(b, int64(base+ts.Offset)); err != nil {
		t.Fatal(err)
	}
	v, err := quant.Decode(fsggml.TensorType(ts.Kind), b, ts.Elements())
	if err != nil {
		t.Fatal(err)
	}
	return v
}
