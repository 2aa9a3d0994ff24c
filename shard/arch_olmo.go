package shard

import (
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// olmo is OLMo 2 and 3: norms only after attention and MLP (none before), an RMSNorm over
// all of Q and over all of K before the heads are split, NeoX RoPE, a SwiGLU MLP. OLMo 3
// slides the attention window on the layers its sliding_window_pattern marks (three of
// every four), rotating them without the global layers' RoPE scaling. As the engine's
// model/models/olmo3; the engine has no olmo2, which is olmo3 with every layer global.
type olmo struct {
	layers                 int
	hidden, heads, kvHeads int
	eps, ropeBase          float32
	ropeScale              float32
	origContext            int
	extrapolation          float32
	slidingWindow          int32
	pattern                []bool // nil: every layer global

	ends
	blocks
}

func newOlmo(c fs.Config) (family, error) {
	f := &olmo{
		layers:        int(c.Uint("block_count")),
		hidden:        int(c.Uint("embedding_length")),
		heads:         int(c.Uint("attention.head_count")),
		kvHeads:       int(c.Uint("attention.head_count_kv")),
		eps:           c.Float("attention.layer_norm_rms_epsilon"),
		ropeBase:      c.Float("rope.freq_base", 1e4),
		ropeScale:     c.Float("rope.scaling.factor", 1),
		origContext:   int(c.Uint("rope.scaling.original_context_length")),
		extrapolation: c.Float("rope.scaling.extrapolation_factor", 1.0),
		slidingWindow: int32(c.Uint("attention.sliding_window")),
		pattern:       c.Bools("attention.sliding_window_pattern"),
	}
	if f.heads == 0 {
		return nil, configError(c, "head_count is 0")
	}
	if c.Architecture() == "olmo3" && len(f.pattern) != f.layers {
		return nil, configError(c, "sliding_window_pattern has %d entries for %d layers", len(f.pattern), f.layers)
	}
	if c.Architecture() == "olmo2" {
		f.pattern = nil
	}
	return f, nil
}

func (f *olmo) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.blocks = bindBlocks(t, r, blockNames{qkNorms: true, postNorms: true})
}

func (f *olmo) sliding(l int) bool { return f.pattern != nil && f.pattern[l] }

func (f *olmo) window(l int) int32 {
	if f.sliding(l) {
		return f.slidingWindow
	}
	return 0
}

func (f *olmo) rope(ctx ml.Context, x, positions ml.Tensor, l int) ml.Tensor {
	scale := float32(1)
	opts := []func(*rope.Options){rope.WithTypeNeoX()}
	if !f.sliding(l) {
		scale = 1 / f.ropeScale
		if f.origContext > 0 {
			opts = append(opts, rope.WithOriginalContextLength(f.origContext), rope.WithExtrapolationFactor(f.extrapolation))
		}
	}
	return nn.RoPE(ctx, x, positions, f.hidden/f.heads, f.ropeBase, scale, opts...)
}

func (f *olmo) shift(ctx ml.Context, l int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift, l), nil
}

func (f *olmo) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor { return f.embd.Rows(ctx, tokens) }

func (f *olmo) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	headDim := f.hidden / f.heads
	residual := h

	q := w.q.forward(ctx, h).RMSNorm(ctx, w.qNorm, f.eps).Reshape(ctx, headDim, f.heads, n)
	q = f.rope(ctx, q, p.positions, l)
	k := w.k.forward(ctx, h).RMSNorm(ctx, w.kNorm, f.eps).Reshape(ctx, headDim, f.kvHeads, n)
	k = f.rope(ctx, k, p.positions, l)
	v := w.v.forward(ctx, h).Reshape(ctx, headDim, f.kvHeads, n)
	a := nn.Attention(ctx, q, k, v, 1.0/math.Sqrt(float64(headDim)), p.cache)
	x := w.o.forward(ctx, a.Reshape(ctx, f.hidden, n))

	x, residual = prune(ctx, x, residual, outputs)
	x = x.RMSNorm(ctx, w.postAttnNorm, f.eps)
	h = x.Add(ctx, residual)

	x = w.gate.forward(ctx, h).SILU(ctx, w.up.forward(ctx, h))
	x = w.down.forward(ctx, x).RMSNorm(ctx, w.postFFNNorm, f.eps)
	return x.Add(ctx, h)
}

func (f *olmo) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.output.Mulmat(ctx, h.RMSNorm(ctx, f.norm, f.eps))
}

func (f *olmo) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor { return h.RMSNorm(ctx, f.norm, f.eps) }
