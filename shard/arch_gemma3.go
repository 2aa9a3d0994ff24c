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
	layers                 int
	hidden, heads, kvHeads int
	keyLen, valLen         int
	eps                    float32
	ropeLocalBase          float32
	ropeBase, ropeScale    float32
	yarn                   bool
	ropeOrigContext        int
	ropeExtrapolation      float32
	ropeBetaFast           float32
	ropeBetaSlow           float32
	slidingWindow          int32
	slidingWindowPattern   []bool
	finalSoftcap           float32
	largeModelScaling      bool

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
	f := &gemma3{
		layers:               int(c.Uint("block_count")),
		hidden:               int(c.Uint("embedding_length")),
		heads:                int(c.Uint("attention.head_count")),
		kvHeads:              int(c.Uint("attention.head_count_kv")),
		keyLen:               int(c.Uint("attention.key_length", 256)),
		valLen:               int(c.Uint("attention.value_length", 256)),
		eps:                  c.Float("attention.layer_norm_rms_epsilon", 1e-06),
		ropeLocalBase:        c.Float("rope.local.freq_base", 10000.0),
		ropeBase:             c.Float("rope.freq_base", 1000000.0),
		ropeScale:            c.Float("rope.scaling.factor", 1.0),
		yarn:                 c.String("rope.scaling.type") == "yarn",
		ropeOrigContext:      int(c.Uint("rope.scaling.original_context_length")),
		ropeExtrapolation:    c.Float("rope.scaling.extrapolation_factor", 1.0),
		ropeBetaFast:         c.Float("rope.scaling.beta_fast", 64.0),
		ropeBetaSlow:         c.Float("rope.scaling.beta_slow", 1.0),
		slidingWindow:        int32(c.Uint("attention.sliding_window")),
		slidingWindowPattern: c.Bools("attention.sliding_window_pattern"),
		finalSoftcap:         c.Float("final_logit_softcapping", 0.0),
	}
	if f.heads == 0 {
		return nil, configError(c, "head_count is 0")
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
			rope.WithOriginalContextLength(f.ropeOrigContext),
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
	return f.embd.Rows(ctx, tokens).Scale(ctx, math.Sqrt(float64(f.hidden)))
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
	x = x.RMSNorm(ctx, w.postAttnNorm, f.eps)

	x, residual = prune(ctx, x, residual, outputs)
	h = x.Add(ctx, residual)

	x = h.RMSNorm(ctx, w.ffnNorm, f.eps)
	x = w.gate.forward(ctx, x).GELU(ctx, w.up.forward(ctx, x))
	x = w.down.forward(ctx, x)
	x = x.RMSNorm(ctx, w.postFFNNorm, f.eps)
	return x.Add(ctx, h)
}

func (f *gemma3) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	logits := f.output.Mulmat(ctx, h.RMSNorm(ctx, f.norm, f.eps))
	if f.finalSoftcap > 0 {
		logits = softcap(ctx, logits, f.finalSoftcap)
	}
	return logits
}

func (f *gemma3) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
