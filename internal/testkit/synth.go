// Package testkit holds what Strata's tests, benchmarks and demo share: the synthesizer that
// writes real llama GGUF models with seeded random weights and Llama 3's tokenizer, and the
// launcher of local swarms.
package testkit

import (
	"cmp"
	"context"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"sort"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/internal/progress"
	"github.com/strata-llm/strata/quant"
)

// Preset is a model shape.
type Preset struct {
	Name     string
	Arch     string // GGUF architecture; "" is llama
	Hidden   int
	Heads    int
	KVHeads  int
	HeadDim  int // 0: Hidden/Heads
	FFN      int
	Layers   int
	Vocab    int // regular tokens kept from the family's vocabulary (0: all of it); specials follow
	Context  int
	RopeBase float32
	Window   int // sliding attention window of the layers that slide (gemma2/3, olmo3)
	Scaling  *RopeScaling

	// Mixture of experts (synth_moe.go): experts per layer, used per token, and each expert's
	// FFN width (0: FFN). Experts 0 is a dense model.
	Experts, ExpertsUsed, ExpertFFN int
	DeepSeek                        *DeepSeekShape // deepseek2's attention and MoE extras (synth_moed.go)
}

// RopeScaling is a preset's rope.scaling keys.
type RopeScaling struct {
	Type            string // "yarn", "linear"
	Factor          float32
	OriginalContext int
}

// Presets lists the shapes `strata model synth` knows. The 8b and 70b shapes are Llama 3's,
// with its full 128256-token vocabulary, so the LM head and tokenization are real.
func Presets() []Preset {
	return []Preset{
		{Name: "tiny", Arch: "llama", Hidden: 64, Heads: 4, KVHeads: 2, FFN: 192, Layers: 6, Vocab: 2048, Context: 2048, RopeBase: 500000},
		{Name: "small", Arch: "llama", Hidden: 512, Heads: 8, KVHeads: 4, FFN: 1536, Layers: 8, Vocab: 16384, Context: 4096, RopeBase: 500000},
		{Name: "8b", Arch: "llama", Hidden: 4096, Heads: 32, KVHeads: 8, FFN: 14336, Layers: 32, Context: 8192, RopeBase: 500000},
		{Name: "70b", Arch: "llama", Hidden: 8192, Heads: 64, KVHeads: 8, FFN: 28672, Layers: 80, Context: 8192, RopeBase: 500000},
		{Name: "mixtral-8x7b", Arch: "llama", Hidden: 4096, Heads: 32, KVHeads: 8, FFN: 14336, Layers: 32, Context: 32768, RopeBase: 1e6, Experts: 8, ExpertsUsed: 2},
		{Name: "mixtral-8x22b", Arch: "llama", Hidden: 6144, Heads: 48, KVHeads: 8, FFN: 16384, Layers: 56, Context: 65536, RopeBase: 1e6, Experts: 8, ExpertsUsed: 2},
	}
}

// LookupPreset finds a llama preset by name.
func LookupPreset(name string) (Preset, error) { return LookupArchPreset("llama", name) }

// LookupArchPreset finds a preset of architecture arch ("" is llama) by name.
func LookupArchPreset(arch, name string) (Preset, error) {
	ps, err := ArchPresets(arch)
	if err != nil {
		return Preset{}, err
	}
	var names []string
	for _, p := range ps {
		if p.Name == name {
			return p, nil
		}
		names = append(names, p.Name)
	}
	return Preset{}, fmt.Errorf("unknown preset %q for %s (known: %s)", name, cmp.Or(arch, "llama"), strings.Join(names, ", "))
}

// SynthOptions say what model to write.
type SynthOptions struct {
	Arch     string // GGUF architecture (default llama): see SynthArchs
	Preset   string
	Layers   int    // overrides the preset's layer count when > 0
	Seed     uint64 // weights are a pure function of the seed and the tensor's name
	Type     string // weight format of the matrices: f32, f16, q8_0, q4_0, ... (default f16)
	Tied     bool   // no output.weight: the LM head reuses token_embd
	Experts  int    // overrides the preset's experts per layer when > 0 (llama: makes it Mixtral)
	VocabDir string // default: VocabDir()
}

// Llama3ChatTemplate is the Jinja chat template of Llama 3 instruct models.
const Llama3ChatTemplate = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"

