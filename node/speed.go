package node

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/strata-llm/strata/discovery"
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
// kernels. The steps take the CPU lock (--cpu-lock's or the machine's, host.go), so nodes
// sharing cores measure one at a time; the minimum discounts waits for it.
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
	if l := n.benchLock(); l != nil {
		opts = append(opts, shard.WithCPULock(l))
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

// The self-benchmark at start can be badly off: the same binary measured 0.84 to 128 ms per
// layer across restarts on a loaded machine, and that one number fixed the node's share for
// its lifetime. So the node keeps measuring while it runs (speedTracker): from its stages'
// real decode steps while it serves, and by running the self-benchmark again now and then
// while it serves nothing (a node that measured badly may have been left idle). It announces
// a new speed only on a lasting change, since every announcement makes the swarm re-plan.

// SpeedOptions tune how the node re-measures its speed; the zero value of each field is its
// default. Tests shorten them; a deployment has no reason to.
type SpeedOptions struct {
	// Window is how many solo decode steps make one measurement (default 32): their median,
	// so a step that waited for the cores or a GC pause does not move it.
	Window int
	// Band is the factor a measurement must differ from the announced speed by, either way,
	// to count as a change (default 1.5). Within it the announced speed holds, whatever the
	// noise: that is the hysteresis.
	Band float64
	// Lasting is how many consecutive measurements beyond the band, all on the same side,
	// make a lasting change (default 3), and LastingFor how long at least they must span
	// (default 30s; negative: no minimum).
	Lasting    int
	LastingFor time.Duration
	// Hold is how long an announced speed stands at least before the next one (default
	// 2m): each announcement may re-plan the swarm and reload slices, and on a machine whose
	// other tenants come and go the measurements swing by several times within a minute.
	Hold time.Duration
	// Rebench is how often a node that serves no layers runs its self-benchmark again
	// (default 1m; negative: never).
	Rebench time.Duration
}

func (o *SpeedOptions) setDefaults() {
	if o.Window <= 0 {
		o.Window = 32
	}
	if o.Band <= 1 || math.IsNaN(o.Band) || math.IsInf(o.Band, 0) {
		o.Band = 1.5
	}
	if o.Lasting <= 0 {
		o.Lasting = 3
	}
	if o.LastingFor == 0 {
		o.LastingFor = 30 * time.Second
	}
	if o.Hold == 0 {
		o.Hold = 2 * time.Minute
	}
	if o.Rebench == 0 {
		o.Rebench = time.Minute
	}
}

// maxStreak bounds the measurements a lasting change keeps for its median.
const maxStreak = 16

// speedTracker is a node's moving estimate of its speed in ms per layer per token, and the
// rule for when to announce it. It is fed numbers, not clocks or stages, so that its tests
// feed synthetic ones: step(ms, solo) for each decode step a stage ran, window(ms) for a
// whole measurement (a re-run of the self-benchmark). Safe for concurrent use.
type speedTracker struct {
	opt SpeedOptions
	now func() time.Time

	mu        sync.Mutex
	start     float64 // the self-benchmark's ms per layer at start; 0: not measured
	announced float32 // what the node announces now; 0: nothing (the planner assumes typical)
	source    string  // where announced came from
	samples   []float64
	current   float64 // the latest measurement; 0: none yet
	windows   int     // measurements so far
	solo      uint64  // decode steps that ran alone (measured)
	batched   uint64  // decode steps batched with other sessions' (not measured)
	skipped   uint64  // decode steps run while the swarm moved (not measured)
	// streak holds the consecutive latest measurements beyond the band, all on side dir
	// (+1 slower, -1 faster, 2 any: nothing announced yet), since `since`.
	streak []float64
	dir    int
	since  time.Time
	last   time.Time // when the tracker last announced a speed; zero: never
}

func newSpeedTracker(opt SpeedOptions, start float64, announced float32, now func() time.Time) *speedTracker {
	opt.setDefaults()
	if now == nil {
		now = time.Now
	}
	t := &speedTracker{opt: opt, now: now, start: start, announced: announced}
	if announced > 0 {
		t.source = "self-benchmark"
	}
	return t
}

// step records one decode step a stage ran, in ms per layer. A step batched with other
// sessions' steps is counted but not measured: a batch of 8 costs far less than 8 steps
// (decode reads the weights once for the batch), so its time says little about a step alone,
// which is what the self-benchmark and every other node's announcement measure.
func (t *speedTracker) step(ms float64, solo bool) (float32, bool) {
	if ms <= 0 || math.IsNaN(ms) || math.IsInf(ms, 0) {
		return 0, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !solo {
		t.batched++
		return 0, false
	}
	t.solo++
	t.samples = append(t.samples, ms)
	if len(t.samples) < t.opt.Window {
		return 0, false
	}
	m := median(t.samples)
	t.samples = t.samples[:0]
	return t.measuredLocked(m, "steps")
}

// interrupt drops the measurement under way: its steps ran while the swarm moved.
func (t *speedTracker) interrupt() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.samples = t.samples[:0]
	t.skipped++
}

// window records a whole measurement (the self-benchmark run again), in ms per layer.
func (t *speedTracker) window(ms float64, source string) (float32, bool) {
	if ms <= 0 || math.IsNaN(ms) || math.IsInf(ms, 0) {
		return 0, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.measuredLocked(ms, source)
}

// measuredLocked applies the announcement rule to a new measurement: it reports a speed to
// announce once Lasting consecutive measurements, spanning LastingFor, all lay beyond the
// band on the same side of the announced one; the new speed is their median, rounded as
// the self-benchmark's is. Anything else (a single outlier, noise within the band, a
// change that reverses) keeps the announced speed.
func (t *speedTracker) measuredLocked(ms float64, source string) (float32, bool) {
	t.current = ms
	t.windows++
	dir := 2
	if a := float64(t.announced); a > 0 {
		switch {
		case ms > a*t.opt.Band:
			dir = 1
		case ms < a/t.opt.Band:
			dir = -1
		default:
			dir = 0
		}
	}
	if dir != t.dir || dir == 0 {
		t.streak, t.dir = t.streak[:0], dir
		if dir == 0 {
			return 0, false
		}
	}
	if len(t.streak) == 0 {
		t.since = t.now()
	}
	if len(t.streak) == maxStreak {
		t.streak = append(t.streak[:0], t.streak[1:]...)
	}
	t.streak = append(t.streak, ms)
	now := t.now()
	if len(t.streak) < t.opt.Lasting || (t.opt.LastingFor > 0 && now.Sub(t.since) < t.opt.LastingFor) ||
		(!t.last.IsZero() && t.opt.Hold > 0 && now.Sub(t.last) < t.opt.Hold) {
		return 0, false
	}
	v := roundSpeed(median(t.streak))
	t.streak, t.dir = t.streak[:0], 0
	if v == t.announced || v == 0 {
		return 0, false
	}
	t.announced, t.source, t.last = v, source, now
	return v, true
}

// SpeedHealth is a node's speed as /health shows it: what it measured at start, what it
// measures now, and what it announces to the planner.
type SpeedHealth struct {
	StartMs     float64 `json:"start_ms_per_layer"`     // the self-benchmark at start; 0: none
	CurrentMs   float64 `json:"current_ms_per_layer"`   // the latest measurement; 0: none yet
	AnnouncedMs float32 `json:"announced_ms_per_layer"` // what the planner weighs this node by
	Source      string  `json:"source,omitempty"`       // self-benchmark, steps or re-benchmark
	Steps       uint64  `json:"steps"`                  // decode steps measured (run alone)
	Batched     uint64  `json:"batched_steps"`          // decode steps batched with others (not measured)
	Skipped     uint64  `json:"moving_steps"`           // decode steps while the swarm moved (not measured)
	Drifting    int     `json:"drifting"`               // consecutive measurements beyond the band now
}

func (t *speedTracker) health() SpeedHealth {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := SpeedHealth{StartMs: t.start, CurrentMs: t.current, AnnouncedMs: t.announced, Source: t.source,
		Steps: t.solo, Batched: t.batched, Skipped: t.skipped}
	if t.dir != 0 {
		h.Drifting = len(t.streak)
	}
	return h
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// stageWork is how many of the self-benchmark's layers a step through r amounts to, so that a
// stage's step time compares with the self-benchmark's ms per layer: decode reads every
// weight once per step, so time goes with weight bytes. The last stage's LM head counts too
// (a Llama 3 head reads as much as several blocks); embedding rows are only looked up.
func stageWork(m *shard.ModelInfo, r shard.Range) float64 {
	ref := m.LayerBytes[benchRange(m).Start]
	if ref <= 0 || r.Empty() {
		return float64(max(r.Len(), 1))
	}
	var b int64
	for l := r.Start; l < r.End; l++ {
		b += m.LayerBytes[l]
	}
	if r.End == m.Layers {
		b += m.HeadBytes
	}
	return max(float64(b)/float64(ref), 1e-3)
}

// timedStage is a stage as the host serves it, timing its decode steps for the node's speed
// estimate. A step counts as run alone when no other step entered the stage while it ran:
// the stage batches the steps that arrive together, and such a batch's time says little
// about one step's.
type timedStage struct {
	*shard.Stage
	work     float64 // stageWork of the stage's range
	record   func(ms float64, solo bool)
	inflight atomic.Int64
	entered  atomic.Uint64
}

func (t *timedStage) Forward(ctx context.Context, step shard.Step) (shard.Output, error) {
	k := t.inflight.Add(1)
	seq := t.entered.Add(1)
	start := time.Now()
	out, err := t.Stage.Forward(ctx, step)
	d := time.Since(start)
	solo := k == 1 && t.entered.Load() == seq
	t.inflight.Add(-1)
	if err == nil && len(step.Positions) == 1 && !step.Embed {
		t.record(d.Seconds()*1000/t.work, solo)
	}
	return out, err
}

// timed wraps st for the host, feeding the node's speed estimate. Steps taken while the
// swarm moves to a new plan are left out: loading a slice (reading, cutting, repacking
// weights) takes the CPU from the steps beside it, so a node measured then looks several
// times slower than it is (seen: 19 ms per layer, then 152 during a move, on one machine),
// and announcing that would re-plan again, back and forth.
func (n *Node) timed(st *shard.Stage) *timedStage {
	return &timedStage{Stage: st, work: stageWork(n.model, st.Info().Range), record: func(ms float64, solo bool) {
		if n.moving() {
			n.speedT.interrupt()
			return
		}
		if v, ok := n.speedT.step(ms, solo); ok {
			n.speedChanged(v, "steps")
		}
	}}
}

// moving reports whether this node loads a range, or the swarm as last seen (refreshLoop)
// has a node loading or moving.
func (n *Node) moving() bool {
	if n.swarmMoving.Load() {
		return true
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.next != nil || n.state == discovery.StateLoading
}

// anyMoving reports whether a member is loading its range or moving to a new one.
func anyMoving(members []discovery.NodeMeta) bool {
	for _, m := range members {
		if m.State == discovery.StateLoading || m.NextEnd > m.NextStart {
			return true
		}
	}
	return false
}

// speedChanged announces a lasting change of the node's speed. The swarm re-plans on it
// like on any announcement; nodes whose range the new plan keeps do nothing, and a node the
// plan moves loads its new range beside the old one and drains the old (moveTo), so streams
// running through it go on.
func (n *Node) speedChanged(v float32, source string) {
	n.mu.Lock()
	old := n.speed
	n.speed = v
	n.mu.Unlock()
	h := n.speedT.health()
	n.log.Info("speed changed lastingly: announcing it", "ms_per_layer", v, "was", old, "measured_by", source,
		"at_start", fmt.Sprintf("%.3g", h.StartMs))
	go n.announce() // off the stage's stream: an announcement may wait on gossip
}

// speedLoop runs the self-benchmark again every Rebench while the node serves no layers: a
// node that measured badly at start (a busy machine) may have been left idle, and without
// stages it has no steps to measure. It runs under the CPU lock, like any stage.
func (n *Node) speedLoop() {
	if n.cfg.Speed.Rebench <= 0 {
		return
	}
	n.every(n.cfg.Speed.Rebench, n.rebenchIfIdle)
}

func (n *Node) rebenchIfIdle() {
	n.mu.Lock()
	idle := n.stage == nil && n.next == nil && n.state == discovery.StateIdle
	n.mu.Unlock()
	if !idle {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-n.quit:
			cancel()
		case <-ctx.Done():
		}
	}()
	b, err := n.selfBench(ctx)
	cancel()
	if err != nil {
		n.log.Debug("re-benchmark while idle", "err", err)
		return
	}
	raw := b.RawMs
	if len(n.gpus) > 0 && b.GPURawMs > 0 {
		raw = blendedMs(b.RawMs, b.GPURawMs, n.gpuBytes, n.offer)
	}
	n.log.Debug("re-benchmark while idle", "ms_per_layer", fmt.Sprintf("%.3g", raw))
	if v, ok := n.speedT.window(raw, "re-benchmark"); ok {
		n.speedChanged(v, "re-benchmark")
	}
}
