package testkit

import (
	"fmt"
	"math"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/quant"
)

// qwen3MoEPresets are Qwen 3's mixture-of-experts shapes. tiny has enough experts per token
// (4 of 16) that routing, not one expert, decides each token.
func qwen3MoEPresets() []Preset {
	const a = "qwen3moe"
	return []Preset{
		{Name: "tiny", Arch: a, Hidden: 64, Heads: 4, KVHeads: 2, HeadDim: 32, FFN: 192, Layers: 6, Vocab: 2048, Context: 2048, RopeBase: 1e6,
			Experts: 16, ExpertsUsed: 4, ExpertFFN: 48},
		{Name: "small", Arch: a, Hidden: 512, Heads: 8, KVHeads: 4, HeadDim: 128, FFN: 1536, Layers: 8, Vocab: 16384, Context: 4096, RopeBase: 1e6,
			Experts: 32, ExpertsUsed: 4, ExpertFFN: 256},
		{Name: "qwen3-30b-a3b", Arch: a, Hidden: 2048, Heads: 32, KVHeads: 4, HeadDim: 128, FFN: 6144, Layers: 48, Context: 40960, RopeBase: 1e6,
			Experts: 128, ExpertsUsed: 8, ExpertFFN: 768},
		{Name: "qwen3-235b-a22b", Arch: a, Hidden: 4096, Heads: 64, KVHeads: 4, HeadDim: 128, FFN: 12288, Layers: 94, Context: 40960, RopeBase: 1e6,
			Experts: 128, ExpertsUsed: 8, ExpertFFN: 1536},
	}
}

// withExperts applies SynthOptions.Experts: n experts per layer instead of the preset's, so
// a real shape's layers fit a small machine (each expert keeps its real size). On llama it
// turns the dense shape into Mixtral's, two experts per token.
func (p *Preset) withExperts(n int) error {
	if n <= 0 {
		return nil
	}
	if p.Experts == 0 && p.Arch != "llama" {
		return fmt.Errorf("%s preset %s has no experts to override (--experts applies to llama, making it Mixtral, and to mixture-of-experts families)", p.Arch, p.Name)
	}
	if p.ExpertsUsed == 0 {
		p.ExpertsUsed = 2
	}
	p.Experts, p.ExpertsUsed = n, min(p.ExpertsUsed, n)
	return nil
}

// setExpertKeys writes the expert metadata of a mixture-of-experts preset.
func setExpertKeys(kv fsggml.KV, arch string, p Preset) {
	if p.Experts == 0 {
		return
	}
	kv[arch+".expert_count"] = uint32(p.Experts)
	kv[arch+".expert_used_count"] = uint32(p.ExpertsUsed)
	if p.ExpertFFN > 0 {
		kv[arch+".expert_feed_forward_length"] = uint32(p.ExpertFFN)
	}
}

// expertSpecs are block b's router and expert tensors. The router stays F32 as llama.cpp's
// quantizer leaves it; the experts take the file's format. Scales are the dense MLP's: the
// renormalised top-k weights sum to one, so the mixture is as large as one expert's output.
func expertSpecs(b string, p Preset, f quant.Format) []tensorSpec {
	ffn := p.ExpertFFN
	if ffn == 0 {
		ffn = p.FFN
	}
	in := 1 / math.Sqrt(float64(p.Hidden))
	deep := 1 / math.Sqrt(float64(2*p.Layers))
	e := uint64(p.Experts)
	h := uint64(p.Hidden)
	return []tensorSpec{
		{name: b + "ffn_gate_inp.weight", ncols: h, nrows: e, std: in, format: mustFormat("f32")},
		{name: b + "ffn_gate_exps.weight", ncols: h, nrows: uint64(ffn), experts: e, std: in, format: f},
		{name: b + "ffn_up_exps.weight", ncols: h, nrows: uint64(ffn), experts: e, std: in, format: f},
		{name: b + "ffn_down_exps.weight", ncols: uint64(ffn), nrows: h, experts: e, std: 2 * deep / math.Sqrt(float64(ffn)), format: f},
	}
}
