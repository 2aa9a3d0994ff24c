package grammar

import (
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/ollama/ollama/tokenizer"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline/sample"
)

const llamaPretokenizer = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`

var llama3 struct {
	once sync.Once
	tok  tokenizer.Tokenizer
	v    *Vocab
	eos  int32
	err  error
}

// llama3Vocab is Llama 3's full 128256-token vocabulary, read by the synthesizer's loader.
func llama3Vocab(tb testing.TB) (tokenizer.Tokenizer, *Vocab, int32) {
	tb.Helper()
	llama3.once.Do(func() {
		dir, err := testkit.VocabDir()
		if err != nil {
			llama3.err = err
			return
		}
		tv, err := testkit.LoadVocab(dir, 0)
		if err != nil {
			llama3.err = err
			return
		}
		voc := &tokenizer.Vocabulary{Values: tv.Tokens, Types: tv.Types, Merges: tv.Merges, BOS: []int32{tv.BOS}, EOS: []int32{tv.EOS, tv.EOT}, AddBOS: true}
		llama3.tok = tokenizer.NewBytePairEncoding(voc, llamaPretokenizer)
		llama3.v, llama3.err = VocabFromTokenizer(llama3.tok)
		llama3.eos = tv.EOT
	})
	if llama3.err != nil {
		tb.Skipf("llama 3 vocabulary: %v", llama3.err)
	}
	return llama3.tok, llama3.v, llama3.eos
}

func TestLlama3VocabWalks(t *testing.T) {
	_, v, eos := llama3Vocab(t)
	if v.Size() != 128256 {
		t.Fatalf("vocabulary of %d tokens", v.Size())
	}
	for i, s := range walkSchemas[:3] {
		c := NewConstraint(mustSchema(t, s), v)
		for seed := range uint64(3) {
			text := walk(t, c, v, eos, rand.New(rand.NewPCG(seed, uint64(i))), 40+20*int(seed))
			if err := testkit.ValidateJSON([]byte(s), []byte(text)); err != nil {
				t.Errorf("schema %d seed %d: %v", i, seed, err)
			}
		}
	}
}

// benchDoc is what a model typically writes for personSchema.
const benchDoc = `{"name": "Ada Lovelace, first programmer of the Analytical Engine", "age": 36, "tags": ["a", "ab"], "ok": true, "x": 12.5}`

// BenchmarkSampleStep is the sampler's time per token over Llama 3's 128256 logits, without
// a grammar and with one (the mask computed by a trie walk, or found in the cache, then
// applied), along a document a model would write for personSchema.
func BenchmarkSampleStep(b *testing.B) {
	tok, v, _ := llama3Vocab(b)
	ids, err := tok.Encode(benchDoc, false)
	if err != nil {
		b.Fatal(err)
	}
	g := mustSchema(b, personSchema)
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]float32, v.Size())
	for i := range model {
		model[i] = float32(rng.NormFloat64() * 3)
	}
	logits := make([]float32, v.Size())
	p := sample.Params{Temperature: 1, Seed: 7}
	for _, mode := range []string{"none", "walk", "cached"} {
		b.Run(mode, func(b *testing.B) {
			var s sample.Sampler
			c := NewConstraint(g, v)
			if mode == "cached" { // one pass to fill the cache
				m := c.Matcher()
				for _, id := range ids {
					m.Mask(0)
					_ = m.Accept(id)
				}
			}
			steps := 0
			var masking time.Duration // finding and applying the masks
			for b.Loop() {
				m := c.Matcher()
				for i, id := range ids {
					copy(logits, model) // fresh logits, as each step brings
					switch mode {
					case "walk":
						t0 := time.Now()
						mask, _, _ := m.compute(nil, -1)
						ApplyMask(logits, mask)
						masking += time.Since(t0)
					case "cached":
						t0 := time.Now()
						ApplyMask(logits, m.Mask(0))
						masking += time.Since(t0)
					}
					s.Sample(logits, p, nil, int32(i))
					if mode != "none" {
						if err := m.Accept(id); err != nil {
							b.Fatal(err)
						}
					}
					steps++
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(steps), "ns/step")
			b.ReportMetric(float64(masking.Nanoseconds())/float64(steps), "mask-ns/step")
		})
	}
}
