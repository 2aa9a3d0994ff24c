package cli

import (
	"bytes"
	"regexp"
	"testing"

	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/shard"
)

// TestStatusLayerMemory: status lists what the node's layers cost, a row per run of layers
// that cost the same, with the embeddings and head on the stages that hold them.
func TestStatusLayerMemory(t *testing.T) {
	h := node.Health{Ready: true, Model: "m", Layers: 6, PeerID: "p", State: "serving", Range: &shard.Range{Start: 0, End: 4},
		RangeMemory: &node.RangeMemory{Range: shard.Range{Start: 0, End: 4}, Sessions: 8, Context: 2048, KVElemBytes: 2,
			WeightBytes: 3 << 20, KVBytes: 5 << 20, EmbedBytes: 1 << 20, PerLayer: []node.LayerMemory{
				{Layer: 0, WeightBytes: 512 << 10, KVBytes: 17 << 10, Window: 16},
				{Layer: 1, WeightBytes: 512 << 10, KVBytes: 2 << 20},
				{Layer: 2, WeightBytes: 512 << 10, KVBytes: 2 << 20},
				{Layer: 3, WeightBytes: 512 << 10, KVBytes: 17 << 10, Window: 16},
			}}}
	var out bytes.Buffer
	printStatus(&out, h)
	for _, want := range []string{
		`(?m)^layers \[0,4\) on this node: weights 3\.0 MiB, KV cache 5\.0 MiB \(8 sessions x 2048 tokens, 2 bytes per value\)$`,
		`(?m)^embeddings +1\.0 MiB +- +-$`,
		`(?m)^\[0,1\) +512\.0 KiB +17\.0 KiB +window 16$`,
		`(?m)^\[1,3\) +512\.0 KiB +2\.0 MiB +global$`,
		`(?m)^\[3,4\) +512\.0 KiB +17\.0 KiB +window 16$`,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("no line %s in:\n%s", want, out.String())
		}
	}
	if regexp.MustCompile(`(?m)^head`).MatchString(out.String()) {
		t.Errorf("a first stage shows a head:\n%s", out.String())
	}
}
