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
		e := &bs.b[i].moe
		if e.router == nil || e.gate == nil || e.up == nil || e.down == nil {
			return
		}
		checkExpertCount(t, bs.start+i, r.count, e.router, e.gate, e.up, e.down)
	}
}

// checkExpertCount fails the bind when a block's router or expert tensors hold another number
// of experts than the metadata says, so such a file is refused at load with what is wrong
// rather than failing inside a graph.
func checkExpertCount(t *tensors, l, experts int, router ml.Tensor, exps ...ml.Tensor) {
	if t.missing != nil || router == nil {
		return
	}
	if router.Dim(1) != experts {
		t.missing = fmt.Errorf("blk.%d.ffn_gate_inp scores %d experts, metadata says %d", l, router.Dim(1), experts)
		return
	}
	for _, e := range exps {
		if e != nil && e.Dim(2) != experts {
			t.missing = fmt.Errorf("blk.%d: expert tensors hold %d experts, metadata says %d", l, e.Dim(2), experts)
			return
		}
	}
}

// sumExpertOutputs adds the used expert outputs of each token, in order, as the engine does.
func sumExpertOutputs(ctx ml.Context, e ml.Tensor, used int) ml.Tensor {
	next := e.View(ctx, 0, e.Dim(0), e.Stride(2), e.Dim(2))
	for i := 1; i < used; i++ {
		next = next.Add(ctx, e.View(ctx, i*e.Stride(1), e.Dim(0), e.Stride(2), e.Dim(2)))
	}
	return next
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
	return sumExpertOutputs(ctx, e.down.MulmatID(ctx, h, selected).Mul(ctx, weights), r.used)
}
