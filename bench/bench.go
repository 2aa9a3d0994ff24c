// Package bench measures a local Strata swarm against the same model whole in one process:
// prefill and decode speed, time to first token, aggregate throughput under concurrent
// sessions, each node's peak memory and the bytes on the wire, through the OpenAI API as a
// user's client sees them. `strata bench` is its command line.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// Config says what to measure. Zero fields take the defaults noted.
type Config struct {
	Arch    string // architecture of the synthesized model (default llama)
	Preset  string // synthesized model shape (default "70b")
	Layers  int    // layers of the synthesized model (default: the preset's)
	Experts int    // experts per layer of the synthesized model (default: the preset's)
	Type    string // weight format (default "q4_0")
	Seed    uint64 // weights seed (default 1)
	Model   string // measure this GGUF file instead of synthesizing one

	Nodes        int           // swarm size (default 3)
	Concurrency  []int         // concurrent streams per level (default 1, 4, 8)
	Codec        quant.Codec   // activations on the wire (default f16, the nodes' default)
	Tokens       int           // new tokens per stream (default 64)
	PromptTokens int           // tokens per prompt, BOS included (default 128)
	Latency      time.Duration // >0: a second swarm run with this one-way latency injected
	Bandwidth    float64       // bytes/s of the injected link (0: unlimited); >0 also adds the run
	Cores        int           // cores the nodes share, and the whole model's threads (default: all)
	NodeThreads  int           // ggml threads per node (default: Cores with the CPU lock, else Cores / Nodes)
	NoCPULock    bool          // let the nodes compute at once, each with its share of the cores
	SkipWhole    bool          // no baseline run
	PlanOnly     bool          // stop after planning: the report holds the model and each node's memory, nothing measured
	WholeAll     bool          // the baseline at every concurrency, not only the fewest and most streams
	WholeOnly    bool          // measure the whole model only, no swarm
	// Paired is how many more single-stream rounds the whole model and the swarm take in
	// turn, both loaded, after the swarm's 1-stream level, and, with BaselineBinary, this
	// build's whole model and the baseline binary's (0: none). A memory bus whose
	// bandwidth drifts by half over minutes (measured here: 28-66 GB/s) moves two runs a
	// minute apart more than the swarm's cost; rounds a few seconds apart see the same bus.
	Paired int

	// BaselineBinary is another strata build (e.g. `make plain`: the unpatched engine) whose
	// whole model is measured too, in a child process with the same settings, for the ratio
	// of this build to it. BaselineFirst measures it before this build's.
	BaselineBinary string
	BaselineFirst  bool

	DataDir string // model cache and the nodes' state (default ~/.strata)
	Binary  string // the strata binary nodes run (default: this executable)
	// API measures an already running swarm through this node's host:port instead of
	// starting one (no baseline, no memory readings). Model must name its GGUF file.
	API string

	Log      *slog.Logger
	Progress io.Writer // one line per phase (default: nowhere)
}

