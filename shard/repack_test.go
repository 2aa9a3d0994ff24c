package shard_test

import (
	"context"
	"math"
	"slices"
	"testing"

	"github.com/strata-llm/strata/internal/cpufeat"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// Tolerances of the q4_0 path, for the tiny q4_0 model over 9 steps (an 8-token prompt,
// then 8 single tokens). Both the repacked and the plain path quantize activations to q8_0
// before the q4_0 dot products: that is the distance to the float64 forward. Repacking only
// reorders the sums. Measured on the 2-core AMD EPYC (AVX-512 VNNI) dev machine, 2026-12-01:
// max |logit - float64 reference| 0.0777 repacked and 0.0777 plain; repacked vs plain 9.5e-7.
const (
	q4ReferenceTolerance = 0.15 // about 2x the measured 0.0777
	repackVsPlainTol     = 1e-4 // about 100x the measured 9.5e-7
)

// TestRepackedWeights: the patched engine (make build / make test) puts a q4_0 stage's
// matrix weights in ggml's CPU_REPACK buffers wherever its kernels take them (x86 with AVX2
// here); the repacked path stays within q4ReferenceTolerance of the float64 oracle, as the plain
// path does (STRATA_CPU_REPACK=0), and within repackVsPlainTol of it; and a split stays
// bit-identical to the whole.
func TestRepackedWeights(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "q4_0"})
	ref := loadRef(t, path)
	toks := []int32{2048}
	for i := 1; i < 16; i++ {
		toks = append(toks, int32(i*37%2000))
	}
	var want [][]float64
	for pos, id := range toks {
		want = append(want, ref.step(id, pos))
	}
	ctx := context.Background()
	// run feeds an 8-token prompt (ggml's GEMM path), then 8 tokens one at a time (GEMV),
	// through the stages in order, and returns the logits of each step.
	run := func(t *testing.T, stages ...*shard.Stage) [][]float32 {
		t.Helper()
		for _, st := range stages {
			if err := st.OpenSession(1); err != nil {
				t.Fatal(err)
			}
		}
		var out [][]float32
		step := func(from, n int) {
			s := shard.Step{Session: 1, Positions: positions(from, n), Tokens: toks[from : from+n]}
			for _, st := range stages {
				o, err := st.Forward(ctx, s)
				if err != nil {
					t.Fatal(err)
				}
				s = shard.Step{Session: 1, Positions: s.Positions, Hidden: o.Hidden}
				if o.Logits != nil {
					out = append(out, o.Logits)
				}
			}
		}
		step(0, 8)
		for i := 8; i < len(toks); i++ {
			step(i, 1)
		}
		return out
	}
	// dist is the largest |a - b| over the steps' logits; b[0] is position 7's.
	dist := func(got [][]float32, ref [][]float64) float64 {
		var worst float64
		for i, l := range got {
			for j, v := range l {
				worst = math.Max(worst, math.Abs(float64(v)-ref[i][j]))
			}
		}
		return worst
	}
	wantSteps := want[7:]
	whole := loadStage(t, path, shard.Range{Start: 0, End: 6})
	bufs := whole.WeightBuffers()
	t.Logf("engine patched: %v; weights: %s", whole.EnginePatched(), shard.FormatWeightBuffers(bufs))
	repacked := slices.ContainsFunc(bufs, func(b shard.WeightBuffer) bool { return b.Type != "CPU" })
	if whole.EnginePatched() && slices.Contains(cpufeat.Check().Built, "AVX2") && !repacked {
		t.Fatalf("patched engine on an AVX2 build left every weight in plain CPU buffers: %s", shard.FormatWeightBuffers(bufs))
	}
	got := run(t, whole)
	split := run(t, loadStage(t, path, shard.Range{Start: 0, End: 3}), loadStage(t, path, shard.Range{Start: 3, End: 6}))
	for i := range got {
		if !slices.Equal(got[i], split[i]) {
			t.Fatalf("step %d: split logits differ from whole (weights: %s)", i, shard.FormatWeightBuffers(bufs))
		}
	}

	// The engine sets repacked tensors in chunks of rows; 64 rows at a time must give the
	// same bytes, so the same logits, as the tiny model's tensors set in one chunk each.
	t.Setenv("STRATA_REPACK_CHUNK_BYTES", "1")
	chunked := run(t, loadStage(t, path, shard.Range{Start: 0, End: 6}))
	for i := range got {
		if !slices.Equal(got[i], chunked[i]) {
			t.Fatalf("step %d: weights repacked 64 rows at a time give other logits", i)
		}
	}

	t.Setenv("STRATA_CPU_REPACK", "0")
	plainStage := loadStage(t, path, shard.Range{Start: 0, End: 6})
	if b := plainStage.WeightBuffers(); len(b) != 1 || b[0].Type != "CPU" {
		t.Fatalf("STRATA_CPU_REPACK=0: weights in %s, want plain CPU only", shard.FormatWeightBuffers(b))
	}
	plain := run(t, plainStage)
	plain64 := make([][]float64, len(plain))
	for i, l := range plain {
		for _, v := range l {
			plain64[i] = append(plain64[i], float64(v))
		}
	}
	dr, dp, between := dist(got, wantSteps), dist(plain, wantSteps), dist(got, plain64)
	t.Logf("max |logit - float64 reference| over 9 steps x %d vocab: repacked=%v %.3g, plain %.3g; repacked vs plain %.3g",
		ref.vocab, repacked, dr, dp, between)
	if dr > q4ReferenceTolerance || dp > q4ReferenceTolerance {
		t.Fatalf("engine disagrees with the float64 reference beyond %.3g: repacked %.3g, plain %.3g", q4ReferenceTolerance, dr, dp)
	}
	if between > repackVsPlainTol {
		t.Fatalf("repacked and plain logits differ by %.3g > %.3g", between, repackVsPlainTol)
	}
}
