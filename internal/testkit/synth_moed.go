package testkit

import (
	"context"
	"fmt"
	"math"

	"github.com/strata-llm/strata/quant"
)

// DeepSeekShape is what a deepseek2 preset has beyond a plain one: multi-head latent
// attention's ranks and head split, the leading dense blocks and the shared experts.
type DeepSeekShape struct {
	QLoraRank, KVLoraRank int // 0 QLoraRank: queries straight from hidden (V2-Lite)
	RopeDim, NopeDim      int // per head: the rotary part of Q and K and the rest
	VHeadDim              int
	DenseLayers           int // leading_dense_block_count
	SharedExperts         int // each as wide as a routed expert
	RoutedScale           float32
	Groups, GroupsUsed    int // written for the real shapes; routing ignores them as the engine does
	// PerHeadKV writes attention as ollama's converter does (attn_kv_b decompressing the
	// latent into every head's K and V, which the cache then holds) instead of llama.cpp's
	// MLA form (attn_k_b, attn_v_b; the cache holds the latent).
	PerHeadKV bool
}

// Chat templates of DeepSeek V3 and gpt-oss (harmony), shortened as the others.
const (
	DeepSeekChatTemplate = "{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}{{- message['content'] }}{%- elif message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}{%- elif message['role'] == 'assistant' %}{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
	GptOssChatTemplate   = "{%- for message in messages %}{{- '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

// deepseek2Presets are DeepSeek's shapes in the MLA form llama.cpp converts them to (the KV
// cache holds the latent). tiny routes 4 of 16 experts after one dense block, with YaRN on;
// its latent (64) is wider than a head's nope part (32), as V3's (512, 128), so the cached
// row's size (key_length) and a head's (key_length_mla) differ and the attention scale
// shows which one is used.
func deepseek2Presets() []Preset {
	const a = "deepseek2"
	yarn := func(f float32, orig int) *RopeScaling {
		return &RopeScaling{Type: "yarn", Factor: f, OriginalContext: orig}
	}
	return []Preset{
		{Name: "tiny", Arch: a, Hidden: 64, Heads: 4, KVHeads: 1, FFN: 192, Layers: 6, Vocab: 2048, Context: 2048, RopeBase: 1e4, Scaling: yarn(4, 256),
			Experts: 16, ExpertsUsed: 4, ExpertFFN: 32,
			DeepSeek: &DeepSeekShape{QLoraRank: 32, KVLoraRank: 64, RopeDim: 16, NopeDim: 32, VHeadDim: 32, DenseLayers: 1, SharedExperts: 1, RoutedScale: 2.5}},
		{Name: "tiny-mha", Arch: a, Hidden: 64, Heads: 4, KVHeads: 4, FFN: 192, Layers: 6, Vocab: 2048, Context: 2048, RopeBase: 1e4, Scaling: yarn(4, 256),
			Experts: 16, ExpertsUsed: 4, ExpertFFN: 32,
			DeepSeek: &DeepSeekShape{QLoraRank: 0, KVLoraRank: 32, RopeDim: 16, NopeDim: 32, VHeadDim: 32, DenseLayers: 1, SharedExperts: 1, RoutedScale: 2.5, PerHeadKV: true}},
		{Name: "small", Arch: a, Hidden: 512, Heads: 8, KVHeads: 1, FFN: 1536, Layers: 8, Vocab: 16384, Context: 4096, RopeBase: 1e4, Scaling: yarn(4, 1024),
			Experts: 32, ExpertsUsed: 4, ExpertFFN: 256,
			DeepSeek: &DeepSeekShape{QLoraRank: 192, KVLoraRank: 128, RopeDim: 32, NopeDim: 64, VHeadDim: 64, DenseLayers: 1, SharedExperts: 1, RoutedScale: 2.5}},
		// DeepSeek V3 and R1 (671B): one MoE layer is 256 experts of 3x7168x2048, ~6 GB at q4_0.
		{Name: "deepseek-v3", Arch: a, Hidden: 7168, Heads: 128, KVHeads: 1, FFN: 18432, Layers: 61, Context: 163840, RopeBase: 1e4, Scaling: yarn(40, 4096),
			Experts: 256, ExpertsUsed: 8, ExpertFFN: 2048,
			DeepSeek: &DeepSeekShape{QLoraRank: 1536, KVLoraRank: 512, RopeDim: 64, NopeDim: 128, VHeadDim: 128, DenseLayers: 3, SharedExperts: 1, RoutedScale: 2.5, Groups: 8, GroupsUsed: 4}},
	}
}

// gptossPresets are gpt-oss's shapes: 64-wide heads with sinks, a 128-token window on even
// blocks, experts as wide as the model. tiny slides 16 tokens so 64 decoded cross it.
func gptossPresets() []Preset {
	const a = "gptoss"
	return []Preset{
		{Name: "tiny", Arch: a, Hidden: 64, Heads: 4, KVHeads: 2, HeadDim: 32, FFN: 64, Layers: 6, Vocab: 2048, Context: 2048, RopeBase: 1.5e5, Window: 16,
			Scaling: &RopeScaling{Type: "yarn", Factor: 4, OriginalContext: 256}, Experts: 16, ExpertsUsed: 4, ExpertFFN: 64},
		{Name: "small", Arch: a, Hidden: 512, Heads: 8, KVHeads: 4, HeadDim: 64, FFN: 512, Layers: 8, Vocab: 16384, Context: 4096, RopeBase: 1.5e5, Window: 128,
			Scaling: &RopeScaling{Type: "yarn", Factor: 32, OriginalContext: 4096}, Experts: 32, ExpertsUsed: 4, ExpertFFN: 512},
		{Name: "gpt-oss-20b", Arch: a, Hidden: 2880, Heads: 64, KVHeads: 8, HeadDim: 64, FFN: 2880, Layers: 24, Context: 131072, RopeBase: 1.5e5, Window: 128,
			Scaling: &RopeScaling{Type: "yarn", Factor: 32, OriginalContext: 4096}, Experts: 32, ExpertsUsed: 4, ExpertFFN: 2880},
		{Name: "gpt-oss-120b", Arch: a, Hidden: 2880, Heads: 64, KVHeads: 8, HeadDim: 64, FFN: 2880, Layers: 36, Context: 131072, RopeBase: 1.5e5, Window: 128,
			Scaling: &RopeScaling{Type: "yarn", Factor: 32, OriginalContext: 4096}, Experts: 128, ExpertsUsed: 4, ExpertFFN: 2880},
	}
}

// synthesizeMoED writes a deepseek2 or gptoss model: the keys and tensor names llama.cpp's
// converter gives real files. --experts keeps each expert's real size and changes how many.
// For gptoss, --type mxfp4 stores the experts in MXFP4 as real files do and the other
// matrices in q8_0.
func synthesizeMoED(ctx context.Context, out string, p Preset, o SynthOptions, report func(float32)) error {
	if o.Layers > 0 {
		if ds := p.DeepSeek; ds != nil && o.Layers < p.Layers {
			// Fewer layers keep the model's share of dense ones (3 of 61 for V3), at least one,
			// so --layers 3 is one dense block and two MoE blocks, not three dense ones.
			d := *ds
			d.DenseLayers = min(max(1, (ds.DenseLayers*o.Layers+p.Layers/2)/p.Layers), o.Layers-1)
			p.DeepSeek = &d
		}
		p.Layers = o.Layers
	}
	if o.Experts > 0 {
		p.Experts, p.ExpertsUsed = o.Experts, min(p.ExpertsUsed, o.Experts)
	}
	if o.Type == "" {
		o.Type = "f16"
	}
	format, err := quant.ParseFormat(o.Type)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	expertFormat, denseFormat := format, format
	if format.Name == "mxfp4" {
		denseFormat = mustFormat("q8_0")
	}
	a := p.Arch
	kv, set := familyKV(p, fmt.Sprintf("strata-synth-%s-%s-%dL-%de-%s-seed%d", a, p.Name, p.Layers, p.Experts, format.Name, o.Seed), format)
	set("expert_feed_forward_length", uint32(p.ExpertFFN))
	set("expert_count", uint32(p.Experts))
	set("expert_used_count", uint32(p.ExpertsUsed))
	set("rope.freq_base", p.RopeBase)
	if s := p.Scaling; s != nil {
		set("rope.scaling.type", s.Type)
		set("rope.scaling.factor", s.Factor)
		set("rope.scaling.original_context_length", uint32(s.OriginalContext))
	}
	vocab, err := archVocab(kv, p, o.VocabDir)
	if err != nil {
		return fmt.Errorf("synthesize: %w", err)
	}
	set("vocab_size", uint32(vocab))

	var specs []tensorSpec
	add := func(name string, ncols, nrows, experts int, mean, std float64, f quant.Format) {
		specs = append(specs, tensorSpec{name: name, ncols: uint64(ncols), nrows: uint64(nrows), experts: uint64(experts), mean: mean, std: std, format: f})
	}
	in := 1 / math.Sqrt(float64(p.Hidden))
	deep := 1 / math.Sqrt(float64(2*p.Layers))
	f32 := mustFormat("f32")
	add("token_embd.weight", p.Hidden, vocab, 0, 0, 1, denseFormat)
	switch a {
	case "deepseek2":
		ds := p.DeepSeek
		qk := ds.NopeDim + ds.RopeDim
		if ds.PerHeadKV {
			set("attention.key_length", uint32(qk))
			set("attention.value_length", uint32(ds.VHeadDim))
		} else {
			// llama.cpp's MLA form: key_length and value_length are what the cache holds per
			// token (latent and rope key; latent), the _mla keys a head's real sizes.
			set("attention.key_length", uint32(ds.KVLoraRank+ds.RopeDim))
			set("attention.value_length", uint32(ds.KVLoraRank))
			set("attention.key_length_mla", uint32(qk))
			set("attention.value_length_mla", uint32(ds.VHeadDim))
		}
		set("attention.q_lora_rank", uint32(ds.QLoraRank))
		set("attention.kv_lora_rank", uint32(ds.KVLoraRank))
		set("attention.layer_norm_rms_epsilon", float32(1e-6))
		set("rope.dimension_count", uint32(ds.RopeDim))
		set("rope.scaling.yarn_log_multiplier", float32(0.1))
		set("leading_dense_block_count", uint32(ds.DenseLayers))
		set("expert_shared_count", uint32(ds.SharedExperts))
		set("expert_weights_scale", ds.RoutedScale)
		set("expert_weights_norm", true)
		set("expert_gating_func", uint32(2)) // sigmoid
		if ds.Groups > 0 {
			set("expert_group_count", uint32(ds.Groups))
			set("expert_group_used_count", uint32(ds.GroupsUsed))
		}
		shFFN := ds.SharedExperts * p.ExpertFFN
		for l := range p.Layers {
			b := fmt.Sprintf("blk.%d.", l)
			add(b+"attn_norm.weight", p.Hidden, 1, 0, 1, 0.05, f32)
			add(b+"ffn_norm.weight", p.Hidden, 1, 0, 1, 0.05, f32)
			if ds.QLoraRank > 0 {
				add(b+"attn_q_a.weight", p.Hidden, ds.QLoraRank, 0, 0, in, denseFormat)
				add(b+"attn_q_a_norm.weight", ds.QLoraRank, 1, 0, 1, 0.05, f32)
				add(b+"attn_q_b.weight", ds.QLoraRank, p.Heads*qk, 0, 0, 1/math.Sqrt(float64(ds.QLoraRank)), denseFormat)
			} else {
				add(b+"attn_q.weight", p.Hidden, p.Heads*qk, 0, 0, in, denseFormat)
			}
			add(b+"attn_kv_a_mqa.weight", p.Hidden, ds.KVLoraRank+ds.RopeDim, 0, 0, in, denseFormat)
			add(b+"attn_kv_a_norm.weight", ds.KVLoraRank, 1, 0, 1, 0.05, f32)
			if ds.PerHeadKV {
				add(b+"attn_kv_b.weight", ds.KVLoraRank, p.Heads*(ds.NopeDim+ds.VHeadDim), 0, 0, 1/math.Sqrt(float64(ds.KVLoraRank)), denseFormat)
			} else {
				// Per head: the latent's key (nope x latent) and value (latent x v) projections.
				add(b+"attn_k_b.weight", ds.NopeDim, ds.KVLoraRank, p.Heads, 0, 1/math.Sqrt(float64(ds.NopeDim)), denseFormat)
				add(b+"attn_v_b.weight", ds.KVLoraRank, ds.VHeadDim, p.Heads, 0, 1/math.Sqrt(float64(ds.KVLoraRank)), denseFormat)
			}
			add(b+"attn_output.weight", p.Heads*ds.VHeadDim, p.Hidden, 0, 0, deep/math.Sqrt(float64(p.Heads*ds.VHeadDim)), denseFormat)
			if l < ds.DenseLayers {
				add(b+"ffn_gate.weight", p.Hidden, p.FFN, 0, 0, in, denseFormat)
				add(b+"ffn_up.weight", p.Hidden, p.FFN, 0, 0, in, denseFormat)
				add(b+"ffn_down.weight", p.FFN, p.Hidden, 0, 0, 2*deep/math.Sqrt(float64(p.FFN)), denseFormat)
				continue
			}
			// The routed sum is scaled by RoutedScale; each expert's output is kept at the
			// dense MLP's size over it.
			down := 2 * deep / math.Sqrt(float64(p.ExpertFFN)) / float64(ds.RoutedScale)
			add(b+"ffn_gate_inp.weight", p.Hidden, p.Experts, 0, 0, in, f32)
			add(b+"exp_probs_b.bias", p.Experts, 1, 0, 0, 0.05, f32)
			add(b+"ffn_gate_exps.weight", p.Hidden, p.ExpertFFN, p.Experts, 0, in, expertFormat)
			add(b+"ffn_up_exps.weight", p.Hidden, p.ExpertFFN, p.Experts, 0, in, expertFormat)
			add(b+"ffn_down_exps.weight", p.ExpertFFN, p.Hidden, p.Experts, 0, down, expertFormat)
			add(b+"ffn_gate_shexp.weight", p.Hidden, shFFN, 0, 0, in, denseFormat)
			add(b+"ffn_up_shexp.weight", p.Hidden, shFFN, 0, 0, in, denseFormat)
			add(b+"ffn_down_shexp.weight", shFFN, p.Hidden, 0, 0, 2*deep/math.Sqrt(float64(shFFN)), denseFormat)
		}
	case "gptoss":
		hd := p.HeadDim
		set("attention.key_length", uint32(hd))
		set("attention.value_length", uint32(hd))
		set("attention.layer_norm_rms_epsilon", float32(1e-5))
		set("attention.sliding_window", uint32(p.Window))
		qDim, kvDim := p.Heads*hd, p.KVHeads*hd
		for l := range p.Layers {
			b := fmt.Sprintf("blk.%d.", l)
			add(b+"attn_norm.weight", p.Hidden, 1, 0, 1, 0.05, f32)
			add(b+"post_attention_norm.weight", p.Hidden, 1, 0, 1, 0.05, f32)
			add(b+"attn_q.weight", p.Hidden, qDim, 0, 0, in, denseFormat)
			add(b+"attn_k.weight", p.Hidden, kvDim, 0, 0, in, denseFormat)
			add(b+"attn_v.weight", p.Hidden, kvDim, 0, 0, in, denseFormat)
			add(b+"attn_output.weight", qDim, p.Hidden, 0, 0, deep/math.Sqrt(float64(qDim)), denseFormat)
			add(b+"attn_q.bias", qDim, 1, 0, 0, 0.1, f32)
			add(b+"attn_k.bias", kvDim, 1, 0, 0, 0.1, f32)
			add(b+"attn_v.bias", kvDim, 1, 0, 0, 0.1, f32)
			add(b+"attn_output.bias", p.Hidden, 1, 0, 0, 0.02, f32)
			add(b+"attn_sinks.weight", p.Heads, 1, 0, 0, 1, f32)
			add(b+"ffn_gate_inp.weight", p.Hidden, p.Experts, 0, 0, in, f32)
			add(b+"ffn_gate_inp.bias", p.Experts, 1, 0, 0, 0.1, f32)
			add(b+"ffn_gate_exps.weight", p.Hidden, p.ExpertFFN, p.Experts, 0, in, expertFormat)
			add(b+"ffn_up_exps.weight", p.Hidden, p.ExpertFFN, p.Experts, 0, in, expertFormat)
			add(b+"ffn_down_exps.weight", p.ExpertFFN, p.Hidden, p.Experts, 0, 2*deep/math.Sqrt(float64(p.ExpertFFN)), expertFormat)
			add(b+"ffn_gate_exps.bias", p.ExpertFFN, p.Experts, 0, 0, 0.05, f32)
			add(b+"ffn_up_exps.bias", p.ExpertFFN, p.Experts, 0, 0, 0.05, f32)
			add(b+"ffn_down_exps.bias", p.Hidden, p.Experts, 0, 0, 0.02, f32)
		}
	default:
		return fmt.Errorf("synthesize: %s is not a deepseek2 or gptoss preset", a)
	}
	add("output_norm.weight", p.Hidden, 1, 0, 1, 0.05, f32)
	if !o.Tied {
		add("output.weight", p.Hidden, vocab, 0, 0, 2*in, denseFormat)
	}
	return writeModel(ctx, out, kv, specs, o.Seed, report)
}

// moedVocab gives deepseek2 and gptoss their special tokens, pre-tokenizer and template.
func moedVocab(arch string) (specials []string, bos, eos, eot, pre, tmpl string, addBOS bool) {
	switch arch {
	case "deepseek2":
		return []string{"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"},
			"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "deepseek-v3", DeepSeekChatTemplate, true
	case "gptoss":
		return []string{"<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"},
			"<|startoftext|>", "<|return|>", "<|end|>", "gpt-4o", GptOssChatTemplate, false
	}
	return nil, "", "", "", "", "", false
}
