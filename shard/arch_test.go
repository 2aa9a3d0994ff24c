package shard_test

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"

	// The engine's own families, the oracle each of Strata's is held to.
	_ "github.com/ollama/ollama/model/models/deepseek2"
	_ "github.com/ollama/ollama/model/models/gemma2"
	_ "github.com/ollama/ollama/model/models/gemma3"
	_ "github.com/ollama/ollama/model/models/gptoss"
	_ "github.com/ollama/ollama/model/models/llama"
	_ "github.com/ollama/ollama/model/models/mistral3"
	_ "github.com/ollama/ollama/model/models/olmo3"
	_ "github.com/ollama/ollama/model/models/qwen2"
	_ "github.com/ollama/ollama/model/models/qwen3"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// engineArchs are the families the engine implements, so Strata's forward can be held to it.
var engineArchs = []string{"llama", "qwen2", "qwen3", "qwen3moe", "mistral3", "gemma2", "gemma3", "olmo3", "deepseek2", "gptoss"}

const oracleContext = 2048

// engineGreedy runs the engine's own whole-model forward (model.New and the family's
// Model.Forward, as ollama's runner does) greedily for n tokens after prompt, returning the
// tokens and the logits of every step.
func engineGreedy(t *testing.T, path string, prompt []int32, n int) ([]int32, [][]float32) {
	t.Helper()
	m, err := model.New(path, ml.BackendParams{AllocMemory: true, NumThreads: 1, FlashAttention: ml.FlashAttentionEnabled})
	if err != nil {
		t.Fatalf("engine: %v", err)
	}
	b := m.Backend()
	defer b.Close()
	if err := b.Load(context.Background(), func(float32) {}); err != nil {
		t.Fatalf("engine load: %v", err)
	}
	cache := m.Config().Cache
	cache.Init(b, ml.DTypeF32, 1, oracleContext, 256)
	defer cache.Close()
	step := func(toks []int32, from int) []float32 {
		ctx := b.NewContext()
		defer ctx.Close()
		pos := positions(from, len(toks))
		batch := input.Batch{
			Inputs:    ctx.Input().FromInts(toks, len(toks)),
			Outputs:   ctx.Input().FromInts([]int32{int32(len(toks) - 1)}, 1),
			Positions: pos,
			Sequences: make([]int, len(toks)),
		}
		logits, err := model.Forward(ctx, m, batch)
		if err != nil {
			t.Fatalf("engine forward: %v", err)
		}
		ctx.Compute(logits)
		return slices.Clone(logits.Floats())
	}
	return greedy(prompt, n, step)
}

// pipelineGreedy runs stages in order, as a chain of nodes does, greedily for n tokens.
func pipelineGreedy(tb testing.TB, stages []*shard.Stage, prompt []int32, n int) ([]int32, [][]float32) {
	tb.Helper()
	return codecGreedy(tb, stages, 1, quant.CodecF32, prompt, n)
}

// codecGreedy is pipelineGreedy in session, with the activations between stages passed
// through codec as the wire carries them (f32's round trip is exact).
func codecGreedy(tb testing.TB, stages []*shard.Stage, session uint64, c quant.Codec, prompt []int32, n int) ([]int32, [][]float32) {
	tb.Helper()
	for _, st := range stages {
		if err := st.OpenSession(session); err != nil {
			tb.Fatal(err)
		}
	}
	return greedy(prompt, n, func(toks []int32, from int) []float32 {
		return stagesStep(tb, stages, session, c, toks, from)
	})
}

// greedy decodes n tokens after prompt, step giving the logits of a run of tokens from a
// position, and returns them and every step's logits.
func greedy(prompt []int32, n int, step func(toks []int32, from int) []float32) ([]int32, [][]float32) {
	var toks []int32
	var all [][]float32
	l := step(prompt, 0)
	for i := range n {
		all = append(all, l)
		toks = append(toks, argmax(l))
		if i < n-1 {
			l = step(toks[i:i+1], len(prompt)+i)
		}
	}
	return toks, all
}

