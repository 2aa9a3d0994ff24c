package tokenizer

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/strata-llm/strata/internal/gguf"
)

// conformanceDir holds llama.cpp's tokenizer test data (../shared/conformance/tokenizer,
// from the repository root).
const conformanceDir = "../../shared/conformance/tokenizer"

type vocabCase struct {
	text string
	ids  []int32
}

// readCases reads a .inp/.out pair as llama.cpp's test-tokenizer-0 does.
func readCases(t testing.TB, base string) []vocabCase {
	t.Helper()
	inp, err := os.ReadFile(base + ".inp")
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.ReadFile(base + ".out")
	if err != nil {
		t.Fatal(err)
	}
	texts := strings.Split(string(inp), "\n__ggml_vocab_test__\n")
	if texts[len(texts)-1] == "" {
		texts = texts[:len(texts)-1]
	}
	lines := strings.Split(string(out), "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(texts) != len(lines) {
		t.Fatalf("%s: %d texts, %d lines of ids", base, len(texts), len(lines))
	}
	cases := make([]vocabCase, len(texts))
	for i := range texts {
		cases[i].text = texts[i]
		for _, f := range strings.Fields(lines[i]) {
			id, err := strconv.Atoi(f)
			if err != nil {
				t.Fatalf("%s line %d: %v", base, i+1, err)
			}
			cases[i].ids = append(cases[i].ids, int32(id))
		}
	}
	return cases
}

func loadGGUFVocab(t testing.TB, path string) *Tokenizer {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	meta, err := gguf.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	v, err := FromMetadata(meta.KV())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := New(v)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// llama3Dir finds Llama 3's encoder.json and vocab.bpe in the engine module's test data, as
// internal/testkit does (which links ggml, so it is not used here).
func llama3Dir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("STRATA_VOCAB_DIR"); d != "" {
		return d
	}
	if _, err := os.Stat("/usr/share/strata/vocab/encoder.json"); err == nil {
		return "/usr/share/strata/vocab"
	}
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		t.Skipf("go env GOMODCACHE: %v", err)
	}
	d := filepath.Join(strings.TrimSpace(string(out)), "github.com/ollama/ollama@v0.24.0/tokenizer/testdata/llama3.2")
	if _, err := os.Stat(filepath.Join(d, "encoder.json")); err != nil {
		t.Skipf("Llama 3 vocabulary not found in %s: run go mod download", d)
	}
	return d
}

var (
	llama3Once sync.Once
	llama3Tok  *Tokenizer
	llama3Err  error
)

// llama3 builds Llama 3's tokenizer as the synthesizer writes it: the 128000 BPE tokens of
// encoder.json, vocab.bpe's merges, and the 256 special tokens (control type) after them.
func llama3(t testing.TB) *Tokenizer {
	t.Helper()
	dir := llama3Dir(t)
	llama3Once.Do(func() {
		raw, err := os.ReadFile(filepath.Join(dir, "encoder.json"))
		if err != nil {
			llama3Err = err
			return
		}
		var enc map[string]int
		if llama3Err = json.Unmarshal(raw, &enc); llama3Err != nil {
			return
		}
		const base = 128000
		v := Vocab{Model: "gpt2", Pre: "llama-bpe", Tokens: make([]string, base+256), Types: make([]int32, base+256),
			BOS: base, EOS: base + 9, UNK: None, SEP: None, EOT: None, EOM: None, AddBOS: true, EOG: []int32{base + 1}}
		for s, id := range enc {
			if id < base {
				v.Tokens[id], v.Types[id] = s, TypeNormal
			}
		}
		for i := range 256 {
			v.Tokens[base+i], v.Types[base+i] = llama3Special(i), TypeControl
		}
		f, err := os.Open(filepath.Join(dir, "vocab.bpe"))
		if err != nil {
			llama3Err = err
			return
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<16), 1<<20)
		for sc.Scan() {
			if line := sc.Text(); !strings.HasPrefix(line, "#version") {
				v.Merges = append(v.Merges, line)
			}
		}
		if llama3Err = sc.Err(); llama3Err != nil {
			return
		}
		llama3Tok, llama3Err = New(v)
	})
	if llama3Err != nil {
		t.Fatal(llama3Err)
	}
	return llama3Tok
}

