package shard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend" // registers the ggml backend
)

// StageOption configures LoadStage.
type StageOption func(*stageConfig)

type stageConfig struct {
	threads     int
	maxSessions int
	maxContext  int
	maxBatch    int
	cacheType   ml.DType
	sliceDir    string
	modelSHA256 string
	logger      *slog.Logger
	progress    func(float32)
	noFlash     bool
	cpu         sync.Locker
	unbatched   bool
	placement   Placement
}

// WithCPULock makes the stage hold l while it computes. Nodes that share one machine's cores
// pass a lock they all take (a file lock, see cpulock): each then computes with every core,
// one at a time. Without it their ggml threads, which spin at every barrier, preempt each
// other; with one thread each instead, a single stream runs on one core.
func WithCPULock(l sync.Locker) StageOption { return func(c *stageConfig) { c.cpu = l } }

// WithUnbatched runs every step alone, never batched with other sessions' steps, and gives
// each session a KV cache of its own. ggml's reductions depend on a graph's shape, so a
// batched step can differ from the same step alone in low-order bits, and in a shared cache a
// step attends over cells laid out by the other sessions; either flips near-ties between
// tokens. Alone and in its own cache, a session's logits are bit-identical to what it gets
// with the stage to itself, whatever else the stage serves, at the cost of throughput under
// load.
func WithUnbatched() StageOption { return func(c *stageConfig) { c.unbatched = true } }

// WithFlashAttention chooses ggml's fused attention kernel (default on). Without it every
// layer materialises the scores of batch x cached tokens x heads in f32: 256 MiB for a
// 512-token chunk against 2048 cached tokens of a 64-head model, 2 GiB against 16384.
func WithFlashAttention(on bool) StageOption { return func(c *stageConfig) { c.noFlash = !on } }

// WithPlacement puts the stage's layers on GPUs (see PlaceLayers); the rest compute on the
// CPU. Without it the stage runs on the CPU alone, whatever devices ggml sees.
func WithPlacement(p Placement) StageOption { return func(c *stageConfig) { c.placement = p } }

// WithThreads sets the CPU threads ggml uses (default: all cores).
func WithThreads(n int) StageOption { return func(c *stageConfig) { c.threads = n } }

// WithMaxSessions bounds the sessions open at once (KV cache sequences; default 8).
func WithMaxSessions(n int) StageOption { return func(c *stageConfig) { c.maxSessions = n } }

// WithMaxContext bounds a session's tokens (default: the model's context length, at most 4096).
func WithMaxContext(n int) StageOption { return func(c *stageConfig) { c.maxContext = n } }

// WithMaxBatch bounds the tokens of one forward over all sessions (default 256). ggml's
// compute buffer grows with it: for 70B-shaped layers about 150 MB at 256 tokens and 280 MB
// at 512, for a prefill that is barely faster (two prompt chunks of 128 fit either way).
func WithMaxBatch(n int) StageOption { return func(c *stageConfig) { c.maxBatch = n } }

// WithCacheType sets the KV cache element type: "f16" (default, half the memory) or "f32"
// (what the correctness oracles use: ~7e-6 from a float64 reference against ~8e-3 for f16).
func WithCacheType(t string) StageOption {
	return func(c *stageConfig) {
		switch t {
		case "f32":
			c.cacheType = ml.DTypeF32
		case "f16", "":
			c.cacheType = ml.DTypeF16
		default:
			c.cacheType = ml.DTypeOther
		}
	}
}

// WithSliceDir is where slice files are cut and cached when the model file holds more layers
// than the stage serves (default: a strata-slices directory in the system temp dir).
func WithSliceDir(dir string) StageOption { return func(c *stageConfig) { c.sliceDir = dir } }

// WithModelSHA256 gives the whole model's digest when the caller already knows it, saving a
// pass over a large file.
func WithModelSHA256(sum string) StageOption { return func(c *stageConfig) { c.modelSHA256 = sum } }

// WithLogger sets the stage's logger.
func WithLogger(l *slog.Logger) StageOption { return func(c *stageConfig) { c.logger = l } }

