package node

import (
	"testing"

	"github.com/strata-llm/strata/shard"
)

// TestGPUOffer: a node offers its GPUs' free memory less the reserve PlaceLayers keeps,
// bounded by --gpu-layers, and announces a speed between its GPU's and its CPU's by the share
// of its offer on the GPU.
func TestGPUOffer(t *testing.T) {
	const GiB = 1 << 30
	devs := []shard.Device{{Name: "CUDA0", FreeBytes: 10 * GiB}, {Name: "CUDA1", FreeBytes: 256 << 20}}
	if got, want := gpuOffer(devs, 0, GiB), int64(9*GiB-256<<20); got != want {
		t.Errorf("offer %d, want %d (10 GiB less 10%% and 256 MiB; a device under its reserve adds nothing)", got, want)
	}
	if got := gpuOffer(devs, 3, GiB); got != 3*GiB {
		t.Errorf("offer with --gpu-layers 3 of 1 GiB each: %d, want %d", got, 3*GiB)
	}
	if got := gpuOffer(nil, 0, GiB); got != 0 {
		t.Errorf("no GPU: offer %d", got)
	}
	for _, c := range []struct {
		cpu, gpu     float64
		gpuB, offerB int64
		want         float64
	}{
		{10, 1, 0, 100, 10},   // nothing on the GPU
		{10, 1, 100, 100, 1},  // all of it
		{10, 1, 50, 100, 5.5}, // half
		{10, 0, 50, 100, 10},  // the GPU was not measured
	} {
		if got := blendedMs(c.cpu, c.gpu, c.gpuB, c.offerB); got != c.want {
			t.Errorf("blendedMs(%v, %v, %d, %d) = %v, want %v", c.cpu, c.gpu, c.gpuB, c.offerB, got, c.want)
		}
	}
}
