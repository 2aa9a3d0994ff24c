package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// TestTokenize: ids on one line separated by single spaces, BOS only with --special, pieces
// on a second line, text from an argument or standard input; the ids are the tokenizer's.
func TestTokenize(t *testing.T) {
	m := testkit.TinyModel(t)
	tok, err := shard.LoadTokenizer(m)
	if err != nil {
		t.Fatal(err)
	}
	const text = "Hello world, again"
	ids, err := tok.Encode(text, false)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, id := range ids {
		want = append(want, strconv.Itoa(int(id)))
	}
	out := run(t, "model", "tokenize", "--model", m, text)
	if out != strings.Join(want, " ")+"\n" {
		t.Fatalf("got %q, want %q", out, strings.Join(want, " "))
	}
	special := run(t, "model", "tokenize", "--model", m, "--special", "--pieces", text)
	lines := strings.Split(strings.TrimSuffix(special, "\n"), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[0], " "+strings.Join(want, " ")) || len(strings.Fields(lines[0])) != len(ids)+1 {
		t.Fatalf("--special --pieces: %q", special)
	}
	var joined strings.Builder
	for _, q := range strings.Split(lines[1], `" "`) {
		p, err := strconv.Unquote(`"` + strings.Trim(q, `"`) + `"`)
		if err != nil {
			t.Fatalf("piece %q: %v", q, err)
		}
		joined.WriteString(p)
	}
	if joined.String() != tok.BOS+text {
		t.Fatalf("pieces %q join to %q", lines[1], joined.String())
	}

	cmd := NewRootCommand()
	var buf bytes.Buffer
	cmd.SetOut(&buf)
	cmd.SetErr(&buf)
	cmd.SetIn(strings.NewReader(text))
	cmd.SetArgs([]string{"model", "tokenize", "--model", m, "-"})
	if err := cmd.ExecuteContext(context.Background()); err != nil || buf.String() != out {
		t.Fatalf("stdin: %q %v, want %q", buf.String(), err, out)
	}
}

// TestTokenizeVocabOnly: a vocabulary-only GGUF from llama.cpp's suite tokenizes, its ids
// matching the suite's for the first case.
func TestTokenizeVocabOnly(t *testing.T) {
	// ../shared from the repository root; tests run in cli/.
	vocab := filepath.Join("..", "..", "shared", "conformance", "tokenizer", "ggml-vocab-llama-spm.gguf")
	if _, err := os.Stat(vocab); err != nil {
		t.Skipf("llama.cpp's vocabularies are not here (../shared/conformance/tokenizer): %v", err)
	}
	out := run(t, "model", "tokenize", "--model", vocab, "--pieces", "Hello world")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 2 || len(strings.Fields(lines[0])) == 0 {
		t.Fatalf("vocabulary-only tokenize: %q", out)
	}
}