// stagesStep runs toks, at positions from on, through stages in order in session, the
// activations between them through codec, and returns the last stage's logits.
func stagesStep(tb testing.TB, stages []*shard.Stage, session uint64, c quant.Codec, toks []int32, from int) []float32 {
	tb.Helper()
	s := shard.Step{Session: session, Positions: positions(from, len(toks)), Tokens: toks}
	for _, st := range stages {
		out, err := st.Forward(context.Background(), s)
		if err != nil {
			tb.Fatal(err)
		}
		if out.Logits != nil {
			return out.Logits
		}
		b, err := c.Append(nil, out.Hidden)
		if err != nil {
			tb.Fatal(err)
		}
		h := make([]float32, len(out.Hidden))
		if err := c.Decode(h, b); err != nil {
			tb.Fatal(err)
		}
		s = shard.Step{Session: session, Positions: s.Positions, Hidden: h}
	}
	tb.Fatal("no stage gave logits")
	return nil
}

// oraclePrompt is what the oracles decode after.
const oraclePrompt = "The quick brown fox jumps over the lazy dog, said Strata."

// tiny is the tiny preset of arch (llama for "") in weight type typ, seed 1.
func tiny(arch, typ string) testkit.SynthOptions {
	return testkit.SynthOptions{Arch: arch, Preset: "tiny", Seed: 1, Type: typ}
}

// oracleModel synthesizes o's model (cached) and returns its path, its metadata and the
// tokens of text.
func oracleModel(tb testing.TB, o testkit.SynthOptions, text string) (string, *shard.ModelInfo, []int32) {
	tb.Helper()
	path := testkit.Model(tb, o)
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		tb.Fatal(err)
	}
	return path, info, encodePrompt(tb, path, text)
}

// encodePrompt is text's tokens under path's tokenizer, BOS first.
func encodePrompt(tb testing.TB, path, text string) []int32 {
	tb.Helper()
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		tb.Fatal(err)
	}
	prompt, err := tok.Encode(text, true)
	if err != nil {
		tb.Fatal(err)
	}
	return prompt
}

// oracleStages loads ranges of path as the oracles run them: an F32 KV cache, one session
// (unless opts say otherwise), oracleContext tokens.
func oracleStages(tb testing.TB, path string, ranges []shard.Range, opts ...shard.StageOption) []*shard.Stage {
	tb.Helper()
	opts = append([]shard.StageOption{shard.WithCacheType("f32"), shard.WithMaxSessions(1), shard.WithMaxContext(oracleContext)}, opts...)
	stages, _ := testkit.LoadStages(tb, path, ranges, opts...)
	return stages
}

// closeStages frees stages before the test ends, so a loop over cuts holds one set at a time.
func closeStages(stages []*shard.Stage) {
	for _, st := range stages {
		st.Close()
	}
}

// cuts lists every way to split layers into k contiguous non-empty stages.
func cuts(layers, k int) [][]shard.Range {
	if k == 1 {
		return [][]shard.Range{{{Start: 0, End: layers}}}
	}
	var out [][]shard.Range
	var rec func(start, left int, acc []shard.Range)
	rec = func(start, left int, acc []shard.Range) {
		if left == 1 {
			out = append(out, append(slices.Clone(acc), shard.Range{Start: start, End: layers}))
			return
		}
		for end := start + 1; end <= layers-left+1; end++ {
			rec(end, left-1, append(acc, shard.Range{Start: start, End: end}))
		}
	}
	rec(0, k, nil)
	return out
}

func maxDiff(a, b [][]float32) float64 {
	var worst float64
	for i := range min(len(a), len(b)) {
		for j := range min(len(a[i]), len(b[i])) {
			worst = math.Max(worst, math.Abs(float64(a[i][j]-b[i][j])))
		}
	}
	return worst
}

