package shard

import (
	"fmt"
	"slices"
	"strings"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
)

// Each architecture's forward pass is written here against ml ops, one file per family
// (arch_<name>.go), rather than by driving the engine's exported layer types per range. The
// engine's layers do the arithmetic, but what makes a model that model lives in each family's
// Model.Forward, which a stage serving a range cannot call: the cache kind of each layer
// (gemma2's i%2, gemma3's every sixth, olmo3's pattern), gemma2's largeModelScaling (an
// unexported flag that only Model.Forward sets), mistral3's per-position attention scale (an
// unexported function), the embedding scale and logit softcap at the ends. Driving the layers
// would mean re-implementing every Model.Forward anyway, plus reaching into unexported state
// with reflection, and Mixtral (next: mixture of experts) has no engine layer at all. Written
// against the same ml ops in the same order, each family gives the engine's numbers exactly;
// the oracles in arch_test.go compare with the engine's own Model.Forward on the whole model.

// family is one architecture's forward pass over a stage's layers. Layer indices are always
// the model's (absolute), whatever range the stage serves.
type family interface {
	// bind looks up the weights a stage serving r needs: its layers, the embeddings when r
	// holds layer 0 and the head when it holds the last.
	bind(t *tensors, r Range)
	// window is layer l's sliding attention window in tokens, 0 for global attention. It
	// picks the layer's KV cache and sizes its memory.
	window(l int) int32
	// embed turns token ids into the first layer's input.
	embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor
	// layer runs block l on h. outputs, when not nil, are the rows the model's last block
	// keeps: the engine prunes to them after attention, so Strata does too.
	layer(p *pass, l int, h, outputs ml.Tensor) ml.Tensor
	// head turns the last block's output into logits.
	head(ctx ml.Context, h ml.Tensor) ml.Tensor
	// finalNorm is the final norm alone, what head applies before the LM head: the hidden state
	// embeddings are pooled from.
	finalNorm(ctx ml.Context, h ml.Tensor) ml.Tensor
	// shift re-rotates layer l's cached keys when the cache moves positions.
	shift(ctx ml.Context, l int, key, shift ml.Tensor) (ml.Tensor, error)
}

// cacheConfigurer is a family whose attention needs a KV cache layout other than the
// backend's (gemma2 computes attention itself, with unpermuted V and an F32 mask).
type cacheConfigurer interface {
	cacheConfig() ml.CacheConfig
}

// pass is one forward of a stage: what every layer of it shares.
type pass struct {
	ctx       ml.Context
	positions ml.Tensor // the batch's positions, one per row
	raw       []int32   // the same positions, for families that derive inputs from them
	cache     kvcache.Cache
	memo      map[string]ml.Tensor // per-pass inputs a family derives once (mistral3's scale)
}

func (p *pass) once(key string, f func() ml.Tensor) ml.Tensor {
	if t, ok := p.memo[key]; ok {
		return t
	}
	if p.memo == nil {
		p.memo = map[string]ml.Tensor{}
	}
	t := f()
	p.memo[key] = t
	return t
}

// Architectures lists the GGUF architectures Strata runs.
func Architectures() []string {
	return []string{"gemma2", "gemma3", "llama", "mistral3", "olmo2", "olmo3", "qwen2", "qwen3", "qwen3moe", "deepseek2", "gptoss", "gpt-oss"}
}

// ErrUnsupportedArch is wrapped by the error for a model of an architecture Strata does not run.
var ErrUnsupportedArch = fmt.Errorf("unsupported architecture")

// newFamily builds the forward pass of c's architecture from its metadata.
func newFamily(c fs.Config) (family, error) {
	switch arch := c.Architecture(); arch {
	case "llama":
		return newLlama(c)
	case "qwen2":
		return newQwen2(c)
	case "qwen3":
		return newQwen3(c)
	case "qwen3moe":
		return newQwen3MoE(c)
	case "mistral3":
		return newMistral3(c)
	case "gemma2":
		return newGemma2(c)
	case "gemma3":
		return newGemma3(c)
	case "olmo2", "olmo3":
		return newOlmo(c)
	case "deepseek2":
		return newDeepseek2(c)
	case "gptoss", "gpt-oss": // ollama's name and llama.cpp's
		return newGptoss(c)
	default:
		return nil, fmt.Errorf("%w %q: Strata runs %s", ErrUnsupportedArch, arch, strings.Join(Architectures(), ", "))
	}
}

// tensors looks up weights in a loaded backend, remembering the first required one missing.
type tensors struct {
	b       ml.Backend
	missing error
}

