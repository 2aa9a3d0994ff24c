package shard

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
)

// sliceOfKey marks a slice file with the digest of the model it was cut from, so a stage
// loaded from a cached slice still names the whole model it belongs to.
const sliceOfKey = "general.strata.slice_of"

// ModelInfo is what Strata needs to know about a GGUF model without loading its weights.
type ModelInfo struct {
	Path          string
	Name          string
	Arch          string
	FileType      string
	Layers        int
	Hidden        int
	Heads         int
	KVHeads       int
	HeadDim       int // of keys
	ValueDim      int
	FFN           int
	Experts       int // mixture of experts: experts per layer (0: dense) and used per token
	ExpertsUsed   int
	ExpertBytes   int64 // all layers' expert tensors (ffn_*_exps), of which a token reads used/count
	Vocab         int
	ContextLength int
	ChatTemplate  string
	// Pooling is how embeddings pool the final hidden states: the file's
	// <arch>.pooling_type when it names one, else the last token's (a decoder model's
	// causal attention sums up the sequence there; it is what Ollama's llama.cpp runner
	// returned for such models).
	Pooling       Pooling
	TiedEmbedding bool   // no output.weight: the LM head reuses token_embd
	SliceOf       string // for a slice file: the sha256 of the whole model it was cut from

	LayerBytes  []int64 // weight bytes of each block
	Windows     []int   // each block's sliding attention window in tokens, 0 for global
	EmbedBytes  int64   // token_embd
	HeadBytes   int64   // output_norm + output (or token_embd when tied)
	TotalBytes  int64   // all tensor bytes in the file
	FileSize    int64
	TensorCount int
}

// KVBytesPerToken is the KV cache size of one token in one layer for a cache of the given
// bytes per element (4 for F32, 2 for F16).
func (m *ModelInfo) KVBytesPerToken(elemBytes int) int64 {
	return int64(m.KVHeads * (m.HeadDim + cmp.Or(m.ValueDim, m.HeadDim)) * elemBytes)
}

// KVTokens is how many tokens of a session of context tokens layer l keeps in its KV cache:
// all of them, or its window and the token being decoded for a sliding-window layer.
func (m *ModelInfo) KVTokens(l, context int) int {
	if l < len(m.Windows) && m.Windows[l] > 0 && m.Windows[l]+1 < context {
		return m.Windows[l] + 1
	}
	return context
}

// RangeKVBytes is the KV cache of layers r for sessions of context tokens each.
func (m *ModelInfo) RangeKVBytes(r Range, context, sessions, elemBytes int) int64 {
	var n int64
	for l := max(r.Start, 0); l < r.End && l < m.Layers; l++ {
		n += int64(m.KVTokens(l, context))
	}
	return n * int64(sessions) * m.KVBytesPerToken(elemBytes)
}

// RangeBytes is the weight bytes a stage serving r loads.
func (m *ModelInfo) RangeBytes(r Range) int64 {
	var n int64
	for l := r.Start; l < r.End && l < len(m.LayerBytes); l++ {
		n += m.LayerBytes[l]
	}
	if r.Start == 0 {
		n += m.EmbedBytes
	}
	if r.End == m.Layers {
		n += m.HeadBytes
	}
	return n
}

// ReadModelInfo reads a GGUF file's metadata and tensor table. It reads no tensor data.
func ReadModelInfo(path string) (*ModelInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open model: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat model: %w", err)
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Base(path), err)
	}
	return modelInfo(path, st.Size(), meta)
}

