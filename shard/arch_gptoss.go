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

// gptoss is OpenAI's gpt-oss: attention with biases and a learned sink logit per head (a
// softmax column that takes probability mass and contributes nothing), sliding-window
// attention on even blocks and global on odd ones, and a mixture of experts in every block:
// softmax over the router's top-k logits, experts with biases and a clamped SwiGLU
// (silu(alpha*g)*(u+1), both limited). Real files store the experts in MXFP4. As the engine's
// model/models/gptoss.
//
// The engine gives its sliding layers a cache that remembers 4096 tokens (for prompt reuse)
// and masks to the window; a stage keeps only the window, so those layers cost window tokens
// of KV whatever the context. The attention's result is the same (cells outside the window
// are masked either way), though a cache that wraps around may add the same terms in another
// order: the oracle holds it to the engine within 1e-4 and identical tokens.
type gptoss struct {
	layers                   int
	heads, kvHeads, headDim  int
	experts, expertsUsed     int
	eps, ropeBase, ropeScale float32
	origContext              int
	slidingWindow            int32

	ends
	blk []gptossBlock
	lo  int
}

type gptossBlock struct {
	attnNorm, ffnNorm ml.Tensor
	qkv, q, k, v, out linear
	sinks             ml.Tensor
	router            linear
	gateUp, gate, up  linear // expert tensors (3-D) and their per-expert biases
	down              linear
}

func newGptoss(c fs.Config) (family, error) {
	f := &gptoss{
		layers:        int(c.Uint("block_count")),
		heads:         int(c.Uint("attention.head_count")),
		kvHeads:       int(c.Uint("attention.head_count_kv")),
		experts:       int(c.Uint("expert_count")),
		expertsUsed:   int(c.Uint("expert_used_count")),
		eps:           c.Float("attention.layer_norm_rms_epsilon"),
		ropeBase:      c.Float("rope.freq_base"),
		ropeScale:     c.Float("rope.scaling.factor", 1.),
		origContext:   int(c.Uint("rope.scaling.original_context_length")),
		slidingWindow: int32(c.Uint("attention.sliding_window")),
	}
	switch {
	case f.heads == 0 || f.kvHeads == 0:
		return nil, configError(c, "head_count and head_count_kv are required")
	case f.experts == 0 || f.expertsUsed == 0 || f.expertsUsed > f.experts:
		return nil, configError(c, "expert_count %d and expert_used_count %d do not make a mixture of experts", f.experts, f.expertsUsed)
	case f.slidingWindow <= 0:
		return nil, configError(c, "attention.sliding_window is required")
	}
	f.headDim = cmp.Or(int(c.Uint("attention.key_length")), int(c.Uint("attention.value_length")), int(c.Uint("embedding_length"))/f.heads)
	return f, nil
}

func (f *gptoss) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.lo = r.Start
	f.blk = nil
	alt := func(p, name, other string) string {
		if t.opt(p+name+".weight") != nil {
			return p + name
		}
		return p + other
	}
	for l := r.Start; l < r.End; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		b := gptossBlock{
			attnNorm: t.get(p + "attn_norm.weight"),
			out:      bindLinear(t, alt(p, "attn_out", "attn_output")),
			router:   bindLinear(t, p+"ffn_gate_inp"),
			down:     bindLinear(t, p+"ffn_down_exps"),
		}
		if b.ffnNorm = t.opt(p + "ffn_norm.weight"); b.ffnNorm == nil {
			b.ffnNorm = t.get(p + "post_attention_norm.weight")
		}
		if b.sinks = t.opt(p + "attn_sinks"); b.sinks == nil {
			b.sinks = t.get(p + "attn_sinks.weight")
		}
		if t.opt(p+"attn_qkv.weight") != nil {
			b.qkv = bindLinear(t, p+"attn_qkv")
		} else {
			b.q, b.k, b.v = bindLinear(t, p+"attn_q"), bindLinear(t, p+"attn_k"), bindLinear(t, p+"attn_v")
		}
		if t.opt(p+"ffn_gate_up_exps.weight") != nil {
			b.gateUp = bindLinear(t, p+"ffn_gate_up_exps")
		} else {
			b.gate, b.up = bindLinear(t, p+"ffn_gate_exps"), bindLinear(t, p+"ffn_up_exps")
		}
		checkExpertCount(t, l, f.experts, b.router.w, b.gateUp.w, b.gate.w, b.up.w, b.down.w)
		f.blk = append(f.blk, b)
	}
}