func (c *Config) setDefaults() error {
	if c.Preset == "" {
		c.Preset = "70b"
	}
	if c.Type == "" {
		c.Type = "q4_0"
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	if c.Nodes == 0 {
		c.Nodes = 3
	}
	if len(c.Concurrency) == 0 {
		c.Concurrency = []int{1, 4, 8}
	}
	if c.Codec == 0 {
		c.Codec = quant.CodecF16
	}
	if c.Tokens == 0 {
		c.Tokens = 64
	}
	if c.PromptTokens == 0 {
		c.PromptTokens = 128
	}
	if c.Cores <= 0 {
		c.Cores = runtime.NumCPU()
	}
	if c.NodeThreads <= 0 {
		// With the lock, one node computes at a time with every core, as the whole model does.
		// Without, ggml's threads spin at every barrier, so nodes split the cores between them.
		c.NodeThreads = c.Cores
		if c.NoCPULock {
			c.NodeThreads = max(1, c.Cores/max(c.Nodes, 1))
		}
	}
	if c.Log == nil {
		c.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	switch {
	case c.Nodes < 1:
		return fmt.Errorf("bench: want at least one node, got %d", c.Nodes)
	case c.Tokens < 2:
		return fmt.Errorf("bench: want at least 2 new tokens per stream (decode speed needs a second one), got %d", c.Tokens)
	case c.PromptTokens < 2:
		return fmt.Errorf("bench: want prompts of at least 2 tokens, got %d", c.PromptTokens)
	case c.Latency < 0 || c.Bandwidth < 0:
		return errors.New("bench: injected latency and bandwidth must not be negative")
	case !c.Codec.Valid():
		return fmt.Errorf("bench: unknown codec %d", c.Codec)
	case c.API != "" && c.Model == "":
		return errors.New("bench: measuring a running swarm (--api) needs its model file (--model) for the tokenizer")
	}
	for _, n := range c.Concurrency {
		if n < 1 || n > 256 {
			return fmt.Errorf("bench: concurrency %d: want 1 to 256 streams", n)
		}
	}
	c.Concurrency = slices.Compact(slices.Sorted(slices.Values(c.Concurrency)))
	if c.DataDir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return fmt.Errorf("bench: no data dir given and no home directory: %w", err)
		}
		c.DataDir = filepath.Join(home, ".strata")
	}
	if c.Binary == "" && c.API == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("bench: finding the strata binary to start nodes with: %w", err)
		}
		c.Binary = exe
	}
	return nil
}

// ContextFor is the context each session gets: prompt and completion, rounded up to 256 so
// the KV cache the nodes allocate is exactly what they budget.
func ContextFor(promptTokens, tokens int) int {
	return (promptTokens + tokens + 1 + 255) / 256 * 256
}

// bench is one benchmark's state.
type bench struct {
	cfg      Config
	rep      *Report
	info     *shard.ModelInfo
	prompts  []string
	warmUp   string // a prompt as long as the measured ones, none of them
	context  int
	sessions int
	client   *http.Client
	whole    map[int][]Stream // the baseline's streams per concurrency, to compare texts
	// live is the whole model, kept loaded while the swarm runs for the paired rounds.
	live *Whole
}

