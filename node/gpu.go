package node

import (
	"context"
	"fmt"

	"github.com/strata-llm/strata/shard"
)

// The node's GPUs: ggml sees them when one of its GPU backends is built (make vulkan, make
// cuda) and found a device. The self-benchmark times a layer on the CPU and on the first GPU
// (speed.go); the node then offers the planner its GPUs' memory beside its RAM, at a speed
// that weighs both, and each stage it loads puts its last layers on the GPUs, as many as their
// memory holds (shard.PlaceLayers), the rest on the CPU.

// gpuOffer is the GPU memory the node offers the planner beside its RAM: each device's free
// memory less the reserve PlaceLayers keeps, and no more than maxLayers layers of layerCost
// bytes (weights and KV cache) when maxLayers > 0.
func gpuOffer(devs []shard.Device, maxLayers int, layerCost int64) int64 {
	var total int64
	for _, d := range devs {
		if reserve := d.FreeBytes/10 + 256<<20; d.FreeBytes > reserve {
			total += int64(d.FreeBytes - reserve)
		}
	}
	if maxLayers > 0 && layerCost > 0 {
		total = min(total, int64(maxLayers)*layerCost)
	}
	return total
}

// blendedMs is the ms per layer the node announces when gpuBytes of its offer are on GPUs:
// the mean over the offer's bytes of the GPU's and the CPU's speeds. It is pessimistic when the
// plan gives the node fewer layers than its offer, since those fill the GPUs first.
func blendedMs(cpuMs, gpuMs float64, gpuBytes, offer int64) float64 {
	if gpuMs <= 0 || gpuBytes <= 0 || offer <= 0 {
		return cpuMs
	}
	f := min(float64(gpuBytes)/float64(offer), 1)
	return f*gpuMs + (1-f)*cpuMs
}

// placement is where a stage of layers r computes on this node.
func (n *Node) placement(r shard.Range) shard.Placement {
	if len(n.gpus) == 0 || r.Empty() {
		return nil
	}
	limit := n.cfg.GPULayers
	if limit == 0 {
		limit = -1 // as many as fit
	}
	// Free memory as of the start: asking ggml again while a stage is loaded is unsafe (see
	// shard.GPUDevices). A stage loaded beside the one it replaces may then not fit; moveTo
	// falls back to the CPU.
	return shard.PlaceLayers(n.model, r, n.gpus, shard.PlaceOptions{
		MaxLayers: limit, Context: n.cfg.MaxContext, Sessions: n.cfg.MaxSessions, ElemBytes: 2,
	})
}

// loadStage loads layers r from file with the node's GPU placement, and on the CPU alone if
// the GPUs cannot take them (out of memory, an operation the backend lacks).
func (n *Node) loadStage(ctx context.Context, file string, r shard.Range, opts []shard.StageOption) (*shard.Stage, error) {
	n.askGPUs(file)
	p := n.placement(r)
	if p.GPULayerCount() == 0 {
		return shard.LoadStage(ctx, file, r, opts...)
	}
	st, err := shard.LoadStage(ctx, file, r, append(opts, shard.WithPlacement(p))...)
	if err == nil {
		return st, nil
	}
	n.log.Warn("could not load the layers on the GPU; loading them on the CPU", "range", r.String(), "placement", p.String(r), "err", err)
	st, err2 := shard.LoadStage(ctx, file, r, opts...)
	if err2 != nil {
		return nil, fmt.Errorf("%w (on the GPU: %v)", err2, err)
	}
	return st, nil
}

// askGPUs asks ggml for the GPUs on a node that ran no self-benchmark (its slices come from
// peers or the hub), before its first stage: ggml may be asked only while no stage exists
// (shard.GPUDevices). Such a node offered no GPU memory, so its plan is its RAM's; the GPUs
// still compute what it is given.
func (n *Node) askGPUs(file string) {
	if n.gpuAsked || n.cfg.GPULayers < 0 {
		return
	}
	n.mu.Lock()
	none := n.stage == nil && n.next == nil && len(n.retiring) == 0
	n.mu.Unlock()
	if !none {
		return
	}
	n.gpuAsked = true
	all, err := shard.GPUDevices(file)
	if err != nil {
		n.log.Warn("could not ask ggml for its GPUs", "err", err)
		return
	}
	if n.gpus, err = shard.SelectDevices(all, n.cfg.Devices); err != nil {
		n.log.Warn("--devices", "err", err)
		n.gpus = nil
	}
	if len(n.gpus) > 0 {
		n.log.Info("GPUs", "devices", deviceNames(n.gpus))
	}
}

// PlacementHealth says where this node's stage computes, for /health and `strata status`.
type PlacementHealth struct {
	Summary string          `json:"summary"` // "CPU [0,6), Vulkan0 [6,12)+head"
	GPUs    shard.Placement `json:"gpus,omitempty"`
	// Weights are the ggml buffer types the weights landed in ("Vulkan0", "CPU_REPACK", "CPU").
	Weights []shard.WeightBuffer `json:"weights,omitempty"`
}

func stagePlacement(st *shard.Stage) *PlacementHealth {
	if st == nil {
		return nil
	}
	p := st.Placement()
	return &PlacementHealth{Summary: p.String(st.Info().Range), GPUs: p, Weights: st.WeightBuffers()}
}

func deviceNames(devs []shard.Device) []string {
	out := make([]string, len(devs))
	for i, d := range devs {
		out[i] = d.Name + " (" + d.Description + ")"
	}
	return out
}
