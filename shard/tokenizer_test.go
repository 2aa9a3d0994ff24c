package shard_test

import (
	"os"
	"slices"
	"testing"

	"github.com/strata-llm/strata/shard"
)

// TestTokenizerSentencePiece: a Llama 2 vocabulary gets SentencePiece's space prefix, so
// "Hello world" is "▁Hello ▁world" as in llama.cpp (the engine's tokenizer gave 10994 3186).
func TestTokenizerSentencePiece(t *testing.T) {
	const path = "../../shared/conformance/tokenizer/ggml-vocab-llama-spm.gguf"
	if _, err := os.Stat(path); err != nil {
		t.Skipf("llama.cpp's conformance data is not at %s", path)
	}
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode("Hello world", true)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int32{1, 15043, 3186}; !slices.Equal(ids, want) {
		t.Fatalf("got %v, want %v", ids, want)
	}
	if tok.BOS != "<s>" || tok.EOS != "</s>" || !tok.IsEOS(2) || !tok.IsControl(1) {
		t.Fatalf("specials: BOS %q EOS %q", tok.BOS, tok.EOS)
	}
	if text, _ := tok.Decode(ids[1:]); text != " Hello world" {
		t.Fatalf("decode: %q", text)
	}
	if got := string(tok.TokenBytes(15043)); got != " Hello" {
		t.Fatalf("TokenBytes: %q", got)
	}
}