// window: even blocks attend within the sliding window, odd ones globally.
func (f *gptoss) window(l int) int32 {
	if l%2 == 0 {
		return f.slidingWindow
	}
	return 0
}

func (f *gptoss) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	// ggml applies YaRN's attention factor itself for these options, as the engine notes.
	return nn.RoPE(ctx, x, positions, f.headDim, f.ropeBase, 1./f.ropeScale,
		rope.WithTypeNeoX(),
		rope.WithOriginalContextLength(f.origContext),
		rope.WithExtrapolationFactor(1.),
	)
}

func (f *gptoss) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

func (f *gptoss) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor { return f.embd.Rows(ctx, tokens) }

func (f *gptoss) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, &f.blk[l-f.lo], h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)
	var q, k, v ml.Tensor
	if w.qkv.w != nil {
		qkv := w.qkv.forward(ctx, x).Reshape(ctx, f.headDim, -1, n)
		chunks := qkv.ChunkSections(ctx, 1, f.heads, f.kvHeads, f.kvHeads)
		q, k, v = chunks[0], chunks[1], chunks[2]
	} else {
		q = w.q.forward(ctx, x).Reshape(ctx, f.headDim, f.heads, n)
		k = w.k.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
		v = w.v.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
	}
	q = f.rope(ctx, q, p.positions)
	k = f.rope(ctx, k, p.positions)
	a := nn.AttentionWithSinks(ctx, q, k, v, w.sinks, 1/math.Sqrt(float64(f.headDim)), p.cache)
	h = w.out.forward(ctx, a.Reshape(ctx, a.Dim(0)*a.Dim(1), n)).Add(ctx, residual)
	if outputs != nil {
		h = h.Rows(ctx, outputs)
	}
	return f.moe(ctx, w, h)
}

// moe is the engine's MLPBlock: softmax over the top-k router logits, clamped SwiGLU experts
// with biases, the residual added at the end.
func (f *gptoss) moe(ctx ml.Context, w *gptossBlock, h ml.Tensor) ml.Tensor {
	n := h.Dim(1)
	x := h.RMSNorm(ctx, w.ffnNorm, f.eps)
	logits := w.router.forward(ctx, x)
	idx := logits.TopK(ctx, f.expertsUsed)
	weights := logits.Reshape(ctx, 1, f.experts, n).Rows(ctx, idx)
	weights = weights.Reshape(ctx, f.expertsUsed, n).Softmax(ctx)
	weights = weights.Reshape(ctx, 1, f.expertsUsed, n)

	x = x.Reshape(ctx, x.Dim(0), 1, x.Dim(1))
	var gate, up ml.Tensor
	if w.gateUp.w != nil {
		gu := w.gateUp.forwardID(ctx, x, idx)
		gate = gu.Slice(ctx, 0, 0, gu.Dim(0), 2)
		up = gu.Slice(ctx, 0, 1, gu.Dim(0), 2)
	} else {
		gate = w.gate.forwardID(ctx, x, idx)
		up = w.up.forwardID(ctx, x, idx)
	}
	x = gate.SILUAlphaLimit(ctx, up, 1.702, 7)
	e := w.down.forwardID(ctx, x, idx).Mul(ctx, weights)
	return sumExpertOutputs(ctx, e, f.expertsUsed).Add(ctx, h)
}

// forwardID is the projection through each token's chosen experts (nn.LinearBatch).
func (l linear) forwardID(ctx ml.Context, x, idx ml.Tensor) ml.Tensor {
	x = l.w.MulmatID(ctx, x, idx)
	if l.b != nil {
		x = x.AddID(ctx, l.b, idx)
	}
	return x
}

func (f *gptoss) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.output.Mulmat(ctx, f.finalNorm(ctx, h))
}

func (f *gptoss) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
