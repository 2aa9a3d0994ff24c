package shard

import (
	"fmt"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/ml"
)

// experts is a block's mixture-of-experts MLP with softmax gating, as Mixtral and Qwen 3 MoE
// have it: a router scores every expert per token, the top k run (their SwiGLU weights stored
// as one 3-D tensor per projection, experts on the outer axis) and their outputs are summed
// weighted by the router's probabilities, renormalised over the k chosen. The op sequence is
// the engine's (model/models/qwen3's sparse MLP), so Strata's numbers are its numbers; ggml's
// MulmatID does the per-token expert selection, no kernel is written here.
type experts struct {
	router         ml.Tensor // ffn_gate_inp: hidden -> one logit per expert
	gate, up, down ml.Tensor // ffn_{gate,up,down}_exps
}

// routing is how a family picks experts.
type routing struct {
	count, used int  // experts per layer, and per token
	norm        bool // renormalise the chosen experts' weights to sum to one
}

// newRouting reads the expert keys of c; count 0 means a dense model.
func newRouting(c fs.Config, norm bool) (routing, error) {
	r := routing{count: int(c.Uint("expert_count")), used: int(c.Uint("expert_used_count")), norm: norm}
	if r.count == 0 {
		return r, nil
	}
	if r.used <= 0 || r.used > r.count {
		return r, configError(c, "expert_used_count %d is not in 1..expert_count (%d)", r.used, r.count)
	}
	return r, nil
}

func bindExperts(t *tensors, prefix string) experts {
	return experts{
		router: t.get(prefix + "ffn_gate_inp.weight"),
		gate:   t.get(prefix + "ffn_gate_exps.weight"),
		up:     t.get(prefix + "ffn_up_exps.weight"),
		down:   t.get(prefix + "ffn_down_exps.weight"),
	}
}

// checkExperts verifies each block's expert tensors agree with the metadata's count, so a
// file whose keys lie fails at load saying what is wrong instead of inside a graph.
func checkExperts(t *tensors, bs blocks, r routing) {
	for i := range bs.b {
		if t.missing != nil {
			return
		}
		l, e := bs.start+i, &bs.b[i].moe
		if e.router == nil || e.gate == nil || e.up == nil || e.down == nil {
			return
		}
		if e.router.Dim(1) != r.count {
			t.missing = fmt.Errorf("blk.%d.ffn_gate_inp scores %d experts, metadata says %d", l, e.router.Dim(1), r.count)
		}
		for _, w := range []ml.Tensor{e.gate, e.up, e.down} {
			if w.Dim(2) != r.count && t.missing == nil {
				t.missing = fmt.Errorf("blk.%d: expert tensors hold %d experts, metadata says %d", l, w.Dim(2), r.count)
			}
		}
	}
}

// forward is the MoE MLP of h, one column per token.
func (e *experts) forward(ctx ml.Context, h ml.Tensor, r routing) ml.Tensor {
	n := h.Dim(1)
	weights := e.router.Mulmat(ctx, h).Softmax(ctx)
	selected := weights.TopK(ctx, r.used)
	weights = weights.Reshape(ctx, 1, r.count, n).Rows(ctx, selected)
	if r.norm {
		weights = weights.Reshape(ctx, r.used, n)
		weights = weights.Div(ctx, weights.SumRows(ctx))
		weights = weights.Reshape(ctx, 1, r.used, n)
	}
	h = h.Reshape(ctx, h.Dim(0), 1, n)
	h = e.gate.MulmatID(ctx, h, selected).SILU(ctx, e.up.MulmatID(ctx, h, selected))
	out := e.down.MulmatID(ctx, h, selected).Mul(ctx, weights)
	sum := out.View(ctx, 0, out.Dim(0), out.Stride(2), out.Dim(2))
	for i := 1; i < r.used; i++ {
		sum = sum.Add(ctx, out.View(ctx, i*out.Stride(1), out.Dim(0), out.Stride(2), out.Dim(2)))
	}
	return sum
}
