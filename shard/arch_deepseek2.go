package shard

import (
	"cmp"
	"fmt"
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// deepseek2 is DeepSeek V2/V3/R1: multi-head latent attention (queries through an optional
// low-rank bottleneck, keys and values from one compressed latent per token plus a shared
// rotary key), the first leading_dense_block_count blocks with a dense SwiGLU MLP and the rest
// with a mixture of experts: sigmoid gates, top-k chosen on the gates plus a per-expert bias
// (exp_probs_b), weighted by the unbiased gates normalised over the k and scaled by the routed
// scaling factor, plus shared experts every token goes through. As the engine's
// model/models/deepseek2, including what it leaves out: V3's group-limited routing (the top
// expert_group_used_count of expert_group_count groups first, then top-k within them) is not
// done; every token picks its top-k over all experts, as ollama runs these files.
//
// Files converted with attn_k_b/attn_v_b (key_length_mla set, as llama.cpp writes them) run
// attention on the latent itself: the KV cache holds, per token and layer, the kv_lora_rank
// latent and the rope key (and the latent again as V), one head, instead of every head's K
// and V; ModelInfo's KV bytes follow from key_length and value_length, which such files set
// to those sizes. Files without them decompress K and V per head as plain attention.
type deepseek2 struct {
	layers, denseLayers int
	mla                 bool

	heads, kvHeads       int
	qLoraRank, kvLora    int
	ropeDim, nopeDim     int
	vHeadDim             int
	experts, expertsUsed int
	normTopK             bool
	routedScale          float32
	origContext          int
	eps, ropeBase        float32
	ropeScale            float32
	kqScale              float64

	ends
	blk []deepseekBlock
	lo  int
}

type deepseekBlock struct {
	attnNorm, ffnNorm ml.Tensor

	q, qa, qb    linear
	qaNorm       ml.Tensor
	kva, kvb     linear
	kvaNorm      ml.Tensor
	kb, vb, out  linear
	dense        *swiglu // leading dense blocks
	router       linear
	gateExps     ml.Tensor
	upExps       ml.Tensor
	downExps     ml.Tensor
	shared       *swiglu
	expProbsBias ml.Tensor
}

// swiglu is a SwiGLU MLP: down(silu(gate(x)) * up(x)).
type swiglu struct{ gate, up, down linear }

func bindSwiGLU(t *tensors, prefix, suffix string) *swiglu {
	return &swiglu{gate: bindLinear(t, prefix+"ffn_gate"+suffix), up: bindLinear(t, prefix+"ffn_up"+suffix), down: bindLinear(t, prefix+"ffn_down"+suffix)}
}

func (m *swiglu) forward(ctx ml.Context, x ml.Tensor) ml.Tensor {
	return m.down.forward(ctx, m.gate.forward(ctx, x).SILU(ctx, m.up.forward(ctx, x)))
}

func newDeepseek2(c fs.Config) (family, error) {
	keyLen := int(cmp.Or(c.Uint("attention.key_length_mla"), c.Uint("attention.key_length")))
	valLen := int(cmp.Or(c.Uint("attention.value_length_mla"), c.Uint("attention.value_length")))
	f := &deepseek2{
		layers:      int(c.Uint("block_count")),
		denseLayers: int(c.Uint("leading_dense_block_count")),
		mla:         c.Uint("attention.key_length_mla") != 0 && c.Uint("attention.value_length_mla") != 0,
		heads:       int(c.Uint("attention.head_count")),
		kvHeads:     int(c.Uint("attention.head_count_kv")),
		qLoraRank:   int(c.Uint("attention.q_lora_rank")),
		kvLora:      int(c.Uint("attention.kv_lora_rank")),
		ropeDim:     int(c.Uint("rope.dimension_count")),
		vHeadDim:    valLen,
		experts:     int(c.Uint("expert_count")),
		expertsUsed: int(c.Uint("expert_used_count")),
		normTopK:    c.Bool("expert_weights_norm", true),
		routedScale: c.Float("expert_weights_scale"),
		origContext: int(c.Uint("rope.scaling.original_context_length")),
		eps:         c.Float("attention.layer_norm_rms_epsilon"),
		ropeBase:    c.Float("rope.freq_base"),
		ropeScale:   c.Float("rope.scaling.factor", 1),
	}
	f.nopeDim = keyLen - f.ropeDim
	// The attention scale: YaRN's magnitude correction squared over the square root of a
	// head's query-key size (keyLen: key_length_mla in MLA files, whose key_length is the
	// cached row; the pinned engine divides by that row, fixed by build/engine-patches/0002,
	// as llama.cpp does). Without a scaling factor the engine's formula takes log(0); Strata
	// takes the factor as 1.
	mScale := float32(1.0)
	if factor := c.Float("rope.scaling.factor"); factor != 0 {
		mScale = float32(1.0 + float64(c.Float("rope.scaling.yarn_log_multiplier"))*math.Log(float64(factor)))
	}
	f.kqScale = float64(mScale) * float64(mScale) / math.Sqrt(float64(keyLen))
	switch {
	case f.heads == 0 || f.kvHeads == 0:
		return nil, configError(c, "head_count and head_count_kv are required")
	case f.kvLora == 0 || f.ropeDim == 0 || f.nopeDim <= 0 || f.vHeadDim == 0:
		return nil, configError(c, "kv_lora_rank, rope.dimension_count, key_length and value_length are required (key_length above the rope dimensions)")
	case f.denseLayers < f.layers && (f.experts == 0 || f.expertsUsed == 0 || f.expertsUsed > f.experts):
		return nil, configError(c, "expert_count %d and expert_used_count %d do not make a mixture of experts", f.experts, f.expertsUsed)
	}
	return f, nil
}

func (f *deepseek2) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.lo = r.Start
	f.blk = nil
	for l := r.Start; l < r.End; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		b := deepseekBlock{
			attnNorm: t.get(p + "attn_norm.weight"),
			ffnNorm:  t.get(p + "ffn_norm.weight"),
			kva:      bindLinear(t, p+"attn_kv_a_mqa"),
			kvaNorm:  t.get(p + "attn_kv_a_norm.weight"),
		}
		if f.qLoraRank == 0 {
			b.q = bindLinear(t, p+"attn_q")
		} else {
			b.qa, b.qb = bindLinear(t, p+"attn_q_a"), bindLinear(t, p+"attn_q_b")
			b.qaNorm = t.get(p + "attn_q_a_norm.weight")
		}
		if f.mla {
			b.kb, b.vb = bindLinear(t, p+"attn_k_b"), bindLinear(t, p+"attn_v_b")
		} else {
			b.kvb = bindLinear(t, p+"attn_kv_b")
		}
		if t.opt(p+"attn_out.weight") != nil {
			b.out = bindLinear(t, p+"attn_out")
		} else {
			b.out = bindLinear(t, p+"attn_output")
		}
		if l < f.denseLayers {
			b.dense = bindSwiGLU(t, p, "")
		} else {
			b.router = bindLinear(t, p+"ffn_gate_inp")
			b.gateExps = t.get(p + "ffn_gate_exps.weight")
			b.upExps = t.get(p + "ffn_up_exps.weight")
			b.downExps = t.get(p + "ffn_down_exps.weight")
			b.shared = bindSwiGLU(t, p, "_shexp")
			if b.expProbsBias = t.opt(p + "exp_probs_b.bias"); b.expProbsBias == nil {
				b.expProbsBias = t.opt(p + "exp_probs_b")
			}
			checkExpertCount(t, l, f.experts, b.router.w, b.gateExps, b.upExps, b.downExps)
		}
		f.blk = append(f.blk, b)
	}
}

