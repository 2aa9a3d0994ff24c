package tokenizer

import (
	"path/filepath"
	"testing"

	engine "github.com/ollama/ollama/tokenizer"
)

// engineLlama3 is the engine's tokenizer on the same Llama 3 vocabulary, built as
// shard/tokenizer.go built it before this package.
func engineLlama3(b *testing.B) engine.Tokenizer {
	tok := llama3(b)
	v := &engine.Vocabulary{Values: tok.v.Tokens, Types: tok.v.Types, Merges: tok.v.Merges,
		AddBOS: true, BOS: []int32{tok.v.BOS}, EOS: []int32{tok.v.EOS}}
	return engine.NewBytePairEncoding(v,
		`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`)
}

// textEncoder is what the benchmark needs of a tokenizer, this package's or the engine's.
type textEncoder interface {
	Encode(text string, addSpecial bool) ([]int32, error)
}

// BenchmarkEncodeWarAndPeace: tokens/s on a novel, this package against the engine's.
// Run with -bench EncodeWarAndPeace -benchtime 3x.
func BenchmarkEncodeWarAndPeace(b *testing.B) {
	text := warAndPeace(b)
	// encode times one tokenizer, built outside the timing.
	encode := func(name string, build func(b *testing.B) textEncoder) {
		b.Run(name, func(b *testing.B) {
			tok := build(b)
			b.ResetTimer()
			var n int
			for range b.N {
				ids, err := tok.Encode(text, false)
				if err != nil {
					b.Fatal(err)
				}
				n = len(ids)
			}
			b.SetBytes(int64(len(text)))
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
	encode("strata/llama-bpe", func(b *testing.B) textEncoder {
		return llama3(b)
	})
	encode("engine/llama-bpe", func(b *testing.B) textEncoder {
		return engineLlama3(b)
	})
	if _, err := filepath.Glob(conformanceDir); err == nil {
		for _, name := range []string{"llama-spm", "gpt-2", "deepseek-llm"} {
			encode("strata/"+name, func(b *testing.B) textEncoder {
				return loadGGUFVocab(b, filepath.Join(conformanceDir, "ggml-vocab-"+name+".gguf"))
			})
		}
	}
}