// WithProgress reports cutting and loading progress, each as a fraction from 0 to 1.
func WithProgress(f func(float32)) StageOption { return func(c *stageConfig) { c.progress = f } }

// Stage is a loaded slice of a model: layers [Start, End) with their KV caches, and the
// embeddings or LM head when it is the first or last stage.
type Stage struct {
	info    StageInfo
	model   *ModelInfo
	backend ml.Backend
	fam     family
	log     *slog.Logger
	cpu     sync.Locker // nil: the stage has the cores to itself
	// unbatched: each step runs alone (WithUnbatched)
	unbatched bool

	weightBufs    []WeightBuffer
	enginePatched bool
	placement     Placement

	queue chan *request
	quit  chan struct{}
	done  chan struct{}

	timing stageTiming

	mu    sync.Mutex // guards everything below, and the caches
	cache *stageCache
	// ownCaches, indexed by a session's seq, replaces the shared cache with one cache per
	// session (WithUnbatched). In a shared cache the sessions' cells interleave, and cells a
	// closed session freed are reused out of order, so a step attends over a range whose
	// length and order depend on the other sessions: ggml then sums in another order than it
	// does for the session alone, and near-ties between tokens flip.
	ownCaches []*stageCache
	sessions  map[uint64]*session
	freeSeqs  []int
	closed    bool
}

// Timing is where a stage's compute loop spent its time since it loaded, so a slow pipeline
// can be taken apart: a stage that is waiting is not computing, and in a swarm whose nodes
// share one machine's cores through a CPU lock the waits are where the machine idles.
type Timing struct {
	Batches int64 // graphs computed
	Steps   int64 // sessions' steps in them
	// Compute is the time inside the engine's forward pass.
	Compute time.Duration
	// LockWait is the time spent waiting for the shared CPU lock (WithCPULock).
	LockWait time.Duration
	// BatchWait is the time spent holding back a step for the rest of its batch
	// (awaitBatch, awaitFrames).
	BatchWait time.Duration
	// DecodeBatches and DecodeCompute count the batches of single-token steps only: a
	// prompt's chunk costs a hundred decode steps, so totals alone cannot say what a decoded
	// token costs.
	DecodeBatches int64
	DecodeSteps   int64
	DecodeCompute time.Duration
}

type stageTiming struct {
	batches, steps, decodeBatches, decodeSteps  atomic.Int64
	compute, lockWait, batchWait, decodeCompute atomic.Int64 // nanoseconds
}

// Timing returns the stage's cumulative timing.
func (s *Stage) Timing() Timing {
	return Timing{
		Batches:   s.timing.batches.Load(),
		Steps:     s.timing.steps.Load(),
		Compute:   time.Duration(s.timing.compute.Load()),
		LockWait:  time.Duration(s.timing.lockWait.Load()),
		BatchWait: time.Duration(s.timing.batchWait.Load()),

		DecodeBatches: s.timing.decodeBatches.Load(),
		DecodeSteps:   s.timing.decodeSteps.Load(),
		DecodeCompute: time.Duration(s.timing.decodeCompute.Load()),
	}
}

type session struct {
	seq  int
	next int32 // the position the next step must start at
}

type request struct {
	ctx     context.Context
	step    Step
	reply   chan response
	arrived time.Time
}

type response struct {
	out Output
	err error
}