// Run measures. It returns the report even when a later run failed, with what was measured.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, client: &http.Client{}, whole: map[int][]Stream{}}
	defer func() {
		if b.live != nil {
			b.live.Close()
		}
	}()
	b.rep = &Report{Started: time.Now(), Machine: ReadMachine()}
	defer func() {
		b.rep.Elapsed = time.Since(b.rep.Started).Seconds()
		b.rep.Machine.LoadAvgEnd = ReadMachine().LoadAvg
	}()

	path := cfg.Model
	if path == "" {
		var err error
		if path, err = b.synthesize(ctx); err != nil {
			return nil, err
		}
	}
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.info = info
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.context = ContextFor(cfg.PromptTokens, cfg.Tokens)
	b.sessions = slices.Max(cfg.Concurrency)
	if b.prompts, err = Prompts(tok, cfg.PromptTokens, b.sessions+1); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.warmUp, b.prompts = b.prompts[b.sessions], b.prompts[:b.sessions]
	hop, err := quant.EncodedSize(cfg.Codec, info.Hidden)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.rep.Model = ModelSummary{Path: path, Name: info.Name, Type: info.FileType, Layers: info.Layers, Hidden: info.Hidden,
		Experts: info.Experts, ExpertsUsed: info.ExpertsUsed, ExpertsOverride: b.cfg.Experts > 0,
		Vocab: info.Vocab, Bytes: info.TotalBytes, DecodeBytes: info.RangeBytes(shard.Range{Start: 0, End: info.Layers}) - info.EmbedBytes + info.EmbedBytes/int64(max(info.Vocab, 1))}
	if info.Experts > 0 { // a token reads only the experts it routes to
		b.rep.Model.DecodeBytes -= info.ExpertBytes - info.ExpertBytes*int64(info.ExpertsUsed)/int64(info.Experts)
	}
	b.rep.Settings = Settings{Nodes: cfg.Nodes, Concurrency: cfg.Concurrency, Codec: cfg.Codec.String(), Tokens: cfg.Tokens,
		PromptTokens: cfg.PromptTokens, Context: b.context, Sessions: b.sessions, ThreadsPerNode: cfg.NodeThreads,
		WholeThreads: cfg.Cores, Latency: cfg.Latency.Seconds(), Bandwidth: cfg.Bandwidth, HopPayloadBytes: hop}
	if cfg.PlanOnly {
		mem, ranges, err := NodeMemory(info, cfg.Nodes, b.context, b.sessions)
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		b.rep.Settings.NodeMemory, b.rep.Settings.Ranges = mem, ranges
		return b.rep, nil
	}
	b.progress("measuring memory bandwidth")
	b.rep.Machine.CopyBandwidth = CopyBandwidth(256<<20, 4)
	debug.FreeOSMemory() // the copy buffers must not count in the whole model's RSS

	if cfg.API != "" {
		err := b.runExternal(ctx)
		b.rep.evaluate()
		return b.rep, err
	}
	mem, ranges, err := NodeMemory(info, cfg.Nodes, b.context, b.sessions)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.rep.Settings.NodeMemory, b.rep.Settings.Ranges = mem, ranges

	if cfg.BaselineBinary != "" && cfg.BaselineFirst {
		if err := b.runBaseline(ctx, path); err != nil {
			return b.rep, err
		}
	}
	if !cfg.SkipWhole {
		if err := b.runWhole(ctx, path); err != nil {
			return b.rep, err
		}
	}
	if cfg.BaselineBinary != "" && !cfg.BaselineFirst {
		if err := b.runBaseline(ctx, path); err != nil {
			return b.rep, err
		}
	}
	if w := b.rep.whole(); cfg.BaselineBinary != "" && b.live != nil && w != nil && w.level(1) != nil {
		if err := b.baselineRounds(ctx, path, w.level(1)); err != nil {
			return b.rep, err
		}
	}
	if cfg.WholeOnly {
		b.rep.evaluate()
		return b.rep, nil
	}
	if err := b.runSwarm(ctx, path, 0, 0); err != nil {
		b.rep.evaluate()
		return b.rep, err
	}
	if cfg.Latency > 0 || cfg.Bandwidth > 0 {
		if err := b.runSwarm(ctx, path, cfg.Latency, cfg.Bandwidth); err != nil {
			b.rep.evaluate()
			return b.rep, err
		}
	}
	b.rep.evaluate()
	return b.rep, nil
}

func (b *bench) progress(format string, args ...any) {
	fmt.Fprintf(b.cfg.Progress, "[%6.1fs] %s\n", time.Since(b.rep.Started).Seconds(), fmt.Sprintf(format, args...))
}

// synthesize writes the model into the data dir once; later benchmarks reuse it.
func (b *bench) synthesize(ctx context.Context) (string, error) {
	c := b.cfg
	if _, err := testkit.LookupArchPreset(c.Arch, c.Preset); err != nil {
		return "", fmt.Errorf("bench: %w", err)
	}
	dir := filepath.Join(c.DataDir, "bench", "models")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("bench: model cache: %w", err)
	}
	name := fmt.Sprintf("%s-L%d-%s-s%d.gguf", c.Preset, c.Layers, c.Type, c.Seed)
	if c.Arch != "" && c.Arch != "llama" {
		name = c.Arch + "-" + name
	}
	if c.Experts > 0 {
		name = name[:len(name)-len(".gguf")] + fmt.Sprintf("-x%d.gguf", c.Experts)
	}
	path := filepath.Join(dir, name)
	if _, err := os.Stat(path); err == nil {
		b.progress("model %s (cached)", path)
		return path, nil
	}
	b.progress("synthesizing %s (preset %s, %d layers, %s)", path, c.Preset, c.Layers, c.Type)
	last := -1
	err := testkit.Synthesize(ctx, path, testkit.SynthOptions{Arch: c.Arch, Preset: c.Preset, Layers: c.Layers, Experts: c.Experts, Seed: c.Seed, Type: c.Type},
		func(f float32) {
			if p := int(f * 10); p != last {
				last = p
				b.progress("  synthesized %d%%", p*10)
			}
		})
	if err != nil {
		return "", fmt.Errorf("bench: %w", err)
	}
	return path, nil
}

