package bench

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/strata-llm/strata/shard"
)

// kvElemBytes is the element size of the nodes' KV cache (F16), which the node budgets with.
const kvElemBytes = 2

// Shape is the planner's view of a model when every node budgets KV cache for sessions x
// context tokens per layer, as `strata node start --context C --max-sessions S` does: the
// same per-layer costs the nodes plan with (a sliding layer's window, dense and MoE blocks).
func Shape(info *shard.ModelInfo, context, sessions int) shard.ModelShape {
	return info.Shape(context, sessions, kvElemBytes)
}

// NodeMemory is the --max-memory that makes k identical nodes split the model into one chain
// through all k of them: the least memory with which the swarm's planner (shard.PlanLayers,
// the function every node runs) gives every node layers and forms a single replica chain. It
// returns the ranges that plan assigns, in pipeline order.
//
// Giving nodes only as much memory as their share is what keeps a benchmark honest: with more,
// the planner would rightly form replicas or leave nodes idle, and the swarm measured would
// not be the k-stage pipeline asked for.
func NodeMemory(info *shard.ModelInfo, k, context, sessions int) (int64, []shard.Range, error) {
	if k < 1 {
		return 0, nil, fmt.Errorf("node memory: want at least one node, got %d", k)
	}
	if k > info.Layers {
		return 0, nil, fmt.Errorf("node memory: %d nodes cannot each hold a layer of a %d-layer model", k, info.Layers)
	}
	if len(info.LayerBytes) == 0 {
		return 0, nil, errors.New("node memory: the model has no layers")
	}
	shape := Shape(info, context, sessions)
	if k == 1 {
		return shape.TotalBytes(), []shard.Range{{Start: 0, End: info.Layers}}, nil
	}
	// The planner's capacities jump at these budgets: the costliest run of i layers with the
	// embeddings, with the head, with both, or alone. Anything in between holds no more than
	// the budget below it.
	var budgets []int64
	for i := 1; i <= info.Layers; i++ {
		var c int64
		for a := 0; a+i <= info.Layers; a++ {
			c = max(c, shape.RangeBytes(shard.Range{Start: a, End: a + i})-rangeEnds(shape, a, a+i))
		}
		budgets = append(budgets, c, shape.EmbedBytes+c, shape.HeadBytes+c, shape.EmbedBytes+shape.HeadBytes+c)
	}
	slices.Sort(budgets)
	budgets = slices.Compact(budgets)
	nodes := make([]shard.NodeCapacity, k)
	for _, mem := range budgets {
		for i := range nodes {
			// Equal speeds: the nodes of a local benchmark share one machine.
			nodes[i] = shard.NodeCapacity{ID: fmt.Sprintf("node-%03d", i), MemoryBytes: mem, MsPerLayer: 1}
		}
		plan, err := shard.PlanLayers(shape, nodes)
		if err != nil {
			var short *shard.InsufficientMemoryError
			if errors.As(err, &short) {
				continue
			}
			return 0, nil, fmt.Errorf("node memory: %w", err)
		}
		if plan.Replicas != 1 {
			continue
		}
		var ranges []shard.Range
		for _, a := range plan.Assignments {
			if !a.Range.Empty() {
				ranges = append(ranges, a.Range)
			}
		}
		if len(ranges) != k {
			continue
		}
		slices.SortFunc(ranges, func(a, b shard.Range) int { return cmp.Compare(a.Start, b.Start) })
		return mem, ranges, nil
	}
	return 0, nil, fmt.Errorf("node memory: no budget makes %d equal nodes form one chain over %d layers", k, info.Layers)
}

// NodeFootprint is the memory a node serving r should use: its weights and its KV cache
// (sessions x context tokens per layer, F16), without runtime overhead.
func NodeFootprint(info *shard.ModelInfo, r shard.Range, context, sessions int) (weights, kv int64) {
	return info.RangeBytes(r), info.RangeKVBytes(r, context, sessions, kvElemBytes)
}

// rangeEnds is what the embeddings and the head add to layers [a,b).
func rangeEnds(s shard.ModelShape, a, b int) int64 {
	var n int64
	if a == 0 {
		n += s.EmbedBytes
	}
	if b == s.Layers {
		n += s.HeadBytes
	}
	return n
}