// LoadStage loads the layers r of the GGUF model at path. If the file holds more than r needs,
// the slice is cut into the slice dir first, so the stage's memory follows its slice.
func LoadStage(ctx context.Context, path string, r Range, opts ...StageOption) (st *Stage, err error) {
	cfg := stageConfig{maxSessions: 8, maxBatch: 256, cacheType: ml.DTypeF16, threads: runtime.NumCPU()}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.cacheType == ml.DTypeOther {
		return nil, errors.New("load stage: KV cache type must be f16 or f32")
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	if cfg.sliceDir == "" {
		cfg.sliceDir = filepath.Join(os.TempDir(), "strata-slices")
	}
	info, err := ReadModelInfo(path)
	if err != nil {
		return nil, fmt.Errorf("load stage: %w", err)
	}
	if err := r.Validate(info.Layers); err != nil {
		return nil, fmt.Errorf("load stage: %w", err)
	}
	if cfg.maxContext <= 0 {
		cfg.maxContext = min(max(info.ContextLength, 256), 4096)
	}
	if cfg.maxSessions <= 0 || cfg.maxBatch <= 0 {
		return nil, errors.New("load stage: max sessions and max batch must be positive")
	}
	sum := cfg.modelSHA256
	if info.SliceOf != "" {
		sum = info.SliceOf
	}
	if sum == "" {
		if sum, err = FileSHA256(path, cfg.sliceDir); err != nil {
			return nil, fmt.Errorf("load stage: %w", err)
		}
	}
	file := path
	if holdsMoreThan(info, r) {
		file, err = SliceCache{Dir: cfg.sliceDir}.Ensure(ctx, path, sum, r, cfg.progress)
		if err != nil {
			return nil, fmt.Errorf("load stage: cut slice %s: %w", r, err)
		}
	}

	for _, g := range cfg.placement {
		if !g.Layers.Empty() && (g.Layers.Start < r.Start || g.Layers.End > r.End) {
			return nil, fmt.Errorf("load stage %s: placement puts layers %s on %s, outside the stage", r, g.Layers, g.Device.Name)
		}
		if g.Output && r.End != info.Layers {
			return nil, fmt.Errorf("load stage %s: placement puts the LM head on %s, but the stage does not end the model", r, g.Device.Name)
		}
	}
	backend, err := newBackend(file, cfg.threads, !cfg.noFlash, cfg.placement.gpuLayersList(info.Layers))
	if err != nil {
		return nil, fmt.Errorf("load stage %s: %w", r, err)
	}
	defer func() {
		if err != nil {
			backend.Close()
		}
	}()
	progress := cfg.progress
	if progress == nil {
		progress = func(float32) {}
	}
	if err := backend.Load(ctx, progress); err != nil {
		return nil, fmt.Errorf("load stage %s: read weights: %w", r, err)
	}
	fam, err := newFamily(backend.Config())
	if err != nil {
		return nil, fmt.Errorf("load stage %s: %w", r, err)
	}
	t := &tensors{b: backend}
	fam.bind(t, r)
	if t.missing != nil {
		return nil, fmt.Errorf("load stage %s: %w", r, t.missing)
	}

	s := &Stage{
		info: StageInfo{
			ModelSHA256: sum,
			Range:       r,
			Layers:      info.Layers,
			Hidden:      info.Hidden,
			Vocab:       info.Vocab,
			MaxContext:  cfg.maxContext,
			MaxSessions: cfg.maxSessions,
			MaxBatch:    cfg.maxBatch,
		},
		model:     info,
		backend:   backend,
		fam:       fam,
		log:       cfg.logger.With("range", r.String()),
		cpu:       cfg.cpu,
		unbatched: cfg.unbatched,
		placement: cfg.placement,
		queue:     make(chan *request, 4*cfg.maxSessions),
		quit:      make(chan struct{}),
		done:      make(chan struct{}),
		sessions:  make(map[uint64]*session),
	}
	newCache := func() *stageCache {
		c := newStageCache(fam, r)
		if cc, ok := fam.(cacheConfigurer); ok {
			c.SetConfig(cc.cacheConfig())
		}
		return c
	}
	if cfg.unbatched {
		// Each cache allocates its tensors at its session's first step, so the memory is
		// what the shared cache would take with every session open.
		for range cfg.maxSessions {
			c := newCache()
			c.initAlone(backend, cfg.cacheType, cfg.maxContext, cfg.maxBatch)
			s.ownCaches = append(s.ownCaches, c)
		}
	} else {
		s.cache = newCache()
		s.cache.Init(backend, cfg.cacheType, cfg.maxSessions, cfg.maxContext, cfg.maxBatch)
	}
	for i := cfg.maxSessions - 1; i >= 0; i-- {
		s.freeSeqs = append(s.freeSeqs, i)
	}
	s.weightBufs, s.enginePatched = weightBuffers(backend, info.RangeBytes(r))
	engine := "patched (repacked weights where ggml offers it)"
	if !s.enginePatched {
		engine = "unpatched (plain CPU buffers; make build applies build/engine-patches)"
	}
	go s.run()
	s.log.Info("weights: "+FormatWeightBuffers(s.weightBufs), "engine", engine)
	if n := cfg.placement.GPULayerCount(); n > 0 {
		s.log.Info(fmt.Sprintf("offloaded %d/%d layers to GPU: %s", n, r.Len(), cfg.placement.String(r)))
	}
	s.log.Info("stage loaded", "model", info.Name, "layers", info.Layers, "weights_bytes", info.RangeBytes(r),
		"threads", cfg.threads, "max_context", cfg.maxContext, "max_sessions", cfg.maxSessions)
	return s, nil
}

// newBackend opens a ggml backend, turning panics in the engine's loader into errors.
func newBackend(path string, threads int, flash bool, gpu ml.GPULayersList) (b ml.Backend, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("ggml could not open %s: %v", filepath.Base(path), p)
		}
	}()
	fa := ml.FlashAttentionDisabled
	if flash {
		fa = ml.FlashAttentionEnabled
	}
	b, err = ml.NewBackend(path, ml.BackendParams{AllocMemory: true, NumThreads: threads, FlashAttention: fa, GPULayers: gpu})
	if err != nil {
		return nil, fmt.Errorf("ggml could not open %s: %w", filepath.Base(path), err)
	}
	return b, nil
}

