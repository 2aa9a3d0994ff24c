package shard_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// tinyMixtral is the tiny llama preset with 8 experts per layer, 2 per token: Mixtral's
// routing at a size the oracles can afford.
func tinyMixtral(t *testing.T, typ string) string {
	o := tiny("llama", typ)
	o.Experts = 8
	return testkit.Model(t, o)
}

// TestMixtralSplitMatchesWhole: Mixtral has no engine implementation to hold Strata to (the
// float64 reference is its oracle, TestWholeMatchesFloat64Reference), so split == whole is
// asserted bit for bit: every 2- and 3-stage cut with the f32 codec gives the whole model's
// 64 greedy tokens and exactly its logits. Routing is where near-ties would flip, and a
// stage boundary must not move any. -short: 16 tokens, 2-stage cuts.
func TestMixtralSplitMatchesWhole(t *testing.T) {
	n, parts := 64, []int{2, 3}
	if testing.Short() {
		n, parts = 16, []int{2}
	}
	path := tinyMixtral(t, "f32")
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	prompt := encodePrompt(t, path, oraclePrompt)
	whole := oracleStages(t, path, []shard.Range{{Start: 0, End: info.Layers}})
	want, wantLogits := pipelineGreedy(t, whole, prompt, n)
	whole[0].Close()
	for _, k := range parts {
		for _, ranges := range cuts(info.Layers, k) {
			stages := oracleStages(t, path, ranges)
			got, gotLogits := pipelineGreedy(t, stages, prompt, n)
			if !slices.Equal(got, want) {
				t.Fatalf("%v: split %v, whole %v", ranges, got, want)
			}
			if d := maxDiff(gotLogits, wantLogits); d != 0 {
				t.Fatalf("%v: logits differ from the whole model's by %.3g, want bit-identical", ranges, d)
			}
			closeStages(stages)
		}
	}
	t.Logf("mixtral: %d tokens (%d distinct) and logits bit-identical whole and over every %v-stage cut", n, len(distinct(want)), parts)
}

// TestMixtralQuantSplit: with q8_0 and q4_0 experts, the greedy tokens are the same whole and
// cut in three.
func TestMixtralQuantSplit(t *testing.T) {
	n := 32
	if testing.Short() {
		n = 8
	}
	for _, typ := range []string{"q8_0", "q4_0"} {
		t.Run(typ, func(t *testing.T) {
			path := tinyMixtral(t, typ)
			prompt := encodePrompt(t, path, oraclePrompt)
			want, _ := pipelineGreedy(t, oracleStages(t, path, []shard.Range{{Start: 0, End: 6}}), prompt, n)
			split := oracleStages(t, path, []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: 6}})
			if got, _ := pipelineGreedy(t, split, prompt, n); !slices.Equal(got, want) {
				t.Fatalf("split %v, whole %v", got, want)
			}
		})
	}
}

// TestMoEF16RoutingFlips measures, and does not assert, what the f16 activation codec does to
// routing: the tiny MoE models cut in three, activations rounded through the f16 codec at
// each boundary as the wire would carry them. It logs how many (token, layer) routing
// decisions of the float64 reference change when its stream is rounded the same way at the
// same boundaries (teacher-forced on the prompt and the f32 run's tokens, padded to 512 with
// fixed pseudo-random ones when STRATA_MEASURE_ROUTING is set), and where Strata's greedy tokens
// first part from the f32 run's. Skipped with -short.
func TestMoEF16RoutingFlips(t *testing.T) {
	if testing.Short() {
		t.Skip("a measurement, not an oracle")
	}
	const n = 64
	long := 0 // STRATA_MEASURE_ROUTING=1: 512 reference tokens (~25 s a model), not ~90
	if os.Getenv("STRATA_MEASURE_ROUTING") != "" {
		long = 512
	}
	for _, c := range []struct {
		name string
		path func() string
	}{
		{"mixtral", func() string { return tinyMixtral(t, "f32") }},
		{"qwen3moe", func() string {
			return testkit.Model(t, tiny("qwen3moe", "f32"))
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := c.path()
			prompt := encodePrompt(t, path, oraclePrompt)
			ranges := []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: 6}}
			stages := oracleStages(t, path, ranges, shard.WithMaxSessions(2))
			want, wantLogits := codecGreedy(t, stages, 1, quant.CodecF32, prompt, n)
			got, gotLogits := codecGreedy(t, stages, 2, quant.CodecF16, prompt, n)
			same := 0
			for same < n && got[same] == want[same] {
				same++
			}
			// Routing decisions of the reference over the f32 run's sequence, with and
			// without the f16 round trip where the stages meet.
			seq := append(slices.Clone(prompt), want[:n-1]...)
			for x := uint32(1); len(seq) < long; x = x*1103515245 + 12345 {
				seq = append(seq, int32(x>>8)%2048) // more decisions: tokens from a fixed LCG
			}
			plain := referenceRoutes(t, path, seq, nil)
			rounded := referenceRoutes(t, path, seq, func(l int, x []float64) {
				if l == 2 || l == 4 {
					f16RoundTrip(t, x)
				}
			})
			flips, decisions := 0, 0
			for i := range plain {
				if i%6 < 2 {
					continue // layers before the first boundary see no codec
				}
				decisions++
				if !slices.Equal(plain[i], rounded[i]) {
					flips++
				}
			}
			t.Logf("%s, f16 codec at layers 2 and 4: reference routing changed in %d of %d (token, layer) decisions after a boundary (%.2f%%); Strata's greedy tokens equal the f32 run's for %d of %d, max |logit diff| over those steps %.3g",
				c.name, flips, decisions, 100*float64(flips)/float64(decisions), same, n, maxDiff(gotLogits[:same], wantLogits[:same]))
		})
	}
}

