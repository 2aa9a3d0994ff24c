package shard_test

import (
	"math"
	"slices"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// TestMoELayerCosts: the planner sees each block's own bytes. DeepSeek's leading dense block
// costs a fraction of a mixture-of-experts one, and MLA's KV cache holds the latent and the
// rope key (one head) instead of every head's K and V; gpt-oss's sliding blocks keep their
// window. Tiny presets; only the files' metadata and tensor tables are read.
func TestMoELayerCosts(t *testing.T) {
	ds, err := shard.ReadModelInfo(testkit.Model(t, testkit.SynthOptions{Arch: "deepseek2", Preset: "tiny", Seed: 1, Type: "q8_0"}))
	if err != nil {
		t.Fatal(err)
	}
	// tiny: kv_lora_rank 64, rope 16; 4 heads of 32+16 query/key and 32 value dims.
	if got, want := ds.KVBytesPerToken(2), int64((64+16+64)*2); got != want {
		t.Errorf("deepseek2 KV bytes per token and layer %d, want %d (latent+rope key, latent)", got, want)
	}
	shape := ds.Shape(2048, 4, 2)
	if d, m := ds.LayerBytes[0], ds.LayerBytes[1]; d*3 > m*2 { // V3's: 5%; tiny's attention is a larger share
		t.Errorf("deepseek2 dense layer 0 weighs %d, MoE layer 1 %d: want under two thirds", d, m)
	}
	if d, m := shape.LayerCosts[0]-ds.LayerBytes[0], shape.LayerCosts[1]-ds.LayerBytes[1]; d != m || d != 2048*4*ds.KVBytesPerToken(2) {
		t.Errorf("deepseek2 KV of layers 0 and 1: %d and %d, want %d each", d, m, 2048*4*ds.KVBytesPerToken(2))
	}
	for l := 2; l < ds.Layers; l++ {
		if shape.LayerCosts[l] != shape.LayerCosts[1] {
			t.Errorf("deepseek2 MoE layers differ: %d costs %d, layer 1 %d", l, shape.LayerCosts[l], shape.LayerCosts[1])
		}
	}
	t.Logf("deepseek2 tiny q8_0: dense layer %d B, MoE layer %d B of weights, KV %d B/token/layer (f16)", ds.LayerBytes[0], ds.LayerBytes[1], ds.KVBytesPerToken(2))

	oss, err := shard.ReadModelInfo(testkit.Model(t, testkit.SynthOptions{Arch: "gptoss", Preset: "tiny", Seed: 1, Type: "mxfp4"}))
	if err != nil {
		t.Fatal(err)
	}
	shape = oss.Shape(2048, 4, 2)
	if s, g := shape.LayerCosts[0], shape.LayerCosts[1]; s >= g || g-s != int64(2048-17)*4*oss.KVBytesPerToken(2) {
		t.Errorf("gptoss sliding layer costs %d, global %d: want the global one's KV for 2048-17 more tokens x 4 sessions", s, g)
	}
}

// TestDeepseek2PerHeadKVMatchesEngine: DeepSeek files as ollama's converter writes them
// (attn_kv_b decompresses the latent into every head's K and V, the cache holds those) run
// the engine's other attention path; Strata follows it whole and cut in two.
func TestDeepseek2PerHeadKVMatchesEngine(t *testing.T) {
	n := 32
	if testing.Short() {
		n = 8
	}
	o := tiny("deepseek2", "f32")
	o.Preset = "tiny-mha"
	path, info, prompt := oracleModel(t, o, oraclePrompt)
	if got, want := info.KVBytesPerToken(2), int64(4*(48+32)*2); got != want {
		t.Errorf("per-head KV %d B/token/layer, want %d", got, want)
	}
	want, wantLogits := engineGreedy(t, path, prompt, n)
	half := info.Layers / 2
	for _, ranges := range [][]shard.Range{{{Start: 0, End: info.Layers}}, {{Start: 0, End: half}, {Start: half, End: info.Layers}}} {
		stages := oracleStages(t, path, ranges)
		got, gotLogits := pipelineGreedy(t, stages, prompt, n)
		if !slices.Equal(got, want) {
			t.Fatalf("%v: Strata %v, engine %v", ranges, got, want)
		}
		if d := maxDiff(gotLogits, wantLogits); d > 1e-4 {
			t.Fatalf("%v: logits differ from the engine's by %.3g > 1e-4", ranges, d)
		}
		closeStages(stages)
	}
}

// BenchmarkMoECodecFlips measures (asserts nothing) what the wire's activation codec does to
// a mixture-of-experts model split in three: the tiny preset's greedy tokens of the whole
// model are fed back (teacher forcing) through the stages with the activations between them
// encoded and decoded, and each step's argmax is compared with the whole model's. A routing
// decision the codec flips shows as a changed logit and, at a near-tie, a changed token.
// Reports flips per step and the largest logit change, per family and codec:
//
//	go test -run '^$' -bench MoECodecFlips -benchtime 1x ./shard/
func BenchmarkMoECodecFlips(b *testing.B) {
	const n = 64
	for _, arch := range []string{"deepseek2", "gptoss"} {
		for _, c := range []quant.Codec{quant.CodecF16, quant.CodecQ8} {
			b.Run(arch+"/"+c.String(), func(b *testing.B) {
				path, info, prompt := oracleModel(b, tiny(arch, "f32"), oraclePrompt)
				want, wantLogits := pipelineGreedy(b, oracleStages(b, path, []shard.Range{{Start: 0, End: info.Layers}}), prompt, n)
				third := info.Layers / 3
				split := oracleStages(b, path, []shard.Range{{Start: 0, End: third}, {Start: third, End: 2 * third}, {Start: 2 * third, End: info.Layers}})
				for _, st := range split {
					if err := st.OpenSession(1); err != nil {
						b.Fatal(err)
					}
				}
				flips, worst := 0, 0.0
				for i := range n {
					toks, from := prompt, 0
					if i > 0 {
						toks, from = want[i-1:i], len(prompt)+i-1
					}
					logits := stagesStep(b, split, 1, c, toks, from)
					if argmax(logits) != want[i] {
						flips++
					}
					worst = math.Max(worst, maxDiff([][]float32{logits}, wantLogits[i:i+1]))
				}
				b.ReportMetric(float64(flips)/n, "flips/step")
				b.ReportMetric(worst, "max|dlogit|")
				b.Logf("%s %s: %d of %d greedy steps pick another token than the whole model's (f32 activations: 0, TestArchMatchesEngine); max |logit change| %.3g", arch, c, flips, n, worst)
			})
		}
	}
}