// holdsMoreThan reports whether the file carries tensors a stage serving r does not need.
func holdsMoreThan(m *ModelInfo, r Range) bool {
	for l, b := range m.LayerBytes {
		if b > 0 && !r.Contains(l) {
			return true
		}
	}
	if r.Start != 0 && m.EmbedBytes > 0 && !(m.TiedEmbedding && r.End == m.Layers) {
		return true
	}
	return r.End != m.Layers && m.HeadBytes > 0 && !(m.TiedEmbedding && r.Start == 0 && m.HeadBytes == m.EmbedBytes)
}

// Info describes the stage.
func (s *Stage) Info() StageInfo { return s.info }

// Placement is where the stage's layers compute: the GPUs' parts; the rest is on the CPU.
func (s *Stage) Placement() Placement { return slices.Clone(s.placement) }

// Model describes the model the stage was cut from.
func (s *Stage) Model() *ModelInfo { return s.model }

// OpenSession reserves a KV cache sequence for a new session.
func (s *Stage) OpenSession(id uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if _, ok := s.sessions[id]; ok {
		return fmt.Errorf("%w: %d", ErrSessionExists, id)
	}
	if len(s.freeSeqs) == 0 {
		return fmt.Errorf("%w: all %d are in use", ErrTooManySessions, s.info.MaxSessions)
	}
	seq := s.freeSeqs[len(s.freeSeqs)-1]
	s.freeSeqs = s.freeSeqs[:len(s.freeSeqs)-1]
	s.sessions[id] = &session{seq: seq}
	return nil
}

// CloseSession frees a session's KV cache.
func (s *Stage) CloseSession(id uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[id]
	if !ok {
		return fmt.Errorf("%w: %d", ErrUnknownSession, id)
	}
	delete(s.sessions, id)
	if !s.closed {
		if err := s.forget(sess, 0); err != nil {
			s.log.Warn("free session cache", "session", id, "err", err)
		}
	}
	s.freeSeqs = append(s.freeSeqs, sess.seq)
	return nil
}

// forget drops a session's cached positions from `from` on. Callers hold s.mu.
func (s *Stage) forget(sess *session, from int32) error {
	if s.ownCaches != nil {
		return s.ownCaches[sess.seq].Remove(0, from, math.MaxInt32)
	}
	return s.cache.Remove(sess.seq, from, math.MaxInt32)
}