func (f *deepseek2) window(int) int32 { return 0 }

func (f *deepseek2) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	return nn.RoPE(ctx, x, positions, f.ropeDim, f.ropeBase, 1./f.ropeScale,
		rope.WithOriginalContextLength(f.origContext),
		rope.WithExtrapolationFactor(1.),
		rope.WithAttentionFactor(float32(1.0/(1.0+0.1*math.Log(float64(f.ropeScale))))),
	)
}

func (f *deepseek2) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

func (f *deepseek2) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor {
	return f.embd.Rows(ctx, tokens)
}

func (f *deepseek2) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w := p.ctx, &f.blk[l-f.lo]
	residual := h
	x := f.attention(p, w, h.RMSNorm(ctx, w.attnNorm, f.eps))
	x, residual = prune(ctx, x, residual, outputs)
	h = x.Add(ctx, residual)

	x = h.RMSNorm(ctx, w.ffnNorm, f.eps)
	if w.dense != nil {
		x = w.dense.forward(ctx, x)
	} else {
		x = f.moe(ctx, w, x)
	}
	return x.Add(ctx, h)
}

// attention is multi-head latent attention, in the engine's op order.
func (f *deepseek2) attention(p *pass, w *deepseekBlock, x ml.Tensor) ml.Tensor {
	ctx, n := p.ctx, x.Dim(1)
	var q ml.Tensor
	if f.qLoraRank == 0 {
		q = w.q.forward(ctx, x)
	} else {
		q = w.qa.forward(ctx, x).RMSNorm(ctx, w.qaNorm, f.eps)
		q = w.qb.forward(ctx, q)
	}
	q = q.Reshape(ctx, q.Dim(0)/f.heads, f.heads, n)
	qChunks := q.ChunkSections(ctx, 0, f.nopeDim, f.ropeDim)

	latent := w.kva.forward(ctx, x)
	kPass := latent.Slice(ctx, 0, 0, f.kvLora, 1)
	kRot := latent.View(ctx,
		f.kvLora*latent.Stride(0), f.ropeDim,
		latent.Stride(1), 1,
		latent.Stride(1), latent.Dim(1),
	)
	qRot := f.rope(ctx, qChunks[1], p.positions)
	kRot = f.rope(ctx, kRot, p.positions)
	kPass = kPass.RMSNorm(ctx, w.kvaNorm, f.eps)

	var a ml.Tensor
	if !f.mla {
		kPass = w.kvb.forward(ctx, kPass)
		kv := kPass.Reshape(ctx, kPass.Dim(0)/f.kvHeads, f.kvHeads, n)
		kvChunks := kv.ChunkSections(ctx, 0, f.nopeDim, f.vHeadDim)
		kRot = kRot.Repeat(ctx, 1, qChunks[0].Dim(1))
		query := qRot.Concat(ctx, qChunks[0], 0)
		key := kRot.Concat(ctx, kvChunks[0], 0)
		a = nn.Attention(ctx, query, key, kvChunks[1], f.kqScale, p.cache)
	} else {
		qPass := qChunks[0].Permute(ctx, 0, 2, 1, 3)
		qAbsorb := w.kb.forward(ctx, qPass).Permute(ctx, 0, 2, 1, 3)
		query := qRot.Concat(ctx, qAbsorb, 0)
		kPass = kPass.Reshape(ctx, f.kvLora, 1, n)
		key := kRot.Concat(ctx, kPass, 0)
		a = nn.AttentionWithVMLA(ctx, query, key, kPass, nil, w.vb.w, f.kqScale, p.cache)
	}
	a = a.Reshape(ctx, a.Dim(0)*a.Dim(1), n)
	return w.out.forward(ctx, a)
}

