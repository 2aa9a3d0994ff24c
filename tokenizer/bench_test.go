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

// BenchmarkEncodeWarAndPeace: tokens/s on a novel, this package against the engine's.
// Run with -bench EncodeWarAndPeace -benchtime 3x.
func BenchmarkEncodeWarAndPeace(b *testing.B) {
	text := warAndPeace(b)
	report := func(b *testing.B, n int) {
		b.SetBytes(int64(len(text)))
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
	}
	b.Run("strata/llama-bpe", func(b *testing.B) {
		tok := llama3(b)
		b.ResetTimer()
		var n int
		for range b.N {
			ids, err := tok.Encode(text, false)
			if err != nil {
				b.Fatal(err)
			}
			n = len(ids)
		}
		report(b, n)
	})
	b.Run("engine/llama-bpe", func(b *testing.B) {
		tok := engineLlama3(b)
		b.ResetTimer()
		var n int
		for range b.N {
			ids, err := tok.Encode(text, false)
			if err != nil {
				b.Fatal(err)
			}
			n = len(ids)
		}
		report(b, n)
	})
	if _, err := filepath.Glob(conformanceDir); err == nil {
		for _, name := range []string{"llama-spm", "gpt-2", "deepseek-llm"} {
			b.Run("strata/"+name, func(b *testing.B) {
				path := filepath.Join(conformanceDir, "ggml-vocab-"+name+".gguf")
				tok := loadGGUFVocab(b, path)
				b.ResetTimer()
				var n int
				for range b.N {
					ids, err := tok.Encode(text, false)
					if err != nil {
						b.Fatal(err)
					}
					n = len(ids)
				}
				report(b, n)
			})
		}
	}
}
