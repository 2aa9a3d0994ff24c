package shard

import (
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// gemma3 is Gemma 3's text model: embeddings scaled by sqrt(hidden), five sliding-window
// layers (local RoPE base) to one global layer, RMSNorm over each head of Q and K, norms
// before and after attention and MLP, a GeGLU MLP, optionally soft-capped logits. As the
// engine's model/models/gemma3, including its corrections for older files and the 62-layer
// 27B model's query scaling; the vision tower never travels with a slice.
type gemma3 struct {
	dims
	ropeKeys
	gemmaKeys
	ropeLocalBase        float32
	ropeExtrapolation    float32
	ropeBetaFast         float32
	ropeBetaSlow         float32
	slidingWindowPattern []bool
	largeModelScaling    bool

	ends
	blocks
}

// Gemma 3's block counts by size, which the engine keys corrections on.
const (
	gemma3GlobalEvery = 6
	gemma3Layers1B    = 26
	gemma3Layers4B    = 34
	gemma3Layers12B   = 48
	gemma3Layers27B   = 62
)

func newGemma3(c fs.Config) (family, error) {
	d, err := readDims(c, 1e-06)
	if err != nil {
		return nil, err
	}
	f := &gemma3{
		dims:                 d,
		ropeKeys:             readRope(c, 1000000.0),
		gemmaKeys:            readGemma(c, 256),
		ropeLocalBase:        c.Float("rope.local.freq_base", 10000.0),
		ropeExtrapolation:    c.Float("rope.scaling.extrapolation_factor", 1.0),
		ropeBetaFast:         c.Float("rope.scaling.beta_fast", 64.0),
		ropeBetaSlow:         c.Float("rope.scaling.beta_slow", 1.0),
		slidingWindowPattern: c.Bools("attention.sliding_window_pattern"),
	}
	if f.slidingWindowPattern != nil && len(f.slidingWindowPattern) != f.layers {
		return nil, configError(c, "sliding_window_pattern has %d entries for %d layers", len(f.slidingWindowPattern), f.layers)
	}
	if uint32(f.slidingWindow) < c.Uint("context_length") {
		switch f.layers {
		case gemma3Layers1B:
			f.finalSoftcap = 0 // set to 30 in the 1B file, but the model has none
		case gemma3Layers4B, gemma3Layers12B, gemma3Layers27B:
			f.ropeScale = 8 // unset in those files
		}
	}
	f.largeModelScaling = f.layers == gemma3Layers27B
	return f, nil
}

func (f *gemma3) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.blocks = bindBlocks(t, r, blockNames{preNorms: true, qkNorms: true, postNorms: true})
}

// window: every sixth layer is global, the others slide. The engine picks the cache by this
// rule alone (the pattern key only changes RoPE), so Strata does the same.
func (f *gemma3) window(l int) int32 {
	if (l+1)%gemma3GlobalEvery == 0 {
		return 0
	}
	return f.slidingWindow
}

// ropeFor is the engine's ropeValuesForLayer: local layers rotate with the local base.
func (f *gemma3) ropeFor(l int) (base, scale float32) {
	if f.slidingWindowPattern != nil && f.slidingWindowPattern[l] {
		return f.ropeLocalBase, 1
	}
	if (l+1)%gemma3GlobalEvery > 0 {
		return f.ropeLocalBase, 1
	}
	return f.ropeBase, f.ropeScale
}

func (f *gemma3) rope(ctx ml.Context, x, positions ml.Tensor, l int) ml.Tensor {
	base, scale := f.ropeFor(l)
	opts := []func(*rope.Options){rope.WithTypeNeoX()}
	if f.yarn {
		opts = append(opts,
			rope.WithOriginalContextLength(f.origContext),
			rope.WithExtrapolationFactor(f.ropeExtrapolation),
			rope.WithAttentionFactor(float32(1.0/(1.0+0.1*math.Log(float64(scale))))),
			rope.WithBetaFast(f.ropeBetaFast),
			rope.WithBetaSlow(f.ropeBetaSlow),
		)
	}
	return nn.RoPE(ctx, x, positions, f.keyLen, base, 1/scale, opts...)
}

func (f *gemma3) shift(ctx ml.Context, l int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift, l), nil
}

func (f *gemma3) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor {
	return gemmaEmbed(ctx, &f.ends, f.hidden, tokens)
}

func (f *gemma3) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)

	q := w.q.forward(ctx, x).Reshape(ctx, f.keyLen, f.heads, n)
	q = q.RMSNorm(ctx, w.qNorm, f.eps)
	q = f.rope(ctx, q, p.positions, l)
	if f.largeModelScaling {
		q = q.Scale(ctx, 1.0/math.Sqrt(float64(f.hidden/f.heads)))
	} else {
		q = q.Scale(ctx, 1.0/math.Sqrt(float64(f.keyLen)))
	}
	k := w.k.forward(ctx, x).Reshape(ctx, f.keyLen, f.kvHeads, n)
	k = k.RMSNorm(ctx, w.kNorm, f.eps)
	k = f.rope(ctx, k, p.positions, l)
	v := w.v.forward(ctx, x).Reshape(ctx, f.valLen, f.kvHeads, n)
	a := nn.Attention(ctx, q, k, v, 1.0, p.cache)
	x = w.o.forward(ctx, a.Reshape(ctx, f.valLen*f.heads, n))
	return gemmaMLP(ctx, w, f.eps, x, residual, outputs)
}

func (f *gemma3) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return gemmaHead(ctx, &f.ends, f.eps, f.finalSoftcap, h)
}

func (f *gemma3) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
