package shard

import (
	"cmp"
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// llama is Llama 2/3 and everything shaped like it: pre-norm blocks, RoPE on adjacent pairs
// (with Llama 3.1's frequency factors when the file has them), grouped-query attention and a
// SwiGLU MLP. As the engine's model/models/llama. A file with llama.expert_count > 0 is Mixtral:
// the same block with a mixture of experts (moe.go) for the MLP, which the engine's llama lacks.
type llama struct {
	layers                                int
	hidden, heads, kvHeads, headDim, rdim int
	eps, ropeBase, ropeScale              float32

	neox  bool // RoPE on the two halves of each head (Qwen 2), not adjacent pairs
	route routing

	ends
	ropeFreqs ml.Tensor
	blocks
}

func newLlama(c fs.Config) (family, error) {
	// Mixtral renormalises its top-k weights (llama.cpp's build_moe_ffn with norm_w for llama).
	route, err := newRouting(c, true)
	if err != nil {
		return nil, err
	}
	f := &llama{
		route:     route,
		layers:    int(c.Uint("block_count")),
		hidden:    int(c.Uint("embedding_length")),
		heads:     int(c.Uint("attention.head_count")),
		kvHeads:   int(c.Uint("attention.head_count_kv")),
		eps:       c.Float("attention.layer_norm_rms_epsilon"),
		ropeBase:  c.Float("rope.freq_base", 1e5),
		ropeScale: c.Float("rope.scaling.factor", 1),
	}
	if f.heads == 0 {
		return nil, configError(c, "head_count is 0")
	}
	f.headDim = cmp.Or(int(c.Uint("attention.key_length")), f.hidden/f.heads)
	f.rdim = cmp.Or(int(c.Uint("rope.dimension_count")), f.headDim)
	return f, nil
}

func (f *llama) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.ropeFreqs = t.opt("rope_freqs.weight")
	f.blocks = bindBlocks(t, r, blockNames{preNorms: true, experts: f.route.count > 0})
	if f.route.count > 0 {
		checkExperts(t, f.blocks, f.route)
	}
}

func (f *llama) window(int) int32 { return 0 }

func (f *llama) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	if f.neox {
		return nn.RoPE(ctx, x, positions, f.rdim, f.ropeBase, 1/f.ropeScale, rope.WithTypeNeoX())
	}
	return nn.RoPE(ctx, x, positions, f.rdim, f.ropeBase, 1/f.ropeScale, rope.WithFactors(f.ropeFreqs))
}

func (f *llama) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

func (f *llama) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor { return f.embd.Rows(ctx, tokens) }

func (f *llama) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)
	q := w.q.forward(ctx, x).Reshape(ctx, f.headDim, f.heads, n)
	k := w.k.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
	v := w.v.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
	q = f.rope(ctx, q, p.positions)
	k = f.rope(ctx, k, p.positions)
	a := nn.Attention(ctx, q, k, v, 1/math.Sqrt(float64(f.headDim)), p.cache)
	x = w.o.forward(ctx, a.Reshape(ctx, f.headDim*f.heads, n))
	x, residual = prune(ctx, x, residual, outputs)
	h = x.Add(ctx, residual)

	x = h.RMSNorm(ctx, w.ffnNorm, f.eps)
	if f.route.count > 0 {
		return w.moe.forward(ctx, x, f.route).Add(ctx, h)
	}
	x = w.gate.forward(ctx, x).SILU(ctx, w.up.forward(ctx, x))
	return w.down.forward(ctx, x).Add(ctx, h)
}

func (f *llama) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.output.Mulmat(ctx, h.RMSNorm(ctx, f.norm, f.eps))
}

func (f *llama) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
