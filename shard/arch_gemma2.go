package shard

import (
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
)

// gemma2 is Gemma 2: embeddings scaled by sqrt(hidden), sliding-window attention on even
// layers and global on odd ones, attention and final logits soft-capped with tanh, norms
// after attention and MLP as well as before, a GeGLU MLP. As the engine's model/models/gemma2,
// including what its Model.Forward alone decides: the 46-layer 27B model scales queries by
// hidden/heads instead of the key length.
type gemma2 struct {
	dims
	ropeKeys // base and linear scale; Gemma 2 has no YaRN
	gemmaKeys
	attnSoftcap       float32
	largeModelScaling bool

	ends
	blocks
}

// gemma2LargeLayers is the block count of Gemma 2 27B, the model whose queries the engine
// scales by 1/sqrt(hidden/heads).
const gemma2LargeLayers = 46

func newGemma2(c fs.Config) (family, error) {
	d, err := readDims(c)
	if err != nil {
		return nil, err
	}
	f := &gemma2{
		dims:        d,
		ropeKeys:    readRope(c, 10000.0),
		gemmaKeys:   readGemma(c),
		attnSoftcap: c.Float("attn_logit_softcapping"),
	}
	switch {
	case f.keyLen == 0 || f.valLen == 0:
		return nil, configError(c, "attention.key_length and attention.value_length are required")
	case f.attnSoftcap == 0 || f.finalSoftcap == 0:
		return nil, configError(c, "attn_logit_softcapping and final_logit_softcapping are required")
	}
	f.largeModelScaling = f.layers == gemma2LargeLayers
	return f, nil
}

func (f *gemma2) bind(t *tensors, r Range) {
	f.ends.bind(t, r, f.layers)
	f.blocks = bindBlocks(t, r, blockNames{preNorms: true, postNorms: true})
}

// window: even layers attend within the sliding window, odd ones globally.
func (f *gemma2) window(l int) int32 {
	if l%2 == 0 {
		return f.slidingWindow
	}
	return 0
}

// cacheConfig: gemma2 computes attention itself (for the softcap), reading V unpermuted and
// adding an F32 mask, as the engine configures its cache.
func (f *gemma2) cacheConfig() ml.CacheConfig { return ml.CacheConfig{} }

// queryScale is what queries are multiplied by before attention: 1/sqrt(key length), but
// 1/sqrt(hidden/heads) in Gemma 2 27B (its query_pre_attn_scalar is 144 = 4608/32, not the
// key length 128). The engine, like llama.cpp, knows the 27B model by its 46 blocks and
// decides in Model.Forward; block_count is the whole model's in every slice, so each stage
// decides the same from its own file.
func (f *gemma2) queryScale() float64 {
	if f.largeModelScaling {
		return 1.0 / math.Sqrt(float64(f.hidden/f.heads))
	}
	return 1.0 / math.Sqrt(float64(f.keyLen))
}

func (f *gemma2) rope(ctx ml.Context, x, positions ml.Tensor) ml.Tensor {
	return nn.RoPE(ctx, x, positions, f.keyLen, f.ropeBase, 1/f.ropeScale, rope.WithTypeNeoX())
}

func (f *gemma2) shift(ctx ml.Context, _ int, key, shift ml.Tensor) (ml.Tensor, error) {
	return f.rope(ctx, key, shift), nil
}

func (f *gemma2) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor {
	return gemmaEmbed(ctx, &f.ends, f.hidden, tokens)
}

func (f *gemma2) layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor {
	ctx, w, n := p.ctx, f.at(l), h.Dim(1)
	residual := h
	x := h.RMSNorm(ctx, w.attnNorm, f.eps)

	q := w.q.forward(ctx, x).Reshape(ctx, f.keyLen, f.heads, n)
	q = f.rope(ctx, q, p.positions)
	q = q.Scale(ctx, f.queryScale())
	k := w.k.forward(ctx, x).Reshape(ctx, f.keyLen, f.kvHeads, n)
	k = f.rope(ctx, k, p.positions)
	v := w.v.forward(ctx, x).Reshape(ctx, f.valLen, f.kvHeads, n)

	p.cache.Put(ctx, k, v)
	k, v, mask := p.cache.Get(ctx)
	q = q.Permute(ctx, 0, 2, 1, 3)
	k = k.Permute(ctx, 0, 2, 1, 3)
	v = v.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx)
	kq := softcap(ctx, k.Mulmat(ctx, q), f.attnSoftcap)
	kq = kq.Add(ctx, mask).Softmax(ctx)
	kqv := v.Mulmat(ctx, kq).Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)
	x = w.o.forward(ctx, kqv.Reshape(ctx, f.valLen*f.heads, n))
	return gemmaMLP(ctx, w, f.eps, x, residual, outputs)
}

func (f *gemma2) head(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return gemmaHead(ctx, &f.ends, f.eps, f.finalSoftcap, h)
}

// gemmaMLP is the second half of a Gemma 2 or 3 block, from attention's projected output
// x: its post-norm and the residual, then a GeGLU MLP between pre- and post-norms.
func gemmaMLP(ctx ml.Context, w *block, eps float32, x, residual, outputs ml.Tensor) ml.Tensor {
	x = x.RMSNorm(ctx, w.postAttnNorm, eps)

	x, residual = prune(ctx, x, residual, outputs)
	h := x.Add(ctx, residual)

	x = h.RMSNorm(ctx, w.ffnNorm, eps)
	x = w.gate.forward(ctx, x).GELU(ctx, w.up.forward(ctx, x))
	x = w.down.forward(ctx, x)
	x = x.RMSNorm(ctx, w.postFFNNorm, eps)
	return x.Add(ctx, h)
}

// gemmaEmbed is Gemma's embedding lookup, scaled by sqrt(hidden).
func gemmaEmbed(ctx ml.Context, e *ends, hidden int, tokens ml.Tensor) ml.Tensor {
	return e.embd.Rows(ctx, tokens).Scale(ctx, math.Sqrt(float64(hidden)))
}

// gemmaHead is Gemma's head, the logits soft-capped when the model caps them (every Gemma 2,
// no Gemma 3 but older files' 1B).
func gemmaHead(ctx ml.Context, e *ends, eps, finalSoftcap float32, h ml.Tensor) ml.Tensor {
	logits := e.logits(ctx, eps, h)
	if finalSoftcap > 0 {
		logits = softcap(ctx, logits, finalSoftcap)
	}
	return logits
}

func (f *gemma2) finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor {
	return h.RMSNorm(ctx, f.norm, f.eps)
}