// referenceRoutes runs the float64 reference over seq and returns the experts each (token,
// layer) chose, token-major, sorted.
func referenceRoutes(t *testing.T, path string, seq []int32, boundary func(int, []float64)) [][]int {
	ref := loadRef(t, path)
	if ref.experts == 0 {
		t.Fatalf("%s has no experts", path)
	}
	var routes [][]int
	ref.route = func(_ int, chosen []int) { routes = append(routes, slices.Sorted(slices.Values(chosen))) }
	ref.boundary = boundary
	for pos, id := range seq {
		ref.step(id, pos)
	}
	if len(routes) != len(seq)*ref.layers {
		t.Fatalf("%d routing decisions for %d tokens of %d layers", len(routes), len(seq), ref.layers)
	}
	return routes
}

// f16RoundTrip rounds x as the f16 codec carries it.
func f16RoundTrip(t *testing.T, x []float64) {
	v := make([]float32, len(x))
	for i := range x {
		v[i] = float32(x[i])
	}
	b, err := quant.CodecF16.Append(nil, v)
	if err != nil {
		t.Fatal(err)
	}
	if err := quant.CodecF16.Decode(v, b); err != nil {
		t.Fatal(err)
	}
	for i := range x {
		x[i] = float64(v[i])
	}
}

// TestMoELayerBytes: a MoE layer's weight bytes, which the planner, memory offers and /health
// use, count every expert, not one dense MLP's worth.
func TestMoELayerBytes(t *testing.T) {
	info, err := shard.ReadModelInfo(tinyMixtral(t, "f32"))
	if err != nil {
		t.Fatal(err)
	}
	h, kv, ffn, experts := 64, 32, 192, 8 // the tiny preset: 4 heads of 16, 2 KV heads
	want := 4 * int64(2*h*h+2*h*kv+2*h+h*experts+3*h*ffn*experts)
	if info.Experts != experts || info.ExpertsUsed != 2 {
		t.Errorf("experts %d used %d, want 8 and 2", info.Experts, info.ExpertsUsed)
	}
	for l, b := range info.LayerBytes {
		if b != want {
			t.Errorf("layer %d: %d bytes, want %d (attention, norms, router and 8 experts)", l, b, want)
		}
	}
	if c := info.Shape(2048, 1, 2).LayerCosts[0]; c != want+2048*info.KVBytesPerToken(2) {
		t.Errorf("planner cost of layer 0: %d, want its weights %d and its KV", c, want)
	}
}

// TestMoEBadMetadata: expert keys that cannot be right are refused by name when the file is
// read, before any weight is loaded.
func TestMoEBadMetadata(t *testing.T) {
	for _, c := range []struct {
		arch          string
		count, used   uint32
		wantSubstring string
	}{
		{"qwen3moe", 0, 0, "expert_count is 0"},
		{"qwen3moe", 8, 9, "expert_used_count 9"},
		{"qwen3moe", 8, 0, "expert_used_count 0"},
		{"llama", 8, 0, "expert_used_count 0"},
	} {
		path := filepath.Join(t.TempDir(), "m.gguf")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		a := c.arch
		kv := fsggml.KV{"general.architecture": a, a + ".block_count": uint32(2), a + ".embedding_length": uint32(64),
			a + ".attention.head_count": uint32(4), a + ".expert_count": c.count, a + ".expert_used_count": c.used}
		if err := fsggml.WriteGGUF(f, kv, nil); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if _, err := shard.ReadModelInfo(path); err == nil || !strings.Contains(err.Error(), c.wantSubstring) {
			t.Errorf("%s with %d experts, %d used: %v, want an error saying %q", a, c.count, c.used, err, c.wantSubstring)
		}
	}
}