// Sessions is the number of open sessions.
func (s *Stage) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// Forward runs one step of a session through the stage. It is safe for concurrent use:
// steps of different sessions that arrive together run as one batched graph, since ggml
// computes one graph at a time per backend.
func (s *Stage) Forward(ctx context.Context, step Step) (Output, error) {
	req := &request{ctx: ctx, step: step, reply: make(chan response, 1), arrived: time.Now()}
	select {
	case s.queue <- req:
	case <-s.quit:
		return Output{}, ErrClosed
	case <-ctx.Done():
		return Output{}, ctx.Err()
	}
	select {
	case r := <-req.reply:
		return r.out, r.err
	case <-ctx.Done():
		// The batch may still run; the session's positions then advance, which is what the
		// caller's cancel means: the session is abandoned.
		return Output{}, ctx.Err()
	}
}

// Close stops the stage and frees its memory. Steps in flight fail with ErrClosed.
func (s *Stage) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	close(s.quit)
	<-s.done
	if s.cache != nil {
		s.cache.Close()
	}
	for _, c := range s.ownCaches {
		c.Close()
	}
	s.backend.Close()
	return nil
}

// run is the stage's one compute loop: it takes the waiting steps, batches those of distinct
// sessions up to the batch limit, and answers each.
func (s *Stage) run() {
	defer close(s.done)
	var pending []*request
	var lastStep time.Duration
	expected := make(map[uint64]bool)          // the last batch's sessions, until their next step comes
	done := make(map[uint64]time.Time)         // when each session's last step was answered
	comeback := make(map[uint64]time.Duration) // how long its next step took to come after that
	for {
		if len(pending) == 0 {
			select {
			case r := <-s.queue:
				pending = append(pending, r)
			case <-s.quit:
				s.drain(pending)
				return
			}
		}
		t0 := time.Now()
		pending = s.awaitBatch(pending, expected, comeback, lastStep)
		t1 := time.Now()
		s.timing.batchWait.Add(int64(t1.Sub(t0)))
		if s.cpu != nil {
			// Gather again once the cores are ours: steps that arrived while another stage
			// computed join this batch instead of waiting for the next.
			s.cpu.Lock()
			s.timing.lockWait.Add(int64(time.Since(t1)))
		}
		// Take whatever else has arrived meanwhile.
	gather:
		for {
			select {
			case r := <-s.queue:
				pending = append(pending, r)
			default:
				break gather
			}
		}
		if s.cpu != nil {
			t := time.Now()
			pending = s.awaitFrames(pending, lastStep)
			s.timing.batchWait.Add(int64(time.Since(t)))
		}
		var batch []*request
		var rest []*request
		seen := make(map[uint64]bool)
		tokens := 0
		for _, r := range pending {
			n := len(r.step.Positions)
			if r.ctx.Err() != nil {
				r.reply <- response{err: r.ctx.Err()}
				continue
			}
			// An embedding step runs alone on every stage: the last keeps every row of its last
			// block, and on any stage a batch's shape may change how the backend sums (a GPU
			// picks its matmul kernel by batch size), so a vector would depend on what else the
			// swarm served at the time. Alone, an input's vector is the same whether it came
			// with others in one request or by itself (api's TestEmbeddings).
			embeds := r.step.Embed || (len(batch) == 1 && batch[0].step.Embed)
			alone := s.unbatched || embeds
			if seen[r.step.Session] || (len(batch) > 0 && (alone || tokens+n > s.info.MaxBatch)) {
				rest = append(rest, r)
				continue
			}
			seen[r.step.Session] = true
			tokens += n
			batch = append(batch, r)
		}
		pending = rest
		clear(expected)
		if len(batch) > 0 {
			for _, r := range batch {
				if t, ok := done[r.step.Session]; ok {
					comeback[r.step.Session] = r.arrived.Sub(t)
				}
			}
			t := time.Now()
			s.forwardBatch(batch)
			now := time.Now()
			lastStep = now.Sub(t)
			s.timing.compute.Add(int64(lastStep))
			s.timing.batches.Add(1)
			s.timing.steps.Add(int64(len(batch)))
			if tokens == len(batch) {
				s.timing.decodeBatches.Add(1)
				s.timing.decodeSteps.Add(int64(len(batch)))
				s.timing.decodeCompute.Add(int64(lastStep))
			}
			for _, r := range batch {
				expected[r.step.Session] = true
				done[r.step.Session] = now
			}
			if len(done) > 2*s.info.MaxSessions {
				s.forgetClosed(done, comeback)
			}
		}
		if s.cpu != nil {
			s.cpu.Unlock()
		}
	}
}