// runWhole measures the whole model in this process, with every core.
func (b *bench) runWhole(ctx context.Context, path string) error {
	b.progress("loading the whole model in this process (%d threads)", b.cfg.Cores)
	resetErr := ResetPeak("self")
	w, err := StartWhole(ctx, path, b.cfg.Cores, b.context, b.sessions, b.cfg.Codec, filepath.Join(b.cfg.DataDir, "bench", "slices"), b.cfg.Log)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	keep := b.cfg.Paired > 0 && (!b.cfg.WholeOnly || b.cfg.BaselineBinary != "") && slices.Contains(b.cfg.Concurrency, 1)
	if keep {
		b.live = w
	} else {
		defer w.Close()
	}
	loaded, _ := ReadProcMemory("self")
	if resetErr == nil {
		resetErr = ResetPeak("self")
	}
	if resetErr != nil {
		b.rep.Notes = append(b.rep.Notes, resetErr.Error()+": the whole model's peak RSS covers this process's whole life")
	}
	weights := shard.FormatWeightBuffers(w.stage.WeightBuffers())
	b.progress("whole model weights: %s", weights)
	run := &RunResult{Name: fmt.Sprintf("whole, 1 process x %d threads (%s)", b.cfg.Cores, weights), Nodes: 1, Threads: b.cfg.Cores, Weights: weights}
	b.rep.Runs = append(b.rep.Runs, run)
	conc := b.cfg.Concurrency
	if !b.cfg.WholeAll && len(conc) > 2 {
		// The fewest and the most streams: what one stream gets, and the gain batching alone
		// gives on this machine, the ceiling for the swarm's.
		conc = []int{conc[0], conc[len(conc)-1]}
	}
	times := func(context.Context) ([]StageTime, error) {
		return []StageTime{stageTimeOf("whole", w.stage.Timing())}, nil
	}
	if err := b.levelsAt(ctx, run, Client{HTTP: b.client, API: w.API()}, nil, times, conc, []string{"self"}); err != nil {
		return err
	}
	for _, l := range run.Levels {
		b.whole[l.Concurrency] = l.Streams
	}
	r := shard.Range{Start: 0, End: b.info.Layers}
	wbytes, kv := NodeFootprint(b.info, r, b.context, b.sessions)
	if m, err := ReadProcMemory("self"); err == nil {
		row := memoryRow("whole (bench process)", os.Getpid(), r, wbytes, kv, loaded.Peak, m.Peak)
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		row.GoSys = int64(ms.Sys)
		run.Memory = append(run.Memory, row)
	}
	return nil
}

func memoryRow(name string, pid int, r shard.Range, weights, kv, loadPeak, peak int64) ProcessMemory {
	p := ProcessMemory{Name: name, PID: pid, Range: r, Weights: weights, KV: kv, LoadPeak: loadPeak, Peak: peak,
		Budget: weights + kv + RuntimeOverhead}
	p.Ratio = float64(p.Peak) / float64(p.Budget)
	p.LoadRatio = float64(p.LoadPeak) / float64(p.Budget)
	return p
}

