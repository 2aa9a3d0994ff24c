package testkit

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/quant"
)

// SynthArchs lists the architectures `strata model synth --arch` writes.
func SynthArchs() []string {
	return []string{"deepseek2", "gemma2", "gemma3", "gptoss", "llama", "mistral3", "olmo3", "qwen2", "qwen3", "qwen3moe"}
}

// ArchPresets lists the shapes of architecture arch ("" is llama). tiny and small are for
// tests; the others are the real models' shapes (--layers keeps them small enough to run).
func ArchPresets(arch string) ([]Preset, error) {
	tiny := func(a string) Preset {
		return Preset{Name: "tiny", Arch: a, Hidden: 64, Heads: 4, KVHeads: 2, FFN: 192, Layers: 6, Vocab: 2048, Context: 2048}
	}
	small := func(a string) Preset {
		return Preset{Name: "small", Arch: a, Hidden: 512, Heads: 8, KVHeads: 4, FFN: 1536, Layers: 8, Vocab: 16384, Context: 4096}
	}
	with := func(p Preset, f func(*Preset)) Preset { f(&p); return p }
	switch arch {
	case "", "llama":
		return Presets(), nil
	case "qwen2":
		return []Preset{
			with(tiny(arch), func(p *Preset) { p.RopeBase = 1e6 }),
			with(small(arch), func(p *Preset) { p.RopeBase = 1e6 }),
			{Name: "qwen2.5-7b", Arch: arch, Hidden: 3584, Heads: 28, KVHeads: 4, FFN: 18944, Layers: 28, Context: 32768, RopeBase: 1e6},
			{Name: "qwen2.5-72b", Arch: arch, Hidden: 8192, Heads: 64, KVHeads: 8, FFN: 29568, Layers: 80, Context: 32768, RopeBase: 1e6},
		}, nil
	case "qwen3":
		return []Preset{
			with(tiny(arch), func(p *Preset) { p.HeadDim, p.RopeBase = 32, 1e6 }), // heads*head_dim != hidden, as in the real ones
			with(small(arch), func(p *Preset) { p.HeadDim, p.RopeBase = 128, 1e6 }),
			{Name: "qwen3-8b", Arch: arch, Hidden: 4096, Heads: 32, KVHeads: 8, HeadDim: 128, FFN: 12288, Layers: 36, Context: 40960, RopeBase: 1e6},
			{Name: "qwen3-32b", Arch: arch, Hidden: 5120, Heads: 64, KVHeads: 8, HeadDim: 128, FFN: 25600, Layers: 64, Context: 40960, RopeBase: 1e6},
		}, nil
	case "qwen3moe":
		return qwen3MoEPresets(), nil
	case "mistral3":
		// tiny turns on the YaRN keys that give queries past each 16-token interval the
		// engine's per-position scale, so 64 tokens cross it (Ministral 3 files set them).
		return []Preset{
			with(tiny(arch), func(p *Preset) {
				p.HeadDim, p.RopeBase = 32, 1e6
				p.Scaling = &RopeScaling{Type: "yarn", Factor: 4, OriginalContext: 16}
			}),
			with(small(arch), func(p *Preset) { p.HeadDim, p.RopeBase = 128, 1e9 }),
			{Name: "mistral-small-24b", Arch: arch, Hidden: 5120, Heads: 32, KVHeads: 8, HeadDim: 128, FFN: 32768, Layers: 40, Context: 131072, RopeBase: 1e9},
		}, nil
	case "gemma2":
		return []Preset{
			with(tiny(arch), func(p *Preset) { p.HeadDim, p.Window, p.RopeBase = 16, 16, 1e4 }),
			with(small(arch), func(p *Preset) { p.HeadDim, p.Window, p.RopeBase = 128, 256, 1e4 }),
			{Name: "gemma2-9b", Arch: arch, Hidden: 3584, Heads: 16, KVHeads: 8, HeadDim: 256, FFN: 14336, Layers: 42, Context: 8192, RopeBase: 1e4, Window: 4096},
			{Name: "gemma2-27b", Arch: arch, Hidden: 4608, Heads: 32, KVHeads: 16, HeadDim: 128, FFN: 36864, Layers: 46, Context: 8192, RopeBase: 1e4, Window: 4096},
		}, nil
	case "gemma3":
		return []Preset{
			with(tiny(arch), func(p *Preset) { p.HeadDim, p.Window, p.RopeBase = 16, 16, 1e6 }),
			with(small(arch), func(p *Preset) { p.HeadDim, p.Window, p.RopeBase = 128, 256, 1e6 }),
			{Name: "gemma3-12b", Arch: arch, Hidden: 3840, Heads: 16, KVHeads: 8, HeadDim: 256, FFN: 15360, Layers: 48, Context: 131072, RopeBase: 1e6, Window: 1024,
				Scaling: &RopeScaling{Type: "linear", Factor: 8}},
			{Name: "gemma3-27b", Arch: arch, Hidden: 5376, Heads: 32, KVHeads: 16, HeadDim: 128, FFN: 21504, Layers: 62, Context: 131072, RopeBase: 1e6, Window: 1024,
				Scaling: &RopeScaling{Type: "linear", Factor: 8}},
		}, nil
	case "deepseek2":
		return deepseek2Presets(), nil
	case "gptoss":
		return gptossPresets(), nil
	case "olmo3":
		return []Preset{
			with(tiny(arch), func(p *Preset) { p.Layers, p.Window, p.RopeBase = 8, 16, 5e5 }),
			with(small(arch), func(p *Preset) { p.Window, p.RopeBase = 256, 5e5 }),
			{Name: "olmo3-7b", Arch: arch, Hidden: 4096, Heads: 32, KVHeads: 32, FFN: 11008, Layers: 32, Context: 65536, RopeBase: 5e5, Window: 4096,
				Scaling: &RopeScaling{Type: "yarn", Factor: 8, OriginalContext: 8192}},
			{Name: "olmo3-32b", Arch: arch, Hidden: 5120, Heads: 40, KVHeads: 8, FFN: 27648, Layers: 64, Context: 65536, RopeBase: 5e5, Window: 4096,
				Scaling: &RopeScaling{Type: "yarn", Factor: 8, OriginalContext: 8192}},
		}, nil
	}
	return nil, fmt.Errorf("cannot synthesize architecture %q (known: %s)", arch, strings.Join(SynthArchs(), ", "))
}

