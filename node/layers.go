package node

import "github.com/strata-llm/strata/shard"

// RangeMemory is what the layers a node serves cost it: each block's weights and the KV
// cache budgeted for it, which differ per layer (a sliding-window layer keeps only its window
// of KV, and blocks of one model may differ in weights), plus the embeddings on the first
// stage and the head on the last. It is the planner's own accounting for this range.
type RangeMemory struct {
	Range       shard.Range   `json:"range"`
	Sessions    int           `json:"sessions"`      // KV is budgeted for this many sessions...
	Context     int           `json:"context"`       // ... of this many tokens each
	KVElemBytes int           `json:"kv_elem_bytes"` // bytes per cached element (2: F16)
	WeightBytes int64         `json:"weight_bytes"`  // every tensor of the range, embeddings and head included
	KVBytes     int64         `json:"kv_bytes"`
	EmbedBytes  int64         `json:"embed_bytes,omitempty"` // token_embd, on the stage holding layer 0
	HeadBytes   int64         `json:"head_bytes,omitempty"`  // output_norm and output, on the last stage
	PerLayer    []LayerMemory `json:"layers"`
}

// LayerMemory is one block's share of a RangeMemory.
type LayerMemory struct {
	Layer       int   `json:"layer"`
	WeightBytes int64 `json:"weight_bytes"`
	KVBytes     int64 `json:"kv_bytes"`
	Window      int   `json:"window,omitempty"` // sliding attention window in tokens; absent: global
}

// rangeMemory is r's memory for sessions of context tokens with a KV cache of elemBytes per
// element, by the same arithmetic as ModelInfo.Shape, which the planner budgets with.
func rangeMemory(m *shard.ModelInfo, r shard.Range, context, sessions, elemBytes int) *RangeMemory {
	if r.Empty() {
		return nil
	}
	rm := &RangeMemory{Range: r, Sessions: sessions, Context: context, KVElemBytes: elemBytes, WeightBytes: m.RangeBytes(r)}
	if r.Start == 0 {
		rm.EmbedBytes = m.EmbedBytes
	}
	if r.End == m.Layers {
		rm.HeadBytes = m.HeadBytes
	}
	for l := r.Start; l < r.End && l < m.Layers; l++ {
		lm := LayerMemory{Layer: l, KVBytes: m.RangeKVBytes(shard.Range{Start: l, End: l + 1}, context, sessions, elemBytes)}
		if l < len(m.LayerBytes) {
			lm.WeightBytes = m.LayerBytes[l]
		}
		if l < len(m.Windows) {
			lm.Window = m.Windows[l]
		}
		rm.KVBytes += lm.KVBytes
		rm.PerLayer = append(rm.PerLayer, lm)
	}
	return rm
}