// awaitBatch gives the sessions of the last batch a moment to send their next steps before
// the stage computes what is pending, so that they run as one batch again. In a stage that
// serves the whole model a decoding session's next step comes as soon as its token is
// sampled, a millisecond or so after its reply; a stage that computed at the first arrival
// split a batch of n sessions into two or more, each paying to stream the weights again, and
// they stayed split: while a batch of 1 computed, the other n-1 queued, and the one came back
// while they computed. (Measured on the 70B-shaped model, whole in one process with 8
// streams: batches of 1 and 7 in turn.) It waits only for sessions whose last step came back
// within the wait, at most a fifth of the last step (25 ms): in a chain a session comes back
// to a stage only after the other stages, and waiting for it there would idle the stage. A
// closed session is not waited for.
func (s *Stage) awaitBatch(pending []*request, expected map[uint64]bool, comeback map[uint64]time.Duration, lastStep time.Duration) []*request {
	if s.unbatched || len(expected) == 0 {
		return pending
	}
	wait := min(25*time.Millisecond, lastStep/5)
	if wait <= 0 {
		return pending
	}
	missing := make(map[uint64]bool, len(expected))
	s.mu.Lock()
	for id := range expected {
		if _, open := s.sessions[id]; open {
			if d, ok := comeback[id]; ok && d <= wait {
				missing[id] = true
			}
		}
	}
	s.mu.Unlock()
	for _, r := range pending {
		delete(missing, r.step.Session)
	}
	if len(missing) == 0 {
		return pending
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for len(missing) > 0 {
		select {
		case r := <-s.queue:
			pending = append(pending, r)
			delete(missing, r.step.Session)
		case <-deadline.C:
			return pending
		case <-s.quit:
			return pending
		}
	}
	return pending
}

// awaitFrames gives the steps of the stage's other sessions a moment to arrive once it holds
// the shared cores. The previous stage lets go of them as soon as its batch is computed, and
// its outputs reach this stage one frame at a time; the first stage's come from the entry,
// which samples each session's token in turn, a millisecond or more apart. Taking the lock at
// the first one would split one batch of n sessions into several small ones, each paying for
// the weights again. It waits while steps keep coming, until none has come for 3 ms, and a
// quarter of the last step in all (at most 25 ms): when the others do not come (a session
// prefilling, or done) it loses 3 ms, and a batch arriving over several milliseconds stays
// whole. (8 streams on 3 nodes, 70B-shaped: the first stage computed 4.1 steps a batch with a
// flat 2 ms wait, 5.8 with a 2 ms gap and a tenth of a step, the other stages 7.8.)
func (s *Stage) awaitFrames(pending []*request, lastStep time.Duration) []*request {
	open := s.Sessions()
	if len(pending) >= open {
		return pending
	}
	total := min(25*time.Millisecond, lastStep/4)
	if total <= 0 {
		return pending
	}
	gap := min(3*time.Millisecond, total)
	deadline := time.NewTimer(total)
	defer deadline.Stop()
	quiet := time.NewTimer(gap)
	defer quiet.Stop()
	for len(pending) < open {
		select {
		case r := <-s.queue:
			pending = append(pending, r)
			quiet.Reset(gap)
		case <-quiet.C:
			return pending
		case <-deadline.C:
			return pending
		}
	}
	return pending
}

// forgetClosed drops the batching records of sessions that are no longer open.
func (s *Stage) forgetClosed(done map[uint64]time.Time, comeback map[uint64]time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id := range done {
		if _, open := s.sessions[id]; !open {
			delete(done, id)
			delete(comeback, id)
		}
	}
}

func (s *Stage) drain(pending []*request) {
	for _, r := range pending {
		r.reply <- response{err: ErrClosed}
	}
	for {
		select {
		case r := <-s.queue:
			r.reply <- response{err: ErrClosed}
		default:
			return
		}
	}
}
