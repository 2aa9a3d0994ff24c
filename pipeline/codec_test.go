package pipeline_test

import (
	"context"
	"math"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// TestCodecDivergence measures what each wire codec costs against f32 on a model split in
// three: how many greedy tokens agree before the first difference, over several prompts, and
// the largest logit difference at the first step. f16 must agree on the tiny model; the 8-bit
// codec's divergence is reported (it is what the README's codec table quotes).
func TestCodecDivergence(t *testing.T) {
	const n = 64
	for _, preset := range []string{"tiny", "small"} {
		if preset == "small" && testing.Short() {
			continue
		}
		path := testkit.Model(t, testkit.SynthOptions{Preset: preset, Seed: 1, Type: "f16"})
		info, err := shard.ReadModelInfo(path)
		if err != nil {
			t.Fatal(err)
		}
		tok, err := shard.LoadTokenizer(path)
		if err != nil {
			t.Fatal(err)
		}
		pool := &stagePool{t: t, path: path, dir: t.TempDir(), cache: map[shard.Range]*shard.Stage{}}
		var stages []*shard.Stage
		third := info.Layers / 3
		for _, r := range []shard.Range{{Start: 0, End: third}, {Start: third, End: 2 * third}, {Start: 2 * third, End: info.Layers}} {
			stages = append(stages, pool.get(r))
		}
		prompts := []string{"The history of", "Once upon a time", "func main() {", "Strata pools machines", "1, 2, 3, 4,"}
		session := uint64(1000)
		run := func(c quant.Codec, prompt []int32) ([]int32, []float32) {
			session++
			ch, err := pipeline.OpenLocalChain(stages, session, c)
			if err != nil {
				t.Fatal(err)
			}
			defer ch.Close(context.Background())
			toks, _ := greedy(t, ch, prompt, n)
			session++
			ch2, err := pipeline.OpenLocalChain(stages, session, c)
			if err != nil {
				t.Fatal(err)
			}
			defer ch2.Close(context.Background())
			_, logits := greedy(t, ch2, prompt, 1)
			return toks, logits
		}
		for _, c := range []quant.Codec{quant.CodecF16, quant.CodecQ8} {
			agreeTotal, worst := 0, 0.0
			for _, p := range prompts {
				ids, err := tok.Encode(p, true)
				if err != nil {
					t.Fatal(err)
				}
				ref, refLogits := run(quant.CodecF32, ids)
				got, logits := run(c, ids)
				agree := 0
				for agree < n && got[agree] == ref[agree] {
					agree++
				}
				agreeTotal += agree
				for i := range logits {
					worst = math.Max(worst, math.Abs(float64(logits[i]-refLogits[i])))
				}
			}
			bytes, _ := quant.EncodedSize(c, info.Hidden)
			t.Logf("%s (hidden %d, %d layers, 3 stages) codec %s: %d B/token/hop (f32 %d); greedy tokens equal to f32 before the first difference: %d of %d over %d prompts; max |logit diff| at step 1: %.3g",
				preset, info.Hidden, info.Layers, c, bytes, 4*info.Hidden, agreeTotal, n*len(prompts), len(prompts), worst)
			if c == quant.CodecF16 && preset == "tiny" && agreeTotal != n*len(prompts) {
				t.Errorf("f16 diverged from f32 on the tiny model: %d of %d tokens agree", agreeTotal, n*len(prompts))
			}
		}
	}
}
