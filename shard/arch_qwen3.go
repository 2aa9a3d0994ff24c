package shard

import (
	"cmp"
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// qwen3 is Qwen 3 (dense): llama's block without biases, with an RMSNorm over each head of Q
// and K before RoPE (NeoX order, YaRN when the file asks). As the engine's model/models/qwen3.
// Its mixture-of-experts sibling qwen3moe differs only in the MLP.
type qwen3 struct {
	dims
	ropeKeys
	headDim int
	route   routing // qwen3moe's experts (arch_qwen3moe.go); count 0 for dense

	ends
	blocks
}

func newQwen3(c fs.Config) (family, error) {
	d, err := readDims(c)
	if err != nil {
		return nil, err
	}
	f := &qwen3{dims: d, ropeKeys: readRope(c)}
	f.headDim = cmp.Or(int(c.Uint("attention.key_length")), int(c.Uint("attention.value_length")), f.hidden/f.heads)
	return f, nil
}

func (f *qwen3) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.blocks = bindBlocks(t, r, blockNames{preNorms: true, qkNorms: true, experts: f.route.count > 0})
	if f.route.count > 0 {
		checkExperts(t, f.blocks, f.route)
	}
}

func (f *qwen3) window(int) int32 { return 0 }

func (f *qwen3) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	opts := []func(*rope.Options){rope.WithTypeNeoX()}
	if f.yarn {
		opts = append(opts,
			rope.WithOriginalContextLength(f.origContext),
			rope.WithExtrapolationFactor(1),
			rope.WithAttentionFactor(float32(1/(1+0.1*math.Log(float64(f.ropeScale))))),
		)
	}
	return nn.RoPE(ctx, x, positions, f.headDim, f.ropeBase, 1/f.ropeScale, opts...)
}

func (f *qwen3) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

func (f *qwen3) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor { return f.embd.Rows(ctx, tokens) }

func (f *qwen3) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)
	q := w.q.forward(ctx, x)
	k := w.k.forward(ctx, x)
	v := w.v.forward(ctx, x)
	q = q.Reshape(ctx, f.headDim, f.heads, n)
	k = k.Reshape(ctx, f.headDim, f.kvHeads, n)
	v = v.Reshape(ctx, f.headDim, f.kvHeads, n)
	q = q.RMSNorm(ctx, w.qNorm, f.eps)
	k = k.RMSNorm(ctx, w.kNorm, f.eps)
	q = f.rope(ctx, q, p.positions)
	k = f.rope(ctx, k, p.positions)
	a := nn.Attention(ctx, q, k, v, 1/math.Sqrt(float64(f.headDim)), p.cache)
	x = w.o.forward(ctx, a.Reshape(ctx, a.Dim(0)*a.Dim(1), n))
	if f.route.count > 0 {
		x, residual = prune(ctx, x, residual, outputs)
		h = x.Add(ctx, residual)
		return w.moe.forward(ctx, h.RMSNorm(ctx, w.ffnNorm, f.eps), f.route).Add(ctx, h)
	}
	return swigluMLP(ctx, w, f.eps, x, residual, outputs)
}

func (f *qwen3) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.logits(ctx, f.eps, h)
}

func (f *qwen3) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