// Chat templates, shortened from each family's real one (no tools): what a node renders
// with its Jinja engine to talk to the model.
const (
	QwenChatTemplate    = "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
	Qwen3ChatTemplate   = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
	MistralChatTemplate = "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
	GemmaChatTemplate   = "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set first = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}{%- for message in loop_messages %}{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
	OlmoChatTemplate    = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

// synthesizeArch writes a model of a family other than llama: its keys and tensors, Llama 3's
// BPE vocabulary with the family's special tokens in the reserved slots (Qwen, Mistral and
// OLMo use byte-level BPE too, with other vocabularies), or Gemma's SentencePiece vocabulary.
func synthesizeArch(ctx context.Context, out string, p Preset, o SynthOptions, report func(float32)) error {
	if p.Arch == "deepseek2" || p.Arch == "gptoss" {
		return synthesizeMoED(ctx, out, p, o, report)
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
	a := p.Arch
	headDim := p.HeadDim
	if headDim == 0 {
		headDim = p.Hidden / p.Heads
	}
	gemma := a == "gemma2" || a == "gemma3"
	kv := archKV(p, format, o.Seed)
	set := func(k string, v any) { kv[a+"."+k] = v }
	vocab, err := archVocab(kv, p, o.VocabDir)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	set("vocab_size", uint32(vocab))

	in := 1 / math.Sqrt(float64(p.Hidden))
	deep := 1 / math.Sqrt(float64(2*p.Layers))
	var specs []tensorSpec
	add := func(name string, ncols, nrows int, mean, std float64, f quant.Format) {
		specs = append(specs, tensorSpec{name: name, ncols: uint64(ncols), nrows: uint64(nrows), mean: mean, std: std, format: f})
	}
	f32 := mustFormat("f32")
	qDim, kvDim := p.Heads*headDim, p.KVHeads*headDim
	embdStd := 1.0
	if gemma {
		// Gemma scales embeddings by sqrt(hidden) and ties the head to them. Embedded tokens
		// of order one would dominate the stream, and the tied head would then predict the
		// token just read, forever: at 0.5/sqrt(hidden) the blocks steer (the tiny model
		// greedily writes 12-17 distinct tokens in 64, not 1).
		embdStd = 0.5 / math.Sqrt(float64(p.Hidden))
	}
	add("token_embd.weight", p.Hidden, vocab, 0, embdStd, format)
	for l := range p.Layers {
		b := fmt.Sprintf("blk.%d.", l)
		if a != "olmo3" {
			add(b+"attn_norm.weight", p.Hidden, 1, 1, 0.05, f32)
			add(b+"ffn_norm.weight", p.Hidden, 1, 1, 0.05, f32)
		}
		add(b+"attn_q.weight", p.Hidden, qDim, 0, in, format)
		add(b+"attn_k.weight", p.Hidden, kvDim, 0, in, format)
		add(b+"attn_v.weight", p.Hidden, kvDim, 0, in, format)
		add(b+"attn_output.weight", qDim, p.Hidden, 0, deep/math.Sqrt(float64(qDim)), format)
		if p.Experts > 0 {
			specs = append(specs, expertSpecs(b, p, format)...)
		} else {
			add(b+"ffn_gate.weight", p.Hidden, p.FFN, 0, in, format)
			add(b+"ffn_up.weight", p.Hidden, p.FFN, 0, in, format)
			add(b+"ffn_down.weight", p.FFN, p.Hidden, 0, 2*deep/math.Sqrt(float64(p.FFN)), format)
		}
		switch a {
		case "qwen2":
			add(b+"attn_q.bias", qDim, 1, 0, 0.1, f32)
			add(b+"attn_k.bias", kvDim, 1, 0, 0.1, f32)
			add(b+"attn_v.bias", kvDim, 1, 0, 0.1, f32)
		case "qwen3", "qwen3moe", "gemma3":
			add(b+"attn_q_norm.weight", headDim, 1, 1, 0.05, f32)
			add(b+"attn_k_norm.weight", headDim, 1, 1, 0.05, f32)
		case "olmo3":
			add(b+"attn_q_norm.weight", qDim, 1, 1, 0.05, f32)
			add(b+"attn_k_norm.weight", kvDim, 1, 1, 0.05, f32)
		}
		if gemma || a == "olmo3" {
			add(b+"post_attention_norm.weight", p.Hidden, 1, 1, 0.05, f32)
			add(b+"post_ffw_norm.weight", p.Hidden, 1, 1, 0.05, f32)
		}
	}
	add("output_norm.weight", p.Hidden, 1, 1, 0.05, f32)
	if !o.Tied && !gemma { // Gemma's files always tie the head to the embeddings
		add("output.weight", p.Hidden, vocab, 0, 2*in, format)
	}
	setExpertKeys(kv, a, p)
	return writeModel(ctx, out, kv, specs, o.Seed, report)
}

// archVocab writes the tokenizer keys of p's family into kv and returns the vocabulary size.
func archVocab(kv fsggml.KV, p Preset, dir string) (int, error) {
	if p.Arch == "gemma2" || p.Arch == "gemma3" {
		path, err := GemmaVocabPath()
		if err != nil {
			return 0, err
		}
		v, err := loadSPM(path, p.Vocab)
		if err != nil {
			return 0, err
		}
		eot := slices.Index(v.Tokens, "<end_of_turn>")
		if eot < 0 {
			return 0, fmt.Errorf("gemma vocabulary of %d pieces lacks <end_of_turn>", len(v.Tokens))
		}
		kv["tokenizer.ggml.model"] = "llama"
		kv["tokenizer.ggml.pre"] = "default"
		kv["tokenizer.ggml.tokens"] = v.Tokens
		kv["tokenizer.ggml.scores"] = v.Scores
		kv["tokenizer.ggml.token_type"] = v.Types
		kv["tokenizer.ggml.bos_token_id"] = uint32(slices.Index(v.Tokens, "<bos>"))
		kv["tokenizer.ggml.eos_token_id"] = uint32(slices.Index(v.Tokens, "<eos>"))
		kv["tokenizer.ggml.eot_token_id"] = uint32(eot)
		kv["tokenizer.ggml.eos_token_ids"] = []int32{int32(eot)}
		kv["tokenizer.ggml.unknown_token_id"] = uint32(slices.Index(v.Tokens, "<unk>"))
		kv["tokenizer.ggml.padding_token_id"] = uint32(slices.Index(v.Tokens, "<pad>"))
		kv["tokenizer.ggml.add_bos_token"] = true
		kv["tokenizer.ggml.add_eos_token"] = false
		kv["tokenizer.chat_template"] = GemmaChatTemplate
		return len(v.Tokens), nil
	}
	var err error
	if dir == "" {
		if dir, err = VocabDir(); err != nil {
			return 0, err
		}
	}
	v, err := LoadVocab(dir, p.Vocab)
	if err != nil {
		return 0, err
	}
	base := len(v.Tokens) - 256
	// The family's special tokens take the first reserved slots; bos, eos and the end of a
	// chat turn are what its real files name.
	var specials []string
	var bos, eos, eot, pre, tmpl string
	addBOS := false
	switch p.Arch {
	case "qwen2", "qwen3", "qwen3moe":
		specials = []string{"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"}
		bos, eos, eot, pre = "<|endoftext|>", "<|im_end|>", "<|im_end|>", "qwen2"
		tmpl = QwenChatTemplate
		if p.Arch != "qwen2" {
			tmpl = Qwen3ChatTemplate
		}
	case "mistral3":
		specials = []string{"<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"}
		bos, eos, eot, pre, tmpl, addBOS = "<s>", "</s>", "</s>", "tekken", MistralChatTemplate, true
	case "olmo3":
		specials = []string{"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"}
		bos, eos, eot, pre, tmpl = "<|endoftext|>", "<|endoftext|>", "<|im_end|>", "dbrx", OlmoChatTemplate
	case "deepseek2", "gptoss":
		specials, bos, eos, eot, pre, tmpl, addBOS = moedVocab(p.Arch)
	default:
		return 0, fmt.Errorf("no vocabulary for architecture %q", p.Arch)
	}
	copy(v.Tokens[base:], specials)
	id := func(s string) uint32 { return uint32(slices.Index(v.Tokens, s)) }
	kv["tokenizer.ggml.model"] = "gpt2"
	kv["tokenizer.ggml.pre"] = pre
	kv["tokenizer.ggml.tokens"] = v.Tokens
	kv["tokenizer.ggml.token_type"] = v.Types
	kv["tokenizer.ggml.merges"] = v.Merges
	kv["tokenizer.ggml.bos_token_id"] = id(bos)
	kv["tokenizer.ggml.eos_token_id"] = id(eos)
	kv["tokenizer.ggml.eos_token_ids"] = []int32{int32(id(eot))}
	kv["tokenizer.ggml.add_bos_token"] = addBOS
	kv["tokenizer.chat_template"] = tmpl
	return len(v.Tokens), nil
}

// familyKV starts a family's GGUF metadata: the general keys and the shape every family
// has; set adds a key under the family's prefix.
func familyKV(p Preset, name string, format quant.Format) (kv fsggml.KV, set func(k string, v any)) {
	a := p.Arch
	kv = fsggml.KV{
		"general.architecture":         a,
		"general.name":                 name,
		"general.file_type":            format.File,
		"general.quantization_version": uint32(2),
	}
	set = func(k string, v any) { kv[a+"."+k] = v }
	set("block_count", uint32(p.Layers))
	set("context_length", uint32(p.Context))
	set("embedding_length", uint32(p.Hidden))
	set("feed_forward_length", uint32(p.FFN))
	set("attention.head_count", uint32(p.Heads))
	set("attention.head_count_kv", uint32(p.KVHeads))
	return kv, set
}

// archKV is a family's hyperparameters as its GGUF keys, as the synthesizer writes them.
func archKV(p Preset, format quant.Format, seed uint64) fsggml.KV {
	a := p.Arch
	headDim := p.HeadDim
	if headDim == 0 {
		headDim = p.Hidden / p.Heads
	}
	eps := float32(1e-6)
	if a == "mistral3" {
		eps = 1e-5
	}
	kv, set := familyKV(p, fmt.Sprintf("strata-synth-%s-%s-%dL-%s-seed%d", a, p.Name, p.Layers, format.Name, seed), format)
	set("attention.layer_norm_rms_epsilon", eps)
	set("rope.freq_base", p.RopeBase)
	if a != "olmo3" {
		set("attention.key_length", uint32(headDim))
		set("attention.value_length", uint32(headDim))
	}
	if a == "qwen2" || a == "mistral3" {
		set("rope.dimension_count", uint32(headDim))
	}
	if s := p.Scaling; s != nil {
		set("rope.scaling.type", s.Type)
		set("rope.scaling.factor", s.Factor)
		if s.OriginalContext > 0 {
			set("rope.scaling.original_context_length", uint32(s.OriginalContext))
		}
		if a == "mistral3" {
			set("rope.scaling_beta", float32(0.1))
		}
	}
	switch a {
	case "gemma2":
		set("attention.sliding_window", uint32(p.Window))
		set("attn_logit_softcapping", float32(50))
		set("final_logit_softcapping", float32(30))
	case "gemma3":
		set("attention.sliding_window", uint32(p.Window))
		set("rope.local.freq_base", float32(1e4))
	case "olmo3":
		set("attention.sliding_window", uint32(p.Window))
		pattern := make([]bool, p.Layers)
		for l := range pattern {
			pattern[l] = (l+1)%4 != 0 // three sliding layers to one global
		}
		set("attention.sliding_window_pattern", pattern)
	}
	return kv
}

// ArchKV is the GGUF metadata the synthesizer writes for preset p of a family other than
// llama (tensor formats f16, seed 0): for tests of what a stage reads from a real model's
// keys without writing the model.
func ArchKV(p Preset) fsggml.KV { return archKV(p, mustFormat("f16"), 0) }
