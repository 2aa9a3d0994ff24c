package p2p

import (
	"context"
	"math"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// Executor is what the stage protocol needs; shard.Stage must provide it.
var _ Executor = (*shard.Stage)(nil)

// TestRealStagesChain runs the tiny synthesized model on ggml stages: whole on one host, and
// cut in three on three hosts. Over an f32 wire the split route must give the same greedy
// tokens as the whole model, with last-step logits equal to float rounding; f16 and q8 are
// measured and logged.
func TestRealStagesChain(t *testing.T) {
	if testing.Short() {
		t.Skip("loads ggml stages")
	}
	path := testkit.TinyModel(t)
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	load := func(r shard.Range) *shard.Stage {
		st, err := shard.LoadStage(context.Background(), path, r, shard.WithSliceDir(dir), shard.WithCacheType("f32"),
			shard.WithMaxSessions(4), shard.WithThreads(1))
		if err != nil {
			t.Fatalf("load %s: %v", r, err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	L := info.Layers
	var model string
	serve := func(ranges ...shard.Range) []Hop {
		var hops []Hop
		for _, r := range ranges {
			st := load(r)
			model = st.Info().ModelSHA256
			h := newTestHost(t)
			if err := h.ServeStage(st); err != nil {
				t.Fatal(err)
			}
			hops = append(hops, Hop{Peer: h.AddrInfo(), Range: r})
		}
		return hops
	}
	wholeHops := serve(shard.Range{Start: 0, End: L})
	splitHops := serve(shard.Range{Start: 0, End: 2}, shard.Range{Start: 2, End: 4}, shard.Range{Start: 4, End: L})
	if model == "" {
		t.Fatal("stages report no model digest")
	}
	entry := newTestHost(t)

	prompt := []int32{1, 400, 17, 999, 3, 42, 7}
	run := func(hops []Hop, codec quant.Codec, session uint64) ([]int32, []float32) {
		t.Helper()
		ctx := context.Background()
		r, err := entry.OpenRoute(ctx, session, hops, WithModel(model), WithCodec(codec))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close(ctx)
		pos := make([]int32, len(prompt))
		for i := range pos {
			pos[i] = int32(i)
		}
		const n = 16
		res, err := r.Step(ctx, pos, prompt, sample.Params{}, nil, false)
		if err != nil {
			t.Fatal(err)
		}
		toks := []int32{res.Token}
		for i := 1; i < n; i++ {
			p := int32(len(prompt) + i - 1)
			if res, err = r.Step(ctx, []int32{p}, []int32{res.Token}, sample.Params{}, nil, i == n-1); err != nil {
				t.Fatal(err)
			}
			toks = append(toks, res.Token)
		}
		return toks, append([]float32(nil), res.Logits...)
	}
	wantToks, wantLogits := run(wholeHops, quant.CodecF32, 1)
	for _, codec := range []quant.Codec{quant.CodecF32, quant.CodecF16, quant.CodecQ8} {
		toks, logits := run(splitHops, codec, 2)
		same := 0
		for i := range toks {
			if toks[i] == wantToks[i] {
				same++
			}
		}
		var maxDiff float64
		for i := range logits {
			maxDiff = math.Max(maxDiff, math.Abs(float64(logits[i]-wantLogits[i])))
		}
		t.Logf("%s wire: %d/%d greedy tokens as the whole model, last-step logits max diff %.3g", codec, same, len(toks), maxDiff)
		if codec == quant.CodecF32 && (same != len(toks) || maxDiff > 1e-4) {
			t.Fatalf("split over an f32 wire differs from the whole model: tokens %v vs %v, logit diff %g", toks, wantToks, maxDiff)
		}
	}
}
