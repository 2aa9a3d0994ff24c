package shard_test

import (
	"math"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// TestGemma2LargeModelScaling: Gemma 2 27B's queries are scaled by 1/sqrt(hidden/heads) =
// 1/sqrt(144), every other Gemma 2's by 1/sqrt(key length), decided from the file's metadata
// (the real-shape presets' shapes, as the synthesizer writes them) as the engine decides it:
// only with all 46 blocks, which a slice of the model keeps in block_count. A 4-layer cut of
// the 27B shape for benchmarks is not the 27B model and scales as the engine does, by the key
// length.
func TestGemma2LargeModelScaling(t *testing.T) {
	presets, err := testkit.ArchPresets("gemma2")
	if err != nil {
		t.Fatal(err)
	}
	shape := map[string]testkit.Preset{}
	for _, p := range presets {
		shape[p.Name] = p
	}
	for _, c := range []struct {
		preset string
		layers int // 0: the preset's
		want   float64
	}{
		{"gemma2-27b", 0, 1 / math.Sqrt(4608.0/32)},
		{"gemma2-27b", 4, 1 / math.Sqrt(128)},
		{"gemma2-9b", 0, 1 / math.Sqrt(256)},
	} {
		p, ok := shape[c.preset]
		if !ok {
			t.Fatalf("no gemma2 preset %s", c.preset)
		}
		if c.layers > 0 {
			p.Layers = c.layers
		}
		kv := testkit.ArchKV(p)
		got, err := shard.Gemma2QueryScale(kv)
		if err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("%s with %d layers: queries scaled by %v, want %v", c.preset, p.Layers, got, c.want)
		}
	}
}
