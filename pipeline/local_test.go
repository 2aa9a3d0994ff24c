package pipeline_test

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// stagePool loads each layer range once and shares it between the splits that use it.
type stagePool struct {
	t     *testing.T
	path  string
	dir   string
	cache map[shard.Range]*shard.Stage
}

func (p *stagePool) get(r shard.Range) *shard.Stage {
	if st, ok := p.cache[r]; ok {
		return st
	}
	st, err := shard.LoadStage(context.Background(), p.path, r, shard.WithSliceDir(p.dir), shard.WithCacheType("f32"), shard.WithMaxSessions(2), shard.WithThreads(1))
	if err != nil {
		p.t.Fatalf("load %s: %v", r, err)
	}
	p.t.Cleanup(func() { st.Close() })
	p.cache[r] = st
	return st
}

// greedy runs prompt then n greedy tokens through a chain and returns the tokens and the
// logits of the last step.
func greedy(t *testing.T, c pipeline.Chain, prompt []int32, n int) ([]int32, []float32) {
	t.Helper()
	ctx := context.Background()
	pos := make([]int32, len(prompt))
	for i := range pos {
		pos[i] = int32(i)
	}
	res, err := c.Step(ctx, pipeline.StepInput{Positions: pos, Tokens: prompt, WantLogits: n == 1})
	if err != nil {
		t.Fatal(err)
	}
	out := []int32{res.Token}
	for i := 1; i < n; i++ {
		p := int32(len(prompt) + i - 1)
		if res, err = c.Step(ctx, pipeline.StepInput{Positions: []int32{p}, Tokens: []int32{res.Token}, WantLogits: i == n-1}); err != nil {
			t.Fatal(err)
		}
		out = append(out, res.Token)
	}
	return out, res.Logits
}

// cuts lists every way to split layers into k contiguous non-empty ranges.
func cuts(layers, k int) [][]shard.Range {
	if k == 1 {
		return [][]shard.Range{{{Start: 0, End: layers}}}
	}
	var all [][]shard.Range
	var rec func(start, left int, acc []shard.Range)
	rec = func(start, left int, acc []shard.Range) {
		if left == 1 {
			all = append(all, append(slices.Clone(acc), shard.Range{Start: start, End: layers}))
			return
		}
		for end := start + 1; end <= layers-(left-1); end++ {
			rec(end, left-1, append(acc, shard.Range{Start: start, End: end}))
		}
	}
	rec(0, k, nil)
	return all
}

// TestSplitMatchesWhole is the split == whole oracle: every way to cut the tiny model into 2,
// 3 and 4 stages, with activations crossing an f32 codec as on the wire, gives the same 64
// greedy tokens as the whole model, and last-step logits within 1e-4.
func TestSplitMatchesWhole(t *testing.T) {
	for _, typ := range []string{"f32", "q8_0", "q4_0"} {
		t.Run(typ, func(t *testing.T) {
			path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: typ})
			info, err := shard.ReadModelInfo(path)
			if err != nil {
				t.Fatal(err)
			}
			tok, err := shard.LoadTokenizer(path)
			if err != nil {
				t.Fatal(err)
			}
			prompt, err := tok.Encode("Strata splits a model across machines.", true)
			if err != nil {
				t.Fatal(err)
			}
			pool := &stagePool{t: t, path: path, dir: t.TempDir(), cache: map[shard.Range]*shard.Stage{}}
			session := uint64(1)
			run := func(ranges []shard.Range) ([]int32, []float32) {
				var stages []*shard.Stage
				for _, r := range ranges {
					stages = append(stages, pool.get(r))
				}
				session++
				c, err := pipeline.OpenLocalChain(stages, session, quant.CodecF32)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close(context.Background())
				toks, _ := greedy(t, c, prompt, 64)
				c2, err := pipeline.OpenLocalChain(stages, session+1<<32, quant.CodecF32)
				if err != nil {
					t.Fatal(err)
				}
				defer c2.Close(context.Background())
				// Logits of the last step: replay prompt + 63 tokens, then ask for them.
				_, logits := greedy(t, c2, append(slices.Clone(prompt), toks[:63]...), 1)
				return toks, logits
			}
			wantToks, wantLogits := run(cuts(info.Layers, 1)[0])
			t.Logf("whole model, 64 greedy tokens: %q", decode(t, tok, wantToks))
			var worst float64
			splits := 0
			for k := 2; k <= 4; k++ {
				for _, rs := range cuts(info.Layers, k) {
					toks, logits := run(rs)
					splits++
					if !slices.Equal(toks, wantToks) {
						t.Fatalf("split %v: tokens differ from the whole model\n got %v\nwant %v", rs, toks, wantToks)
					}
					for i := range logits {
						worst = math.Max(worst, math.Abs(float64(logits[i]-wantLogits[i])))
					}
				}
			}
			t.Logf("%d splits: identical greedy tokens; max |logit diff| at the last step %.3g", splits, worst)
			if worst > 1e-4 {
				t.Fatalf("logits differ by %.3g > 1e-4", worst)
			}
		})
	}
}

func decode(t *testing.T, tok *shard.Tokenizer, ids []int32) string {
	s, err := tok.Decode(ids)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(s)
}
