package shard

import (
	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
)

// What families share beyond arch.go: the metadata they read alike and the halves of blocks
// they compute alike, so that a new family writes only what makes it differ.

// dims are the shape keys every family reads alike. Families embed them, so their code
// reads f.heads, f.eps and so on.
type dims struct {
	layers, hidden, heads, kvHeads int
	eps                            float32 // RMSNorm epsilon
}

// readDims reads c's block shape; eps is the RMSNorm epsilon when the file has none (the
// engine's default for the family, none for most).
func readDims(c fs.Config, eps ...float32) (dims, error) {
	d := dims{
		layers:  int(c.Uint("block_count")),
		hidden:  int(c.Uint("embedding_length")),
		heads:   int(c.Uint("attention.head_count")),
		kvHeads: int(c.Uint("attention.head_count_kv")),
		eps:     c.Float("attention.layer_norm_rms_epsilon", eps...),
	}
	if d.heads == 0 {
		return d, configError(c, "head_count is 0")
	}
	return d, nil
}

// ropeKeys are RoPE's base and its linear or YaRN scaling, under the keys most families use.
type ropeKeys struct {
	ropeBase, ropeScale float32
	yarn                bool // rope.scaling.type is yarn
	origContext         int  // rope.scaling.original_context_length
}

// readRope reads c's RoPE keys; base is the frequency base when the file has none.
func readRope(c fs.Config, base ...float32) ropeKeys {
	return ropeKeys{
		ropeBase:    c.Float("rope.freq_base", base...),
		ropeScale:   c.Float("rope.scaling.factor", 1),
		yarn:        c.String("rope.scaling.type") == "yarn",
		origContext: int(c.Uint("rope.scaling.original_context_length")),
	}
}

// gemmaKeys are the keys Gemma 2 and Gemma 3 read alike: head sizes that need not be
// hidden/heads, the sliding window and the final logit softcap.
type gemmaKeys struct {
	keyLen, valLen int
	slidingWindow  int32
	finalSoftcap   float32
}

// readGemma reads them; headDim is the head size when the file has none (Gemma 3's 256).
func readGemma(c fs.Config, headDim ...uint32) gemmaKeys {
	return gemmaKeys{
		keyLen:        int(c.Uint("attention.key_length", headDim...)),
		valLen:        int(c.Uint("attention.value_length", headDim...)),
		slidingWindow: int32(c.Uint("attention.sliding_window")),
		finalSoftcap:  c.Float("final_logit_softcapping", 0.0),
	}
}

// swigluMLP is the second half of a pre-norm block (llama's and its kin's), from attention's
// projected output x: the residual, then a SwiGLU MLP after its norm.
func swigluMLP(ctx ml.Context, w *block, eps float32, x, residual, outputs ml.Tensor) ml.Tensor {
	x, residual = prune(ctx, x, residual, outputs)
	h := x.Add(ctx, residual)

	x = h.RMSNorm(ctx, w.ffnNorm, eps)
	x = w.gate.forward(ctx, x).SILU(ctx, w.up.forward(ctx, x))
	return w.down.forward(ctx, x).Add(ctx, h)
}

// logits is the plain LM head: the final norm, then the output projection.
func (e *ends) logits(ctx ml.Context, eps float32, h ml.Tensor) ml.Tensor {
	return e.output.Mulmat(ctx, h.RMSNorm(ctx, e.norm, eps))
}