func (t *tensors) get(name string) ml.Tensor {
	w := t.b.Get(name)
	if w == nil && t.missing == nil {
		t.missing = fmt.Errorf("model file lacks tensor %s", name)
	}
	return w
}

// opt is a tensor some files of a family have and others not (biases, rope factors).
func (t *tensors) opt(name string) ml.Tensor { return t.b.Get(name) }

// ends are the embeddings and the head: token_embd on the first stage, output_norm and
// output (token_embd when tied) on the last.
type ends struct {
	embd, norm, output ml.Tensor
}

func (e *ends) bind(t *tensors, r Range, layers int) {
	if r.Start == 0 {
		e.embd = t.get("token_embd.weight")
	}
	if r.End == layers {
		e.norm = t.get("output_norm.weight")
		if e.output = t.opt("output.weight"); e.output == nil {
			e.output = t.get("token_embd.weight")
		}
	}
}

// linear is a projection with an optional bias, as nn.Linear computes it.
type linear struct{ w, b ml.Tensor }

func bindLinear(t *tensors, name string) linear {
	return linear{w: t.get(name + ".weight"), b: t.opt(name + ".bias")}
}

func (l linear) forward(ctx ml.Context, x ml.Tensor) ml.Tensor {
	x = l.w.Mulmat(ctx, x)
	if l.b != nil {
		x = x.Add(ctx, l.b)
	}
	return x
}

// block holds the weights of one transformer block under their GGUF names; each family binds
// the ones it has.
type block struct {
	attnNorm, qNorm, kNorm, postAttnNorm ml.Tensor
	q, k, v, o                           linear
	ffnNorm, postFFNNorm                 ml.Tensor
	gate, up, down                       linear
	moe                                  experts // instead of gate, up, down (moe.go)
}

// blockNames are the optional parts of a block a family binds.
type blockNames struct {
	preNorms, qkNorms, postNorms bool
	experts                      bool // a mixture-of-experts MLP, no dense one
}

func bindBlock(t *tensors, l int, n blockNames) block {
	p := fmt.Sprintf("blk.%d.", l)
	b := block{
		q: bindLinear(t, p+"attn_q"), k: bindLinear(t, p+"attn_k"), v: bindLinear(t, p+"attn_v"), o: bindLinear(t, p+"attn_output"),
	}
	if n.experts {
		b.moe = bindExperts(t, p)
	} else {
		b.gate, b.up, b.down = bindLinear(t, p+"ffn_gate"), bindLinear(t, p+"ffn_up"), bindLinear(t, p+"ffn_down")
	}
	if n.preNorms {
		b.attnNorm = t.get(p + "attn_norm.weight")
		b.ffnNorm = t.get(p + "ffn_norm.weight")
	}
	if n.qkNorms {
		b.qNorm = t.get(p + "attn_q_norm.weight")
		b.kNorm = t.get(p + "attn_k_norm.weight")
	}
	if n.postNorms {
		b.postAttnNorm = t.get(p + "post_attention_norm.weight")
		b.postFFNNorm = t.get(p + "post_ffw_norm.weight")
	}
	return b
}

// blocks are a stage's blocks, indexed by absolute layer.
type blocks struct {
	start int
	b     []block
}

func bindBlocks(t *tensors, r Range, n blockNames) blocks {
	bs := blocks{start: r.Start}
	for l := r.Start; l < r.End; l++ {
		bs.b = append(bs.b, bindBlock(t, l, n))
	}
	return bs
}

func (bs *blocks) at(l int) *block { return &bs.b[l-bs.start] }

// prune keeps the rows of h and residual the last block needs.
func prune(ctx ml.Context, h, residual, outputs ml.Tensor) (ml.Tensor, ml.Tensor) {
	if outputs == nil {
		return h, residual
	}
	return h.Rows(ctx, outputs), residual.Rows(ctx, outputs)
}

// softcap is tanh(x/c)*c, gemma's bound on logits.
func softcap(ctx ml.Context, x ml.Tensor, c float32) ml.Tensor {
	x = x.Scale(ctx, 1.0/float64(c))
	x = x.Tanh(ctx)
	return x.Scale(ctx, float64(c))
}

// configError names the metadata key a family cannot run without.
func configError(c fs.Config, format string, args ...any) error {
	return fmt.Errorf("%s model metadata: %s", c.Architecture(), fmt.Sprintf(format, args...))
}

// Supported reports whether Strata runs GGUF architecture arch.
func Supported(arch string) bool { return slices.Contains(Architectures(), arch) }