// Synthesize writes a GGUF model of o.Arch to out. progress, if not nil, gets the fraction
// written.
func Synthesize(ctx context.Context, out string, o SynthOptions, reportProgress func(float32)) error {
	p, err := LookupArchPreset(o.Arch, o.Preset)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	if err := p.withExperts(o.Experts); err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	if p.Arch != "llama" {
		return synthesizeArch(ctx, out, p, o, reportProgress)
	}
	if o.Layers > 0 {
		p.Layers = o.Layers
	}
	if o.Type == "" {
		o.Type = "f16"
	}
	format, err := quant.ParseFormat(o.Type)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	dir := o.VocabDir
	if dir == "" {
		if dir, err = VocabDir(); err != nil {
			return fmt.Errorf("synthesize: %w", err)
		}
	}
	v, err := LoadVocab(dir, p.Vocab)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	headDim := p.Hidden / p.Heads
	vocab := len(v.Tokens)
	kv := fsggml.KV{
		"general.architecture":                   "llama",
		"general.name":                           fmt.Sprintf("strata-synth-%s-%dL-%s-seed%d", p.Name, p.Layers, format.Name, o.Seed),
		"general.file_type":                      format.File,
		"general.quantization_version":           uint32(2),
		"llama.block_count":                      uint32(p.Layers),
		"llama.context_length":                   uint32(p.Context),
		"llama.embedding_length":                 uint32(p.Hidden),
		"llama.feed_forward_length":              uint32(p.FFN),
		"llama.attention.head_count":             uint32(p.Heads),
		"llama.attention.head_count_kv":          uint32(p.KVHeads),
		"llama.attention.key_length":             uint32(headDim),
		"llama.attention.value_length":           uint32(headDim),
		"llama.attention.layer_norm_rms_epsilon": float32(1e-5),
		"llama.rope.freq_base":                   p.RopeBase,
		"llama.rope.dimension_count":             uint32(headDim),
		"llama.vocab_size":                       uint32(vocab),
		"tokenizer.ggml.model":                   "gpt2",
		"tokenizer.ggml.pre":                     "llama-bpe",
		"tokenizer.ggml.tokens":                  v.Tokens,
		"tokenizer.ggml.token_type":              v.Types,
		"tokenizer.ggml.merges":                  v.Merges,
		"tokenizer.ggml.bos_token_id":            uint32(v.BOS),
		"tokenizer.ggml.eos_token_id":            uint32(v.EOT),
		"tokenizer.ggml.eos_token_ids":           []int32{v.EOS},
		"tokenizer.ggml.add_bos_token":           true,
		"tokenizer.chat_template":                Llama3ChatTemplate,
	}

	// Scales keep activations finite over many layers: projections into the residual stream
	// shrink with depth, so the stream grows like sqrt(layers), not exponentially.
	in := 1 / math.Sqrt(float64(p.Hidden))
	deep := 1 / math.Sqrt(float64(2*p.Layers))
	var specs []tensorSpec
	add := func(name string, ncols, nrows int, mean, std float64, f quant.Format) {
		specs = append(specs, tensorSpec{name: name, ncols: uint64(ncols), nrows: uint64(nrows), mean: mean, std: std, format: f})
	}
	f32 := mustFormat("f32")
	add("token_embd.weight", p.Hidden, vocab, 0, 1, format)
	for l := range p.Layers {
		b := fmt.Sprintf("blk.%d.", l)
		add(b+"attn_norm.weight", p.Hidden, 1, 1, 0.05, f32)
		add(b+"attn_q.weight", p.Hidden, p.Heads*headDim, 0, in, format)
		add(b+"attn_k.weight", p.Hidden, p.KVHeads*headDim, 0, in, format)
		add(b+"attn_v.weight", p.Hidden, p.KVHeads*headDim, 0, in, format)
		add(b+"attn_output.weight", p.Heads*headDim, p.Hidden, 0, deep/math.Sqrt(float64(p.Heads*headDim)), format)
		add(b+"ffn_norm.weight", p.Hidden, 1, 1, 0.05, f32)
		if p.Experts > 0 {
			specs = append(specs, expertSpecs(b, p, format)...)
			continue
		}
		add(b+"ffn_gate.weight", p.Hidden, p.FFN, 0, in, format)
		add(b+"ffn_up.weight", p.Hidden, p.FFN, 0, in, format)
		add(b+"ffn_down.weight", p.FFN, p.Hidden, 0, 2*deep/math.Sqrt(float64(p.FFN)), format)
	}
	add("output_norm.weight", p.Hidden, 1, 1, 0.05, f32)
	if !o.Tied {
		add("output.weight", p.Hidden, vocab, 0, 2*in, format)
	}
	setExpertKeys(kv, "llama", p)
	return writeModel(ctx, out, kv, specs, o.Seed, reportProgress)
}

