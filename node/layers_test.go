package node

import (
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// TestRangeMemory: /health's per-layer bytes are the planner's: on gemma2 (sliding window on
// even layers) a sliding layer is budgeted its window of KV and a global one the whole
// context, layer by layer, and the range's sums and ends add up to what the planner budgets
// for the range.
func TestRangeMemory(t *testing.T) {
	info, err := shard.ReadModelInfo(testkit.Model(t, testkit.SynthOptions{Arch: "gemma2", Preset: "tiny", Seed: 1, Type: "f32"}))
	if err != nil {
		t.Fatal(err)
	}
	const context, sessions = 2048, 8
	shape := info.Shape(context, sessions, 2)
	for _, r := range []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 5}, {Start: 4, End: info.Layers}, {Start: 0, End: info.Layers}} {
		m := rangeMemory(info, r, context, sessions, 2)
		if len(m.PerLayer) != r.Len() {
			t.Fatalf("%s: %d layers listed", r, len(m.PerLayer))
		}
		var sum int64
		for _, l := range m.PerLayer {
			perToken := info.KVBytesPerToken(2) * sessions
			switch {
			case l.Layer%2 == 0 && (l.Window != 16 || l.KVBytes != int64(l.Window+1)*perToken):
				t.Errorf("%s: sliding layer %d: window %d, KV %d bytes", r, l.Layer, l.Window, l.KVBytes)
			case l.Layer%2 == 1 && (l.Window != 0 || l.KVBytes != context*perToken):
				t.Errorf("%s: global layer %d: window %d, KV %d bytes, want %d", r, l.Layer, l.Window, l.KVBytes, context*perToken)
			case l.WeightBytes != info.LayerBytes[l.Layer] || l.WeightBytes == 0:
				t.Errorf("%s: layer %d weighs %d bytes, the file %d", r, l.Layer, l.WeightBytes, info.LayerBytes[l.Layer])
			}
			sum += l.WeightBytes + l.KVBytes
		}
		if (m.EmbedBytes > 0) != (r.Start == 0) || (m.HeadBytes > 0) != (r.End == info.Layers) {
			t.Errorf("%s: embeddings %d, head %d bytes", r, m.EmbedBytes, m.HeadBytes)
		}
		if got, want := m.WeightBytes+m.KVBytes, shape.RangeBytes(r); got != want || sum+m.EmbedBytes+m.HeadBytes != want {
			t.Errorf("%s: %d bytes (per layer %d), the planner budgets %d", r, got, sum+m.EmbedBytes+m.HeadBytes, want)
		}
	}
	if rangeMemory(info, shard.Range{}, context, sessions, 2) != nil {
		t.Error("an idle node lists layer memory")
	}
}
