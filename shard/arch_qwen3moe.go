package shard

import "github.com/ollama/ollama/fs"

// newQwen3MoE is Qwen 3's mixture-of-experts models (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen 3's
// attention with every block's MLP a mixture of experts (moe.go), softmax gating over
// expert_count experts, expert_used_count per token, their weights renormalised unless the
// file sets norm_top_k_prob false. As the engine's model/models/qwen3, which serves both.
func newQwen3MoE(c fs.Config) (family, error) {
	route, err := newRouting(c, c.Bool("norm_top_k_prob", true))
	if err != nil {
		return nil, err
	}
	if route.count == 0 {
		return nil, configError(c, "expert_count is 0")
	}
	f, err := newQwen3(c)
	if err != nil {
		return nil, err
	}
	f.(*qwen3).route = route
	return f, nil
}
