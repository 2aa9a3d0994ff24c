package testkit

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ollamaModule is the engine's module; its source ships Llama 3.2's BPE vocabulary as test data,
// which is where synthesized models get a real tokenizer from.
const ollamaModule = "github.com/ollama/ollama@v0.24.0"

// VocabDir finds the directory holding Llama 3's encoder.json and vocab.bpe: $STRATA_VOCAB_DIR,
// the path the Docker image installs them to, or the Go module cache.
func VocabDir() (string, error) {
	var tried []string
	try := func(dir string) bool {
		if dir == "" {
			return false
		}
		tried = append(tried, dir)
		_, err := os.Stat(filepath.Join(dir, "encoder.json"))
		return err == nil
	}
	if d := os.Getenv("STRATA_VOCAB_DIR"); try(d) {
		return d, nil
	}
	if d := "/usr/share/strata/vocab"; try(d) {
		return d, nil
	}
	var caches []string
	if c := os.Getenv("GOMODCACHE"); c != "" {
		caches = append(caches, c)
	}
	if out, err := exec.Command("go", "env", "GOMODCACHE").Output(); err == nil {
		caches = append(caches, strings.TrimSpace(string(out)))
	}
	if p := os.Getenv("GOPATH"); p != "" {
		caches = append(caches, filepath.Join(filepath.SplitList(p)[0], "pkg", "mod"))
	}
	if h, err := os.UserHomeDir(); err == nil {
		caches = append(caches, filepath.Join(h, "go", "pkg", "mod"))
	}
	for _, c := range caches {
		if d := filepath.Join(c, ollamaModule, "tokenizer", "testdata", "llama3.2"); try(d) {
			return d, nil
		}
	}
	return "", fmt.Errorf("llama 3 vocabulary not found (tried %s): run `go mod download %s` or set STRATA_VOCAB_DIR",
		strings.Join(tried, ", "), strings.Split(ollamaModule, "@")[0])
}

// Vocab is a byte-level BPE vocabulary with Llama 3's special tokens appended.
type Vocab struct {
	Tokens []string
	Types  []int32
	Merges []string
	BOS    int32 // <|begin_of_text|>
	EOS    int32 // <|end_of_text|>
	EOT    int32 // <|eot_id|>, the end of a chat turn
}

const (
	tokenNormal  = 1
	tokenControl = 3
	llama3Base   = 128000 // regular tokens in Llama 3's vocabulary; 256 special ones follow
)

// llama3Special names Llama 3.1's special tokens by their offset from the first one.
func llama3Special(i int) string {
	switch i {
	case 0:
		return "<|begin_of_text|>"
	case 1:
		return "<|end_of_text|>"
	case 4:
		return "<|finetune_right_pad_id|>"
	case 6:
		return "<|start_header_id|>"
	case 7:
		return "<|end_header_id|>"
	case 8:
		return "<|eom_id|>"
	case 9:
		return "<|eot_id|>"
	case 10:
		return "<|python_tag|>"
	}
	r := i - 8 // reserved tokens are numbered around the named ones
	switch {
	case i < 4:
		r = i - 2
	case i == 5:
		r = 2
	}
	return fmt.Sprintf("<|reserved_special_token_%d|>", r)
}

// LoadVocab reads Llama 3's vocabulary from dir, keeping the first n regular tokens (0: all
// 128000) and the merges among them, then appends the 256 special tokens.
func LoadVocab(dir string, n int) (*Vocab, error) {
	if n <= 0 || n > llama3Base {
		n = llama3Base
	}
	if n < 256 {
		return nil, fmt.Errorf("vocabulary of %d tokens cannot hold the 256 byte tokens", n)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "encoder.json"))
	if err != nil {
		return nil, fmt.Errorf("load vocabulary: %w", err)
	}
	var enc map[string]int
	if err := json.Unmarshal(raw, &enc); err != nil {
		return nil, fmt.Errorf("load vocabulary: encoder.json: %w", err)
	}
	v := &Vocab{Tokens: make([]string, n+256), Types: make([]int32, n+256)}
	kept := make(map[string]bool, n)
	for tok, id := range enc {
		if id >= 0 && id < n {
			v.Tokens[id] = tok
			v.Types[id] = tokenNormal
			kept[tok] = true
		}
	}
	for id := range n {
		if v.Tokens[id] == "" {
			return nil, fmt.Errorf("load vocabulary: encoder.json has no token %d", id)
		}
	}
	for i := range 256 {
		v.Tokens[n+i] = llama3Special(i)
		v.Types[n+i] = tokenControl
	}
	v.BOS, v.EOS, v.EOT = int32(n), int32(n+1), int32(n+9)

	f, err := os.Open(filepath.Join(dir, "vocab.bpe"))
	if err != nil {
		return nil, fmt.Errorf("load vocabulary: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#version") {
			continue
		}
		a, b, ok := strings.Cut(line, " ")
		if ok && kept[a] && kept[b] && kept[a+b] {
			v.Merges = append(v.Merges, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("load vocabulary: vocab.bpe: %w", err)
	}
	if len(v.Merges) == 0 {
		return nil, errors.New("load vocabulary: no merges survived")
	}
	return v, nil
}