// writeModel generates the tensors of specs from the seed and writes them with kv.
func writeModel(ctx context.Context, out string, kv fsggml.KV, specs []tensorSpec, seed uint64, reportProgress func(float32)) error {
	var total uint64
	for i := range specs {
		s := &specs[i]
		if !s.format.Fits(s.ncols) {
			s.format = mustFormat("f16")
		}
		s.seed = tensorSeed(seed, s.name)
		total += s.rows() * s.format.RowBytes(s.ncols)
	}
	prog := &progress.Counter{Total: int64(total), Report: reportProgress}
	ts := make([]*fsggml.Tensor, len(specs))
	for i := range specs {
		s := &specs[i]
		shape := []uint64{s.ncols, s.nrows}
		if s.nrows == 1 {
			shape = shape[:1]
		}
		if s.experts > 0 {
			shape = append(shape, s.experts)
		}
		ts[i] = &fsggml.Tensor{Name: s.name, Kind: uint32(s.format.Tensor), Shape: shape,
			WriterTo: &tensorWriter{ctx: ctx, spec: s, progress: prog}}
	}
	sort.SliceStable(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	if err := gguf.WriteAtomic(out, kv, ts); err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	return nil
}

func mustFormat(name string) quant.Format {
	f, err := quant.ParseFormat(name)
	if err != nil {
		panic(err) // the names above are constants
	}
	return f
}

type tensorSpec struct {
	name         string
	ncols, nrows uint64
	mean, std    float64
	format       quant.Format
	seed         uint64
	experts      uint64 // > 0: a 3-D tensor of that many ncols x nrows matrices
}

// rows is how many rows of ncols values the tensor stores.
func (s *tensorSpec) rows() uint64 { return s.nrows * max(1, s.experts) }

func tensorSeed(seed uint64, name string) uint64 {
	h := fnv.New64a()
	fmt.Fprintf(h, "%d/%s", seed, name)
	return h.Sum64()
}

// tensorWriter generates a tensor's values row by row while the GGUF is written, so memory
// stays bounded for any model size.
type tensorWriter struct {
	ctx      context.Context
	spec     *tensorSpec
	progress *progress.Counter
}

func (w *tensorWriter) WriteTo(dst io.Writer) (int64, error) {
	s := w.spec
	const chunkValues = 1 << 20
	rows := max(1, chunkValues/s.ncols)
	vals := make([]float32, rows*s.ncols)
	half := float32(s.std * math.Sqrt(3)) // uniform on [-a, a] has std a/sqrt(3)
	var n int64
	for r := uint64(0); r < s.rows(); r += rows {
		if err := w.ctx.Err(); err != nil {
			return n, err
		}
		k := min(rows, s.rows()-r)
		v := vals[:k*s.ncols]
		for i := range k {
			fillUniform(v[i*s.ncols:(i+1)*s.ncols], s.seed+(r+i)*0x9e3779b97f4a7c15, float32(s.mean), half)
		}
		b, err := s.format.Encode(v, s.ncols)
		if err != nil {
			return n, fmt.Errorf("tensor %s: %w", s.name, err)
		}
		m, err := dst.Write(b)
		n += int64(m)
		if err != nil {
			return n, err
		}
		w.progress.Add(int64(m))
	}
	return n, nil
}

// fillUniform fills v with mean + U(-half, half) from a splitmix64 stream: fast, and the same
// for a row whatever chunk it is generated in.
func fillUniform(v []float32, seed uint64, mean, half float32) {
	x := seed
	for i := range v {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		z ^= z >> 31
		u := float32(z>>40) / float32(1<<24) // [0,1)
		v[i] = mean + half*(2*u-1)
	}
}