// runSwarm starts the nodes (with an emulated link when latency or bandwidth is set),
// measures them and stops them.
func (b *bench) runSwarm(ctx context.Context, path string, latency time.Duration, bandwidth float64) error {
	c := b.cfg
	threads := c.NodeThreads
	args := []string{"--max-memory", strconv.FormatInt(b.rep.Settings.NodeMemory, 10), "--context", strconv.Itoa(b.context),
		"--max-sessions", strconv.Itoa(b.sessions), "--codec", c.Codec.String()}
	name := fmt.Sprintf("swarm, %d nodes x %d threads", c.Nodes, threads)
	if !c.NoCPULock {
		args = append(args, "--cpu-lock", filepath.Join(c.DataDir, "bench", "cpu.lock"))
		name += ", one CPU lock"
	}
	if latency > 0 || bandwidth > 0 {
		args = append(args, "--inject-latency", latency.String(), "--inject-bandwidth", strconv.FormatFloat(bandwidth, 'f', -1, 64))
		name += fmt.Sprintf(", +%s one way", latency)
		if bandwidth > 0 {
			name += fmt.Sprintf(" at %.0f Mbit/s", bandwidth*8/1e6)
		}
	}
	dir := filepath.Join(c.DataDir, "bench", "nodes")
	// Node dirs persist (identity, model digest and slice caches make the next start fast),
	// but the launcher takes a node's address files as the sign that it is up: remove the
	// ones an earlier run left.
	for i := range c.Nodes {
		for _, f := range []string{"api", "multiaddr"} {
			if err := os.Remove(filepath.Join(dir, fmt.Sprintf("node%d", i), f)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("bench: %w", err)
			}
		}
	}
	b.progress("starting %s (each --max-memory %s, planned ranges %v)", name, shard.HumanBytes(b.rep.Settings.NodeMemory), b.rep.Settings.Ranges)
	sw, err := testkit.StartSwarm(ctx, testkit.SwarmOptions{Binary: c.Binary, Nodes: c.Nodes, Model: path, Dir: dir, Threads: threads, Args: args})
	if sw != nil {
		defer sw.Close()
	}
	if err != nil {
		return fmt.Errorf("bench: start swarm: %w", err)
	}
	if err := sw.WaitReady(ctx, c.Nodes, 15*time.Minute); err != nil {
		return fmt.Errorf("bench: %w%s", err, sw.Nodes[0].Tail(20))
	}
	// A node's peak while it cut and loaded its slice is one number, its peak while serving
	// another: read the first, then restart the count.
	loadPeaks := map[int]int64{}
	var pids []string
	for _, n := range sw.Nodes {
		pid := strconv.Itoa(n.PID())
		pids = append(pids, pid)
		if m, err := ReadProcMemory(pid); err == nil {
			loadPeaks[n.Index] = m.Peak
		}
		if err := ResetPeak(pid); err != nil {
			b.rep.Notes = append(b.rep.Notes, err.Error()+": serving peaks include loading")
		}
	}
	entry := sw.Nodes[0]
	links, ranges, err := b.route(ctx, entry.API)
	if err != nil {
		return err
	}
	b.progress("swarm ready: ranges %v, %d network links per decode step", ranges, links)
	if !slices.Equal(ranges, b.rep.Settings.Ranges) {
		b.rep.Notes = append(b.rep.Notes, fmt.Sprintf("%s: the nodes planned %v, not the %v the bench expected", name, ranges, b.rep.Settings.Ranges))
	}
	run := &RunResult{Name: name, Swarm: true, Nodes: c.Nodes, Threads: threads, Links: links, Latency: latency.Seconds()}
	b.rep.Runs = append(b.rep.Runs, run)
	conc := c.Concurrency
	if latency > 0 || bandwidth > 0 {
		conc = []int{1} // the latency model is about one stream's decode; keep the run short
	}
	counter := &wireCounter{client: b.client}
	var names, apis []string
	for _, n := range sw.Nodes {
		counter.nodes = append(counter.nodes, wireNode{api: n.API, pid: strconv.Itoa(n.PID())})
		names, apis = append(names, fmt.Sprintf("node %d", n.Index)), append(apis, n.API)
	}
	times := scrapeStageTimes(b.client, names, apis)
	if err := b.levelsAt(ctx, run, Client{HTTP: b.client, API: entry.API}, counter, times, conc, append(pids, "self")); err != nil {
		return err
	}
	for _, n := range sw.Nodes {
		h, err := n.Health(ctx)
		if err != nil {
			continue
		}
		var r shard.Range
		for _, p := range h.Peers {
			if p.Self {
				r = shard.Range{Start: p.Range.Start, End: p.Range.End}
			}
		}
		m, err := ReadProcMemory(strconv.Itoa(n.PID()))
		if err != nil {
			b.rep.Notes = append(b.rep.Notes, err.Error())
			continue
		}
		weights, kv := NodeFootprint(b.info, r, b.context, b.sessions)
		row := memoryRow(fmt.Sprintf("node %d", n.Index), n.PID(), r, weights, kv, loadPeaks[n.Index], m.Peak)
		if v, err := ScrapeCounter(ctx, b.client, n.API, "go_memstats_sys_bytes", ""); err == nil {
			row.GoSys = int64(v)
		}
		run.Memory = append(run.Memory, row)
	}
	return nil
}

