package shard

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	fsggml "github.com/ollama/ollama/fs/ggml"
	enginetok "github.com/ollama/ollama/tokenizer"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/tokenizer"
)

// Tokenizer turns text into the model's token ids and back, with the special tokens a chat
// needs. Every node can build it from any slice file: the vocabulary is in the metadata.
// The ids are llama.cpp's (Strata's own tokenizer package, held against llama.cpp's tests).
type Tokenizer struct {
	*tokenizer.Tokenizer
	BOS, EOS string // texts of the BOS and EOS tokens, for chat templates ("" if none)

	bos int32
	eos map[int32]bool // tokenizer.ggml.eos_token_id and eos_token_ids

	vocabOnce sync.Once
	vocab     *enginetok.Vocabulary
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
	v, err := tokenizer.FromMetadata(kv)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	for _, id := range v.EOG {
		if id < 0 || int(id) >= len(v.Tokens) {
			return nil, fmt.Errorf("load tokenizer: special token id %d outside the vocabulary of %d", id, len(v.Tokens))
		}
	}
	tok, err := tokenizer.New(v)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	t := &Tokenizer{Tokenizer: tok, bos: v.BOS, eos: map[int32]bool{}}
	t.BOS, t.EOS = tok.Token(v.BOS), tok.Token(v.EOS)
	for _, id := range append([]int32{v.EOS}, v.EOG...) {
		if id != tokenizer.None {
			t.eos[id] = true
		}
	}
	return t, nil
}

// IsEOS reports whether id is one of the file's end-of-sequence tokens (eos_token_id,
// eos_token_ids), the tokens a generation stops at. IsEOG is llama.cpp's wider set.
func (t *Tokenizer) IsEOS(id int32) bool { return t.eos[id] }

// Is answers for the engine's special classes, as its tokenizer did.
func (t *Tokenizer) Is(id int32, s enginetok.Special) bool {
	switch s {
	case enginetok.SpecialBOS:
		return id == t.bos && id != tokenizer.None
	case enginetok.SpecialEOS:
		return t.IsEOS(id)
	}
	return false
}

// Vocabulary is the vocabulary in the engine's form, for code written against its tokenizer.
//
// Deprecated: use Token, TokenID, Type and IsControl.
func (t *Tokenizer) Vocabulary() *enginetok.Vocabulary {
	t.vocabOnce.Do(func() {
		v := t.Vocab()
		types := make([]int32, t.Size())
		for i := range types {
			types[i] = t.Type(int32(i))
		}
		t.vocab = &enginetok.Vocabulary{Values: v.Tokens, Types: types, Scores: v.Scores, Merges: v.Merges,
			AddBOS: v.AddBOS, AddEOS: v.AddEOS}
		if v.BOS != tokenizer.None {
			t.vocab.BOS = []int32{v.BOS}
		}
		for id := range t.eos {
			t.vocab.EOS = append(t.vocab.EOS, id)
		}
	})
	return t.vocab
}