// moe routes each token to its top-k experts by sigmoid gates and adds the shared experts.
func (f *deepseek2) moe(ctx ml.Context, w *deepseekBlock, x ml.Tensor) ml.Tensor {
	n := x.Dim(1)
	scores := w.router.forward(ctx, x).Sigmoid(ctx)
	sel := scores
	if w.expProbsBias != nil {
		sel = sel.Add(ctx, w.expProbsBias)
	}
	idx := sel.TopK(ctx, f.expertsUsed)
	weights := scores.Reshape(ctx, 1, f.experts, n).Rows(ctx, idx)
	if f.normTopK {
		weights = weights.Reshape(ctx, f.expertsUsed, n)
		weights = weights.Div(ctx, weights.SumRows(ctx))
		weights = weights.Reshape(ctx, 1, f.expertsUsed, n)
	}
	weights = weights.Scale(ctx, float64(f.routedScale))

	e := routedExperts(ctx, x, idx, weights, w.gateExps, w.upExps, w.downExps, f.expertsUsed)
	return e.Add(ctx, w.shared.forward(ctx, x))
}

// routedExperts runs each token through its chosen experts' SwiGLU MLPs and sums their outputs
// weighted by weights, as the engine's MoE blocks do (MulmatID on 3-D expert tensors).
func routedExperts(ctx ml.Context, x, idx, weights, gate, up, down ml.Tensor, used int) ml.Tensor {
	x = x.Reshape(ctx, x.Dim(0), 1, x.Dim(1))
	u := up.MulmatID(ctx, x, idx)
	g := gate.MulmatID(ctx, x, idx)
	e := down.MulmatID(ctx, g.SILU(ctx, u), idx).Mul(ctx, weights)
	return sumExpertOutputs(ctx, e, used)
}

func (f *deepseek2) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.output.Mulmat(ctx, f.finalNorm(ctx, h))
}

func (f *deepseek2) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