func modelInfo(path string, size int64, meta *fsggml.GGML) (*ModelInfo, error) {
	kv := meta.KV()
	arch := kv.Architecture()
	fam, err := newFamily(kv)
	if err != nil {
		return nil, err
	}
	m := &ModelInfo{
		Path:          path,
		Name:          kv.String("general.name"),
		Arch:          arch,
		FileType:      kv.FileType().String(),
		Layers:        int(kv.BlockCount()),
		Hidden:        int(kv.EmbeddingLength()),
		Heads:         int(kv.HeadCountMax()),
		KVHeads:       int(kv.HeadCountKVMax()),
		HeadDim:       int(kv.Uint("attention.key_length")),
		ValueDim:      int(kv.Uint("attention.value_length")),
		ContextLength: int(kv.ContextLength()),
		ChatTemplate:  kv.ChatTemplate(),
		FileSize:      size,
		SliceOf:       kv.String(sliceOfKey),
		Pooling:       PoolLast,
	}
	if p := Pooling(kv.Uint("pooling_type")); p >= PoolMean && p <= PoolLast {
		m.Pooling = p
	}
	if ffn := kv.FFNLength(); len(ffn) > 0 {
		m.FFN = int(ffn[0])
	}
	m.Vocab = len(kv.Strings("tokenizer.ggml.tokens"))
	m.Experts, m.ExpertsUsed = int(kv.Uint("expert_count")), int(kv.Uint("expert_used_count"))
	if m.Layers <= 0 || m.Hidden <= 0 || m.Heads <= 0 {
		return nil, fmt.Errorf("model metadata incomplete: block_count=%d embedding_length=%d head_count=%d", m.Layers, m.Hidden, m.Heads)
	}
	if m.KVHeads == 0 {
		m.KVHeads = m.Heads
	}
	if m.HeadDim == 0 || arch == "olmo2" || arch == "olmo3" { // OLMo's heads are hidden/heads whatever the file says
		m.HeadDim = m.Hidden / m.Heads
	}
	if m.ValueDim == 0 || arch == "olmo2" || arch == "olmo3" {
		m.ValueDim = m.HeadDim
	}
	m.Windows = make([]int, m.Layers)
	for l := range m.Windows {
		m.Windows[l] = int(fam.window(l))
	}
	if m.Heads%m.KVHeads != 0 {
		return nil, fmt.Errorf("model metadata inconsistent: %d heads are not a multiple of %d KV heads", m.Heads, m.KVHeads)
	}
	m.LayerBytes = make([]int64, m.Layers)
	var hasOutput bool
	var embd int64
	for _, t := range meta.Tensors().Items() {
		if t.Name == absentOutput {
			continue // a slice's placeholder, not a weight
		}
		m.TensorCount++
		sz := int64(t.Size())
		m.TotalBytes += sz
		switch layer, ok := blockOf(t.Name); {
		case ok && layer >= m.Layers:
			return nil, fmt.Errorf("tensor %s is beyond block_count %d", t.Name, m.Layers)
		case ok:
			m.LayerBytes[layer] += sz
			if strings.Contains(t.Name, "_exps.") {
				m.ExpertBytes += sz
			}
		case strings.HasPrefix(t.Name, "token_embd."):
			embd += sz
			if m.Vocab == 0 && len(t.Shape) == 2 {
				m.Vocab = int(t.Shape[1])
			}
		case strings.HasPrefix(t.Name, "output."):
			hasOutput = true
			m.HeadBytes += sz
		case strings.HasPrefix(t.Name, "output_norm."):
			m.HeadBytes += sz
		}
	}
	m.EmbedBytes = embd
	if !hasOutput {
		m.TiedEmbedding = true
		m.HeadBytes += embd
	}
	return m, nil
}

// blockOf returns the layer index of a "blk.N." tensor name.
func blockOf(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "blk.")
	if !ok {
		return 0, false
	}
	n := 0
	i := 0
	for ; i < len(rest) && rest[i] >= '0' && rest[i] <= '9'; i++ {
		n = n*10 + int(rest[i]-'0')
		if n > math.MaxInt32 {
			return 0, false
		}
	}
	if i == 0 || i >= len(rest) || rest[i] != '.' {
		return 0, false
	}
	return n, true
}

// FileSHA256 hashes a file. Models are large, so the digest is remembered beside the data
// dir's cache keyed by path, size and modification time.
func FileSHA256(path string, cacheDir string) (string, error) {
	return FileSHA256WithProgress(path, cacheDir, nil)
}

// FileSHA256WithProgress is FileSHA256 calling progress, if not nil, with the fraction
// hashed (a large model takes minutes).
func FileSHA256WithProgress(path string, cacheDir string, progress func(float32)) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("hash model: %w", err)
	}
	var memo string
	if cacheDir != "" {
		abs, _ := filepath.Abs(path)
		key := sha256.Sum256(fmt.Appendf(nil, "%s|%d|%d", abs, st.Size(), st.ModTime().UnixNano()))
		memo = filepath.Join(cacheDir, "sha256-"+hex.EncodeToString(key[:8]))
		if b, err := os.ReadFile(memo); err == nil && len(b) == 64 {
			return string(b), nil
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash model: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	var w io.Writer = h
	if progress != nil {
		w = &hashProgress{w: h, total: st.Size(), report: progress}
	}
	if _, err := io.Copy(w, f); err != nil {
		return "", fmt.Errorf("hash model: %w", err)
	}
	if progress != nil {
		progress(1)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if memo != "" {
		if err := os.MkdirAll(cacheDir, 0o755); err == nil {
			_ = os.WriteFile(memo, []byte(sum), 0o644)
		}
	}
	return sum, nil
}

// Shape is what the planner needs of the model when every stage holds sessions of context
// tokens each with KV elements of elemBytes: each block's own weights and KV cache, so
// sliding-window layers are budgeted only their window.
func (m *ModelInfo) Shape(context, sessions, elemBytes int) ModelShape {
	s := ModelShape{
		Layers:          m.Layers,
		LayerBytes:      slices.Max(m.LayerBytes),
		KVBytesPerToken: m.KVBytesPerToken(elemBytes),
		EmbedBytes:      m.EmbedBytes,
		HeadBytes:       m.HeadBytes,
		Context:         context * sessions,
		LayerCosts:      make([]int64, m.Layers),
	}
	for l := range s.LayerCosts {
		s.LayerCosts[l] = m.LayerBytes[l] + m.RangeKVBytes(Range{Start: l, End: l + 1}, context, sessions, elemBytes)
	}
	return s
}

// hashProgress reports the fraction written, at most once per percent.
type hashProgress struct {
	w           io.Writer
	done, total int64
	last        int64
	report      func(float32)
}

func (p *hashProgress) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.total > 0 {
		if pct := p.done * 100 / p.total; pct > p.last && pct < 100 {
			p.last = pct
			p.report(float32(p.done) / float32(p.total))
		}
	}
	return n, err
}
