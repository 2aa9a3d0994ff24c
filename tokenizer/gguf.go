package tokenizer

import "fmt"

// Metadata is the part of a GGUF key-value table the vocabulary is read from; the engine's
// fs/ggml KV has these methods.
type Metadata interface {
	String(key string, defaultValue ...string) string
	Strings(key string, defaultValue ...[]string) []string
	Ints(key string, defaultValue ...[]int32) []int32
	Floats(key string, defaultValue ...[]float32) []float32
	Uint(key string, defaultValue ...uint32) uint32
	Bool(key string, defaultValue ...bool) bool
	Value(key string) any
}

// FromMetadata reads a vocabulary from GGUF metadata with llama.cpp's defaults for each
// tokenizer model.
func FromMetadata(kv Metadata) (Vocab, error) {
	v := Vocab{
		Model:  kv.String("tokenizer.ggml.model"),
		Pre:    kv.String("tokenizer.ggml.pre"),
		Tokens: kv.Strings("tokenizer.ggml.tokens"),
		Scores: kv.Floats("tokenizer.ggml.scores"),
		Types:  kv.Ints("tokenizer.ggml.token_type"),
		Merges: kv.Strings("tokenizer.ggml.merges"),
		BOS:    None, EOS: None, UNK: None, SEP: None, EOT: None, EOM: None,
		EOG: kv.Ints("tokenizer.ggml.eos_token_ids"),
	}
	if len(v.Tokens) == 0 {
		return v, fmt.Errorf("read vocabulary: no tokenizer.ggml.tokens")
	}
	if v.Scores != nil && len(v.Scores) < len(v.Tokens) {
		return v, fmt.Errorf("read vocabulary: %d scores for %d tokens", len(v.Scores), len(v.Tokens))
	}
	if v.Types != nil && len(v.Types) < len(v.Tokens) {
		return v, fmt.Errorf("read vocabulary: %d token types for %d tokens", len(v.Types), len(v.Tokens))
	}
	if v.Scores != nil {
		v.Scores = v.Scores[:len(v.Tokens)]
	}
	if v.Types != nil {
		v.Types = v.Types[:len(v.Tokens)]
	}
	switch v.Model {
	case "llama":
		v.BOS, v.EOS, v.UNK = 1, 2, 0
		v.AddBOS, v.AddSpacePrefix = true, true
	case "bert":
		v.BOS, v.UNK, v.SEP = 101, 100, 102
		v.AddBOS, v.AddSEP = true, true
		v.Lowercase = true
	case "gpt2":
		v.BOS, v.EOS = 11, 11
		if v.Merges == nil {
			return v, fmt.Errorf("read vocabulary: no tokenizer.ggml.merges")
		}
		switch v.Pre {
		case "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "tekken":
			v.AddBOS = true
		case "glm4", "chatglm-bpe":
			v.BOS = None
		}
	default:
		return v, fmt.Errorf("read vocabulary: unsupported tokenizer model %q", v.Model)
	}
	for key, p := range map[string]*int32{
		"tokenizer.ggml.bos_token_id": &v.BOS, "tokenizer.ggml.eos_token_id": &v.EOS,
		"tokenizer.ggml.unknown_token_id": &v.UNK, "tokenizer.ggml.seperator_token_id": &v.SEP,
		"tokenizer.ggml.eot_token_id": &v.EOT, "tokenizer.ggml.eom_token_id": &v.EOM,
	} {
		if int(*p) >= len(v.Tokens) {
			*p = None
		}
		if kv.Value(key) != nil {
			if id := kv.Uint(key, 1<<31); id < uint32(len(v.Tokens)) {
				*p = int32(id)
			}
		}
	}
	for key, p := range map[string]*bool{
		"tokenizer.ggml.add_bos_token": &v.AddBOS, "tokenizer.ggml.add_eos_token": &v.AddEOS,
		"tokenizer.ggml.add_sep_token": &v.AddSEP, "tokenizer.ggml.add_space_prefix": &v.AddSpacePrefix,
		"tokenizer.ggml.normalizer.lowercase": &v.Lowercase,
	} {
		if kv.Value(key) != nil {
			*p = kv.Bool(key)
		}
	}
	v.StripAccents = v.Lowercase
	if kv.Value("tokenizer.ggml.normalizer.strip_accents") != nil {
		v.StripAccents = kv.Bool("tokenizer.ggml.normalizer.strip_accents")
	}
	return v, nil
}