// route reads the swarm's chain from the entry node's /health: the ranges in pipeline order
// and how many network links one decode step crosses there and back (the entry's own stage
// is an in-process hop).
func (b *bench) route(ctx context.Context, api string) (links int, ranges []shard.Range, err error) {
	h, err := health(ctx, b.client, api)
	if err != nil {
		return 0, nil, fmt.Errorf("bench: %w", err)
	}
	entryFirst := false
	for _, p := range h.Peers {
		if p.State != "serving" || p.Range.Empty() {
			continue
		}
		ranges = append(ranges, p.Range)
		if p.Self && p.Range.Start == 0 {
			entryFirst = true
		}
	}
	slices.SortFunc(ranges, func(a, b shard.Range) int { return a.Start - b.Start })
	links = len(ranges) - 1
	if !entryFirst {
		links++
	}
	return 2 * links, ranges, nil
}

func health(ctx context.Context, client *http.Client, api string) (node.Health, error) {
	var h node.Health
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+api+"/health", nil)
	if err != nil {
		return h, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return h, fmt.Errorf("health of %s: %w", api, err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		return h, fmt.Errorf("health of %s: %w", api, err)
	}
	return h, nil
}

// runExternal measures a swarm someone else started.
func (b *bench) runExternal(ctx context.Context) error {
	links, ranges, err := b.route(ctx, b.cfg.API)
	if err != nil {
		return err
	}
	h, err := health(ctx, b.client, b.cfg.API)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	counter := &wireCounter{client: b.client}
	var names, apis []string
	for _, p := range h.Peers {
		if p.API != "" {
			counter.nodes = append(counter.nodes, wireNode{api: p.API})
			names, apis = append(names, p.API), append(apis, p.API)
		}
	}
	b.rep.Settings.Nodes, b.rep.Settings.Ranges = len(ranges), ranges
	run := &RunResult{Name: fmt.Sprintf("swarm at %s, %d stages", b.cfg.API, len(ranges)), Swarm: true, Nodes: len(ranges), Links: links,
		Latency: b.cfg.Latency.Seconds()}
	b.rep.Runs = append(b.rep.Runs, run)
	return b.levelsAt(ctx, run, Client{HTTP: b.client, API: b.cfg.API}, counter, scrapeStageTimes(b.client, names, apis), b.cfg.Concurrency, []string{"self"})
}

// levelsAt warms the system up with one short completion, then measures each concurrency.
// pids are the processes of the system measured, to tell their CPU time from other work's;
// times reads its stages' timing (nil: none).
func (b *bench) levelsAt(ctx context.Context, run *RunResult, cl Client, wc *wireCounter, times stageTimes, conc []int, pids []string) error {
	model, err := cl.Model(ctx)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	// The first forward allocates ggml's compute graph and faults the weights in. The warm-up
	// prompt is as long as the measured ones: the first prompt chunk of that size grows the
	// compute buffers (0.3-1 s once on the 70B-shaped model), which a short warm-up left to the
	// first measured stream's TTFT, as llama-bench's warm-up run avoids.
	if _, err := cl.Complete(ctx, model, b.warmUp, 2); err != nil {
		return fmt.Errorf("bench: warm-up: %w", err)
	}
	for _, n := range conc {
		l := &Level{Concurrency: n, SameAsWhole: -1}
		var before wireSample
		if wc != nil {
			before = wc.sample(ctx)
		}
		var timesBefore []StageTime
		if times != nil {
			var err error
			if timesBefore, err = times(ctx); err != nil {
				// An older node: the level is measured all the same, without the breakdown.
				b.cfg.Log.Warn("bench: no stage timing", "err", err)
			}
		}
		cpu := sampleCPU(pids)
		streams, wall, err := cl.Concurrent(ctx, model, b.prompts[:n], b.cfg.Tokens)
		l.OtherCores = otherCores(cpu, sampleCPU(pids))
		if err != nil {
			return fmt.Errorf("bench: %s, %d streams: %w", run.Name, n, err)
		}
		if wc != nil {
			after := wc.sample(ctx)
			l.WireBytes, l.WireSource = after.bytes-before.bytes, after.source
			if after.source != before.source {
				l.WireBytes, l.WireSource = 0, ""
			}
		}
		if timesBefore != nil {
			if after, err := times(ctx); err == nil && len(after) == len(timesBefore) {
				for i := range after {
					l.Stages = append(l.Stages, after[i].sub(timesBefore[i]))
				}
			}
		}
		l.Streams, l.Wall = streams, wall.Seconds()
		if ref, ok := b.whole[n]; ok && run.Swarm {
			l.SameAsWhole = 0
			for i, s := range streams {
				if i < len(ref) && s.Text == ref[i].Text {
					l.SameAsWhole++
				}
			}
		}
		l.summarize(b.rep.Model.DecodeBytes, b.rep.Machine.CopyBandwidth)
		if n == 1 && run.Swarm && run.Latency == 0 && b.live != nil {
			if err := b.pairedRounds(ctx, l, model, cl); err != nil {
				return err
			}
		}
		run.Levels = append(run.Levels, l)
		b.progress("%s, %d streams: TTFT %.2f s, prefill %.1f tok/s, decode %.2f tok/s (%.2f per stream), %d+%d tokens in %.1f s; other processes used %.2f cores",
			run.Name, n, l.TTFTMean, l.PrefillRate, l.DecodeRate, l.PerStream, l.PromptTokens, l.CompletionTokens, l.Wall, l.OtherCores)
	}
	return nil
}

