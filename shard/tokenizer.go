package shard

import (
	"fmt"
	"os"
	"path/filepath"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/ollama/ollama/tokenizer"

	"github.com/strata-llm/strata/internal/gguf"
)

// Tokenizer turns text into the model's token ids and back, with the special tokens a chat
// needs. Every node can build it from any slice file: the vocabulary is in the metadata.
type Tokenizer struct {
	tokenizer.Tokenizer
	BOS, EOS string // texts of the first BOS and EOS tokens, for chat templates
}

// llamaPretokenizer is the regex Llama 3's byte-level BPE splits text with before merging.
const llamaPretokenizer = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`

// pretokenizer is the split regex for a GGUF's tokenizer.ggml.pre, as the engine's llama
// model chooses it: Qwen splits digits one by one, Mistral's tekken splits by case.
func pretokenizer(pre string) string {
	switch pre {
	case "qwen2":
		return `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	case "tekken":
		return `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	}
	return llamaPretokenizer
}

// LoadTokenizer reads the tokenizer block of a GGUF file.
func LoadTokenizer(path string) (*Tokenizer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	defer f.Close()
	meta, err := gguf.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer from %s: %w", filepath.Base(path), err)
	}
	return newTokenizer(meta.KV())
}

func newTokenizer(kv fsggml.KV) (*Tokenizer, error) {
	v := &tokenizer.Vocabulary{
		Values: kv.Strings("tokenizer.ggml.tokens"),
		Scores: kv.Floats("tokenizer.ggml.scores"),
		Types:  kv.Ints("tokenizer.ggml.token_type"),
		Merges: kv.Strings("tokenizer.ggml.merges"),
		AddBOS: kv.Bool("tokenizer.ggml.add_bos_token", true),
		BOS:    []int32{int32(kv.Uint("tokenizer.ggml.bos_token_id"))},
		AddEOS: kv.Bool("tokenizer.ggml.add_eos_token", false),
		EOS:    append([]int32{int32(kv.Uint("tokenizer.ggml.eos_token_id"))}, kv.Ints("tokenizer.ggml.eos_token_ids")...),
	}
	if len(v.Values) == 0 {
		return nil, fmt.Errorf("load tokenizer: the model has no tokenizer.ggml.tokens")
	}
	if len(v.Types) != len(v.Values) {
		return nil, fmt.Errorf("load tokenizer: %d token types for %d tokens", len(v.Types), len(v.Values))
	}
	for _, id := range append(append([]int32{}, v.BOS...), v.EOS...) {
		if id < 0 || int(id) >= len(v.Values) {
			return nil, fmt.Errorf("load tokenizer: special token id %d outside the vocabulary of %d", id, len(v.Values))
		}
	}
	var t tokenizer.Tokenizer
	switch model := kv.String("tokenizer.ggml.model"); model {
	case "gpt2":
		t = tokenizer.NewBytePairEncoding(v, pretokenizer(kv.String("tokenizer.ggml.pre")))
	case "llama":
		t = tokenizer.NewSentencePiece(v)
	default:
		return nil, fmt.Errorf("load tokenizer: unsupported tokenizer model %q", model)
	}
	return &Tokenizer{Tokenizer: t, BOS: v.Values[v.BOS[0]], EOS: v.Values[v.EOS[0]]}, nil
}