// TestArchMatchesEngine is each family's oracle: the engine's own whole-model forward
// against Strata's whole model and every 2- and 3-stage cut of the tiny preset, with F32
// weights and KV cache. Greedy tokens must be identical and the logits of every step within
// 1e-4. -short decodes 16 tokens and only the 2-stage cuts.
func TestArchMatchesEngine(t *testing.T) {
	n, parts := 64, []int{1, 2, 3}
	if testing.Short() {
		n, parts = 16, []int{1, 2}
	}
	for _, arch := range engineArchs {
		t.Run(arch, func(t *testing.T) {
			path, info, prompt := oracleModel(t, tiny(arch, "f32"), oraclePrompt)
			want, wantLogits := engineGreedy(t, path, prompt, n)
			var worst float64
			var whole [][]float32 // Strata's own, which every cut must give bit for bit
			for _, k := range parts {
				for _, ranges := range cuts(info.Layers, k) {
					stages := oracleStages(t, path, ranges)
					got, gotLogits := pipelineGreedy(t, stages, prompt, n)
					name := fmt.Sprint(ranges)
					if !slices.Equal(got, want) {
						t.Fatalf("%s: Strata %v, engine %v", name, got, want)
					}
					d := maxDiff(gotLogits, wantLogits)
					worst = math.Max(worst, d)
					if d > 1e-4 {
						t.Fatalf("%s: logits differ from the engine's by %.3g > 1e-4", name, d)
					}
					if whole == nil {
						whole = gotLogits
					} else if d := maxDiff(gotLogits, whole); d != 0 {
						t.Fatalf("%s: logits differ from Strata's whole model by %.3g: a split must be bit-identical (f32 activations)", name, d)
					}
					closeStages(stages)
				}
			}
			t.Logf("%s: %d tokens identical to the engine whole and over %v-stage cuts; max |logit diff| %.3g (%d distinct tokens)",
				arch, n, parts, worst, len(distinct(want)))
		})
	}
}

func distinct(v []int32) map[int32]bool {
	m := map[int32]bool{}
	for _, x := range v {
		m[x] = true
	}
	return m
}

// TestSlidingWindowKVBudget: a sliding-window layer is budgeted its window of KV (and the
// token being decoded), a global one the whole context, and the planner's shape says so.
func TestSlidingWindowKVBudget(t *testing.T) {
	for _, c := range []struct {
		arch    string
		windows []int
	}{
		{"gemma2", []int{16, 0, 16, 0, 16, 0}},
		{"gemma3", []int{16, 16, 16, 16, 16, 0}},
		{"olmo3", []int{16, 16, 16, 0, 16, 16, 16, 0}},
		{"gptoss", []int{16, 0, 16, 0, 16, 0}},
		{"qwen2", []int{0, 0, 0, 0, 0, 0}},
	} {
		info, err := shard.ReadModelInfo(testkit.Model(t, tiny(c.arch, "f32")))
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(info.Windows, c.windows) {
			t.Errorf("%s: windows %v, want %v", c.arch, info.Windows, c.windows)
		}
		shape := info.Shape(2048, 4, 2)
		for l, w := range c.windows {
			tokens := 2048
			if w > 0 {
				tokens = w + 1
			}
			want := info.LayerBytes[l] + int64(tokens*4)*info.KVBytesPerToken(2)
			if shape.LayerCosts[l] != want {
				t.Errorf("%s layer %d: cost %d, want %d", c.arch, l, shape.LayerCosts[l], want)
			}
		}
	}
}

// TestArchQuantMatchesEngine: with q8_0 and q4_0 weights, each family's greedy tokens are
// the engine's, whole and cut in three.
func TestArchQuantMatchesEngine(t *testing.T) {
	n := 32
	if testing.Short() {
		n = 8
	}
	for _, arch := range engineArchs {
		types := []string{"q8_0", "q4_0"}
		if arch == "gptoss" {
			types = append(types, "mxfp4") // its real experts' type
		}
		for _, typ := range types {
			t.Run(arch+"/"+typ, func(t *testing.T) {
				path, info, prompt := oracleModel(t, tiny(arch, typ), "Once upon a time, in a swarm of small machines,")
				want, _ := engineGreedy(t, path, prompt, n)
				third := info.Layers / 3
				for _, ranges := range [][]shard.Range{
					{{Start: 0, End: info.Layers}},
					{{Start: 0, End: third}, {Start: third, End: 2 * third}, {Start: 2 * third, End: info.Layers}},
				} {
					if got, _ := pipelineGreedy(t, oracleStages(t, path, ranges), prompt, n); !slices.Equal(got, want) {
						t.Fatalf("%v: Strata %v, engine %v", ranges, got, want)
					}
				}
			})
		}
	}
}
