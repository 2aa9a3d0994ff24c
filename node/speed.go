package node

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"time"

	"github.com/strata-llm/strata/shard"
)

// benchResult is what the self-benchmark at start measured.
type benchResult struct {
	Range      shard.Range   // the layers timed
	MsPerLayer float32       // announced: ms per layer per token, rounded (see roundSpeed)
	RawMs      float64       // the fastest step's ms per layer, unrounded
	Steps      int           // timed steps
	Took       time.Duration // everything: cutting the slice, loading, warm-up, steps
	FreeGPU    uint64        // free memory of the GPUs ggml sees, bytes
	GPUs       int           // how many GPUs ggml sees
	// Devices are the GPUs this node computes on (--devices of the ones ggml sees), and
	// GPURawMs the fastest step's ms per layer on the first of them (0: none measured).
	Devices  []shard.Device
	GPURawMs float64
}

// The self-benchmark's step budget: a few steps give a stable minimum, and a 70B-shaped
// layer (480 MB at Q4_0, 25 ms per token on a quiet desktop CPU, 150-200 ms on two busy
// cores) stays well under a second of compute.
const (
	benchWarmup   = 1 // the first compute allocates the graph
	benchMinSteps = 2
	benchMaxSteps = 6
	benchBudget   = 200 * time.Millisecond
)

// benchRange is the layer the self-benchmark times: a middle one, so its slice carries
// neither the embeddings nor the LM head (590 MB each on a Llama 3 vocabulary) and the time
// is a transformer block's alone; the largest such block, since the planner budgets by it.
// Models of one or two layers have no middle; their first layer stands in.
func benchRange(m *shard.ModelInfo) shard.Range {
	if m.Layers < 3 {
		return shard.Range{Start: 0, End: 1}
	}
	best := 1
	for l := 1; l < m.Layers-1; l++ {
		if m.LayerBytes[l] > m.LayerBytes[best] {
			best = l
		}
	}
	return shard.Range{Start: best, End: best + 1}
}

// selfBench measures this node's decode speed on the model it serves: it loads one layer
// (cut into the slice cache like any stage, so a restart loads it without cutting again),
// runs single-token decode steps through it, and takes the fastest. It runs before the node
// joins, so the planner's first plan already weighs the node by its real speed; the
// bandwidth of a memcpy, which this replaces, misses compute-bound CPUs and quantized
// kernels. With --cpu-lock the steps take the shared lock like any stage, so nodes sharing
// cores measure one at a time; the minimum discounts waits for it.
//
// On a tiny model the time is mostly ggml's fixed cost per graph rather than the layer's,
// which still ranks nodes of one machine alike.
func (n *Node) selfBench(ctx context.Context) (benchResult, error) {
	start := time.Now()
	r := benchRange(n.model)
	res := benchResult{Range: r}
	sliceDir := filepath.Join(n.cfg.DataDir, "slices")
	opts := []shard.StageOption{
		shard.WithSliceDir(sliceDir),
		shard.WithModelSHA256(n.sha),
		shard.WithThreads(n.cfg.Threads),
		shard.WithMaxSessions(1),
		shard.WithMaxContext(256),
		shard.WithLogger(n.log.With("component", "self-benchmark")),
	}
	if n.cpu != nil {
		opts = append(opts, shard.WithCPULock(n.cpu))
	}
	// The slice is cut first so that the devices can be asked through a backend of it: ggml
	// enumerates them only for a model file, and shard does not expose a stage's backend.
	path := n.modelPath
	if n.model.Layers > 1 {
		var err error
		if path, err = (shard.SliceCache{Dir: sliceDir}).Ensure(ctx, n.modelPath, n.sha, r, nil); err != nil {
			return res, fmt.Errorf("self-benchmark: cut layer %s: %w", r, err)
		}
	}
	// Before any stage exists: see shard.GPUDevices.
	all, err := shard.GPUDevices(path)
	if err != nil {
		n.log.Warn("could not ask ggml for its GPUs", "err", err)
	}
	res.GPUs = len(all)
	for _, d := range all {
		res.FreeGPU += d.FreeBytes
	}
	if n.cfg.GPULayers >= 0 {
		if res.Devices, err = shard.SelectDevices(all, n.cfg.Devices); err != nil {
			return res, err
		}
	}
	if res.RawMs, res.Steps, err = benchStage(ctx, path, r, opts); err != nil {
		return res, err
	}
	if len(res.Devices) > 0 {
		// The same layer on the first GPU: the offer's layers there run at this speed.
		p := shard.Placement{{Device: res.Devices[0], Layers: r, Output: r.End == n.model.Layers}}
		ms, _, err := benchStage(ctx, path, r, append(opts, shard.WithPlacement(p)))
		if err != nil {
			n.log.Warn("self-benchmark on the GPU failed; serving on the CPU", "device", res.Devices[0].Name, "err", err)
			res.Devices = nil
		} else {
			res.GPURawMs = ms
		}
	}
	res.MsPerLayer = roundSpeed(res.RawMs)
	res.Took = time.Since(start)
	return res, nil
}

// benchStage loads layers r of the file at path with opts and times single-token decode
// steps through them: the fastest step's ms per layer, and how many steps were timed.
func benchStage(ctx context.Context, path string, r shard.Range, opts []shard.StageOption) (float64, int, error) {
	steps := 0
	st, err := shard.LoadStage(ctx, path, r, opts...)
	if err != nil {
		return 0, 0, fmt.Errorf("self-benchmark: %w", err)
	}
	defer st.Close()

	info := st.Info()
	const session = 1
	if err := st.OpenSession(session); err != nil {
		return 0, 0, fmt.Errorf("self-benchmark: %w", err)
	}
	step := shard.Step{Session: session}
	if info.First() {
		step.Tokens = []int32{int32(1 % max(info.Vocab, 1))}
	} else {
		step.Hidden = make([]float32, info.Hidden)
		for i := range step.Hidden {
			step.Hidden[i] = float32(math.Sin(float64(i))) // activation-like: bounded, varied
		}
	}
	best := math.Inf(1)
	timed := time.Duration(0)
	for i := 0; i < benchWarmup+benchMaxSteps; i++ {
		if i >= benchWarmup+benchMinSteps && timed >= benchBudget {
			break
		}
		step.Positions = []int32{int32(i)}
		t := time.Now()
		if _, err := st.Forward(ctx, step); err != nil {
			return 0, 0, fmt.Errorf("self-benchmark step %d: %w", i, err)
		}
		if d := time.Since(t); i >= benchWarmup {
			best = min(best, d.Seconds()*1000)
			timed += d
			steps++
		}
	}
	return best / float64(r.Len()), steps, nil
}

// roundSpeed rounds ms per layer to a quarter-octave, so that measurement noise between
// similar nodes does not move layers between them (the planner balances by these values).
func roundSpeed(ms float64) float32 {
	if ms <= 0 || math.IsInf(ms, 0) || math.IsNaN(ms) {
		return 0
	}
	return float32(math.Exp2(math.Round(math.Log2(ms)*4) / 4))
}