func llama3Special(i int) string {
	names := map[int]string{0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
		6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
	if s, ok := names[i]; ok {
		return s
	}
	r := i - 8
	switch {
	case i < 4:
		r = i - 2
	case i == 5:
		r = 2
	}
	return fmt.Sprintf("<|reserved_special_token_%d|>", r)
}

// vocabularies lists the conformance pairs with a vocabulary to run them on.
func vocabularies(t *testing.T) map[string]func(testing.TB) *Tokenizer {
	t.Helper()
	if _, err := os.Stat(conformanceDir); err != nil {
		t.Skipf("llama.cpp's tokenizer conformance data is not at %s (../shared/conformance/tokenizer beside the repository)", conformanceDir)
	}
	m := map[string]func(testing.TB) *Tokenizer{"llama-bpe": llama3}
	ggufs, _ := filepath.Glob(filepath.Join(conformanceDir, "ggml-vocab-*.gguf"))
	for _, path := range ggufs {
		name := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "ggml-vocab-"), ".gguf")
		m[name] = func(t testing.TB) *Tokenizer { return loadGGUFVocab(t, path) }
	}
	return m
}

// TestConformance: every case of llama.cpp's tokenizer tests gives llama.cpp's ids (no BOS,
// special tokens not parsed, as test-tokenizer-0 runs them), and decodes back to its text.
func TestConformance(t *testing.T) {
	for name, load := range vocabularies(t) {
		t.Run(name, func(t *testing.T) {
			base := filepath.Join(conformanceDir, "ggml-vocab-"+name+".gguf")
			if ok, _ := exists(base + ".inp"); !ok {
				t.Skipf("no test strings for %s", name)
			}
			tok := load(t)
			cases := readCases(t, base)
			passed := 0
			for i, c := range cases {
				ok := t.Run(strconv.Itoa(i), func(t *testing.T) {
					got, err := tok.Tokenize(context.Background(), c.text, Options{})
					if err != nil {
						t.Fatal(err)
					}
					if !equal(got, c.ids) {
						t.Fatalf("%q:\n got %v\nwant %v", c.text, got, c.ids)
					}
					if tok.kind == kindWPM {
						return // WordPiece normalizes: no inverse
					}
					back, err := tok.DecodeText(got)
					if err != nil {
						t.Fatal(err)
					}
					if back != c.text {
						t.Fatalf("round trip %q gives %q", c.text, back)
					}
				})
				if ok {
					passed++
				}
			}
			t.Logf("%s: %d/%d cases", name, passed, len(cases))
		})
	}
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func warAndPeace(t testing.TB) string {
	t.Helper()
	dir := llama3Dir(t)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(dir), "war-and-peace.txt"))
	if err != nil {
		t.Skipf("war-and-peace.txt: %v", err)
	}
	return string(b)
}

// TestRoundTripWarAndPeace: a whole novel decodes back to itself on every vocabulary.
func TestRoundTripWarAndPeace(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	text := warAndPeace(t)
	for name, load := range vocabularies(t) {
		t.Run(name, func(t *testing.T) {
			tok := load(t)
			if tok.kind == kindWPM {
				t.Skip("WordPiece normalizes: no inverse")
			}
			ids, err := tok.Encode(text, false)
			if err != nil {
				t.Fatal(err)
			}
			back, err := tok.DecodeText(ids)
			if err != nil {
				t.Fatal(err)
			}
			if back != text {
				i := 0
				for i < len(back) && i < len(text) && back[i] == text[i] {
					i++
				}
				t.Fatalf("round trip differs at byte %d: %q vs %q", i, back[i:min(len(back), i+40)], text[i:min(len(text), i+40)])
			}
		})
	}
}

func exists(path string) (bool, error) {
	_, err := os.Stat(path)
	return err == nil, err
}