// inTurn runs a and b, a first in even rounds and b first in odd ones, so that neither
// always runs on the machine the other has just warmed or cooled.
func inTurn(round int, a, b func() error) error {
	if round%2 == 1 {
		a, b = b, a
	}
	if err := a(); err != nil {
		return err
	}
	return b()
}

// pairedRounds measures one stream on the whole model and on the swarm in turn, both
// loaded, b.cfg.Paired times each, alternating which goes first.
func (b *bench) pairedRounds(ctx context.Context, l *Level, model string, swarm Client) error {
	whole := Client{HTTP: b.client, API: b.live.API()}
	wholeModel, err := whole.Model(ctx)
	if err != nil {
		return fmt.Errorf("bench: paired rounds: %w", err)
	}
	for i := range b.cfg.Paired {
		var r PairedRound
		err := inTurn(i, func() error {
			s, err := whole.Complete(ctx, wholeModel, b.prompts[0], b.cfg.Tokens)
			if err != nil {
				return fmt.Errorf("bench: paired round %d, whole model: %w", i+1, err)
			}
			r.Whole = s.DecodeRate()
			return nil
		}, func() error {
			s, err := swarm.Complete(ctx, model, b.prompts[0], b.cfg.Tokens)
			if err != nil {
				return fmt.Errorf("bench: paired round %d, swarm: %w", i+1, err)
			}
			r.Swarm = s.DecodeRate()
			return nil
		})
		if err != nil {
			return err
		}
		l.Paired = append(l.Paired, r)
		b.progress("paired round %d: whole %.2f tok/s, swarm %.2f tok/s (%.2fx)", i+1, r.Whole, r.Swarm, r.Swarm/r.Whole)
	}
	return nil
}

// wireCounter sums what every node sent: the stage protocol's byte counter from each node's
// /metrics, or, from nodes without it, every byte the process wrote through system calls.
type wireCounter struct {
	client *http.Client
	nodes  []wireNode
}

type wireNode struct {
	api string
	pid string // "" when not a local process
}

type wireSample struct {
	bytes  float64
	source string
}

func (w *wireCounter) sample(ctx context.Context) wireSample {
	var s wireSample
	metrics := true
	for _, n := range w.nodes {
		v, err := ScrapeCounter(ctx, w.client, n.api, "strata_wire_bytes_total", `direction="out"`)
		if err != nil {
			metrics = false
			break
		}
		s.bytes += v
	}
	if metrics {
		s.source = "metrics"
		return s
	}
	s = wireSample{source: "wchar"}
	for _, n := range w.nodes {
		if n.pid == "" {
			return wireSample{}
		}
		v, err := WrittenBytes(n.pid)
		if err != nil {
			return wireSample{}
		}
		s.bytes += float64(v)
	}
	return s
}
