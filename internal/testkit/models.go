package testkit

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Model returns the path of a synthesized model for tests, writing it on first use. Models
// are cached in the system temp dir across test packages and runs: they are a pure function
// of the options.
func Model(tb testing.TB, o SynthOptions) string {
	tb.Helper()
	if o.Type == "" {
		o.Type = "f16"
	}
	dir := filepath.Join(os.TempDir(), "strata-testkit")
	name := fmt.Sprintf("%s-L%d-%s-s%d", o.Preset, o.Layers, o.Type, o.Seed)
	if o.Arch != "" && o.Arch != "llama" {
		name = o.Arch + "-" + name
	}
	if o.Tied {
		name += "-tied"
	}
	if o.Experts > 0 {
		name += fmt.Sprintf("-x%d", o.Experts)
	}
	path := filepath.Join(dir, name+".gguf")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if err := Synthesize(context.Background(), path, o, nil); err != nil {
		tb.Fatalf("synthesize %s: %v", name, err)
	}
	return path
}

// TinyModel is the tiny preset with F32 weights and seed 1, the oracles' model.
func TinyModel(tb testing.TB) string {
	tb.Helper()
	return Model(tb, SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
}
