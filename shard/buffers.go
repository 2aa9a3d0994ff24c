package shard

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/ollama/ollama/ml"
)

// WeightBuffer is one ggml buffer type holding a stage's weights and how many bytes it holds.
// CPU_REPACK means ggml's interleaved layouts for its faster CPU matmul kernels (the engine
// patch in build/engine-patches); CPU is plain memory.
type WeightBuffer struct {
	Type  string `json:"type"`
	Bytes int64  `json:"bytes"`
}

// weightBufferer is what the patched engine's backend adds (build/engine-patches/0001).
type weightBufferer interface {
	WeightBuffers() map[string]uint64
}

// weightBuffers asks the backend where the weights landed. An engine built without the
// patch cannot say, and holds every weight in plain CPU memory: plain says how much.
func weightBuffers(b ml.Backend, plain int64) (bufs []WeightBuffer, patched bool) {
	wb, ok := b.(weightBufferer)
	if !ok {
		return []WeightBuffer{{Type: "CPU", Bytes: plain}}, false
	}
	for name, n := range wb.WeightBuffers() {
		bufs = append(bufs, WeightBuffer{Type: name, Bytes: int64(n)})
	}
	slices.SortFunc(bufs, func(a, b WeightBuffer) int {
		return cmp.Or(cmp.Compare(b.Bytes, a.Bytes), strings.Compare(a.Type, b.Type))
	})
	return bufs, true
}

// FormatWeightBuffers writes bufs as "CPU_REPACK 1.2 GiB, CPU 310.0 MiB".
func FormatWeightBuffers(bufs []WeightBuffer) string {
	parts := make([]string, len(bufs))
	for i, b := range bufs {
		parts[i] = fmt.Sprintf("%s %s", b.Type, HumanBytes(b.Bytes))
	}
	return strings.Join(parts, ", ")
}

// WeightBuffers reports the ggml buffer types the stage's weights landed in, largest first.
func (s *Stage) WeightBuffers() []WeightBuffer { return slices.Clone(s.weightBufs) }

// EnginePatched reports whether the engine was built with build/engine-patches (make build),
// which places matrix weights in ggml's extra CPU buffer types where its kernels take them.
func (s *Stage) EnginePatched() bool { return s.enginePatched }
