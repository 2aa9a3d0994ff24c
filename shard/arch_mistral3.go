package shard

import (
	"cmp"
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// mistral3 is Mistral Small 3.x (the text model; a slice never carries the vision tower):
// llama's block, with YaRN RoPE and a per-position query scale when the file sets
// rope.scaling.original_context_length. As the engine's model/models/mistral3, whose scale
// comes from an unexported function; positionScale recomputes it from the same keys.
type mistral3 struct {
	dims
	ropeKeys
	headDim, rdim int

	scalingBeta          float32
	extrapolation        float32
	betaFast, betaSlow   float32
	mscale, mscaleAllDim float32

	ends
	blocks
}

func newMistral3(c fs.Config) (family, error) {
	d, err := readDims(c)
	if err != nil {
		return nil, err
	}
	f := &mistral3{
		dims:          d,
		ropeKeys:      readRope(c),
		scalingBeta:   c.Float("rope.scaling_beta", 0.1),
		extrapolation: c.Float("rope.scaling.extrapolation_factor", 1),
		betaFast:      c.Float("rope.scaling.beta_fast", 32),
		betaSlow:      c.Float("rope.scaling.beta_slow", 1),
		mscale:        c.Float("rope.scaling.mscale"),
		mscaleAllDim:  c.Float("rope.scaling.mscale_all_dim"),
	}
	f.headDim = cmp.Or(int(c.Uint("attention.key_length")), f.hidden/f.heads)
	f.rdim = cmp.Or(int(c.Uint("rope.dimension_count")), f.headDim)
	return f, nil
}

func (f *mistral3) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.blocks = bindBlocks(t, r, blockNames{preNorms: true})
}

func (f *mistral3) window(int) int32 { return 0 }

func (f *mistral3) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	var opts []func(*rope.Options)
	if f.yarn {
		if f.mscale != 0 && f.mscaleAllDim != 0 {
			opts = append(opts, rope.WithAttentionFactor(1.0/float32(0.1*math.Log(float64(f.ropeScale))+1.0)))
		}
		opts = append(opts,
			rope.WithOriginalContextLength(f.origContext),
			rope.WithExtrapolationFactor(f.extrapolation),
			rope.WithBetaFast(f.betaFast),
			rope.WithBetaSlow(f.betaSlow),
		)
	}
	return nn.RoPE(ctx, x, positions, f.rdim, f.ropeBase, 1/f.ropeScale, opts...)
}

func (f *mistral3) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

// positionScale is the engine's TextModel.getScale: queries at positions past each
// original-context interval are scaled up by 1 + beta*log(1 + interval).
func (f *mistral3) positionScale(p *pass) ml.Tensor {
	return p.once("mistral3.position_scale", func() ml.Tensor {
		s := make([]float32, len(p.raw))
		for i, pos := range p.raw {
			interval := math.Floor(float64(pos) / float64(f.origContext))
			s[i] = float32(1.0 + float64(f.scalingBeta)*math.Log(1.0+interval))
		}
		return p.ctx.Input().FromFloats(s, 1, 1, len(s))
	})
}

func (f *mistral3) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor { return f.embd.Rows(ctx, tokens) }

func (f *mistral3) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)
	q := w.q.forward(ctx, x).Reshape(ctx, f.headDim, f.heads, n)
	q = f.rope(ctx, q, p.positions)
	k := w.k.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
	k = f.rope(ctx, k, p.positions)
	v := w.v.forward(ctx, x).Reshape(ctx, f.headDim, f.kvHeads, n)
	if f.origContext > 0 {
		q = q.Mul(ctx, f.positionScale(p))
	}
	a := nn.Attention(ctx, q, k, v, 1/math.Sqrt(float64(f.headDim)), p.cache)
	x = w.o.forward(ctx, a.Reshape(ctx, f.headDim*f.heads, n))
	return swigluMLP(ctx, w, f.eps, x, residual, outputs)
}

func (f *mistral3) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return f.logits(ctx, f.eps, h)
}

func (f *mistral3) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
