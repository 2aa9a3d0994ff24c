package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/internal/cpufeat"
	"github.com/strata-llm/strata/internal/cpulock"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

// Node is a running Strata daemon.
type Node struct {
	cfg       Config
	log       *slog.Logger
	modelPath string
	model     *shard.ModelInfo
	sha       string
	shaBytes  [32]byte
	tok       *shard.Tokenizer
	speed     float32       // ms per layer per token announced: the self-benchmark's, then speedT's (speed.go)
	speedT    *speedTracker // the moving estimate of the speed, from real steps and re-benchmarks
	gpuBytes  int64         // the part of offer on the GPUs
	// swarmMoving: as of the last refresh, some member loads or moves (speed.go).
	swarmMoving atomic.Bool
	freeGPU     uint64         // bytes free on the GPUs ggml sees, at start
	gpus        []shard.Device // the GPUs the node's stages compute on (gpu.go)
	gpuAsked    bool           // ggml was asked for its GPUs (self-benchmark or first stage)
	offer       int64          // memory offered to the planner, fixed at start (see memoryOffer)
	host        *p2p.Host
	members     *discovery.Membership
	gen         *pipeline.Generator
	admit       *pipeline.Admission // requests waiting for room on a busy swarm (queue.go)
	router      *router
	apiAddr     string
	api         *http.Server
	metrics     *metrics      // Prometheus collectors and the hooks that feed them (metrics.go)
	cpu         *cpulock.Lock // --cpu-lock
	hostCPU     *cpulock.Lock // the machine's default lock, taken while other nodes of it are in the view (host.go)
	hostID      [8]byte       // this machine in gossip (host.go)
	w           weightsState  // weights served to and fetched from peers (weights.go)

	mu       sync.Mutex
	stage    *shard.Stage   // the stage served now
	next     *shard.Stage   // loaded for the new plan, served beside stage until the swarm has moved
	retiring []*shard.Stage // replaced stages finishing their sessions
	chain    int
	state    discovery.State
	planErr  error
	reloadCh chan struct{}

	quit     chan struct{} // closed by Close: background loops stop
	quitOnce sync.Once

	annMu     sync.Mutex // serialises announcements, so an older view never overwrites a newer one
	lastMeta  discovery.NodeMeta
	announced bool
}

// reannounceEvery is how often the node checks whether what it announced has drifted
// (sessions opened or closed, free memory) without a state change announcing it.
const reannounceEvery = time.Second

// Run starts a node and serves until ctx ends, then drains and leaves the swarm.
func Run(ctx context.Context, cfg Config) error {
	n, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	return n.Close()
}

// Start brings a node up: identity, libp2p host, membership, API; the layers follow as the
// swarm plans them.
func Start(ctx context.Context, cfg Config) (n *Node, err error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	n = &Node{cfg: cfg, log: cfg.Logger, chain: -1, reloadCh: make(chan struct{}, 1), quit: make(chan struct{})}
	n.offer = memoryOffer(cfg, freeMemory())
	n.metrics = newMetrics(n)
	started := n // the error returns below set n to nil
	defer func() {
		if err != nil {
			started.Close()
		}
	}()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if err := n.checkPorts(); err != nil { // before the minutes of hashing and benchmarking
		return nil, err
	}
	// Nothing writes to the slice cache yet: temp files there are a crashed cut's.
	if k, err := (shard.SliceCache{Dir: filepath.Join(cfg.DataDir, "slices")}).RemoveStale(); err != nil {
		n.log.Warn("slice cache", "err", err)
	} else if k > 0 {
		n.log.Info("removed temporary files a crash left in the slice cache", "files", k)
	}
	if cfg.nameInSwarm() {
		n.cfg.swarmName = cfg.Model
		cfg = n.cfg
		n.log.Info("model not found on this machine: taking it from the swarm", "model", cfg.Model)
	}
	swarm := cfg.fromSwarm() || cfg.hubSlices() // no model file: the slices come from the peers or the hub
	if !swarm {
		if n.modelPath, err = n.resolveModel(ctx); err != nil {
			return nil, err
		}
	}
	if cfg.CPULock != "" {
		if n.cpu, err = cpulock.Open(cfg.CPULock); err != nil {
			return nil, err
		}
	} else if cfg.threadsDefault && !cfg.ClientOnly {
		// Nodes that each compute with all the cores take turns on them once they see each
		// other; nodes given --threads were given their share and compute at once.
		path, err := hostCPULock()
		if err == nil {
			n.hostCPU, err = cpulock.Open(path)
		}
		if err != nil {
			n.log.Warn("no CPU lock for the nodes of this machine", "err", err)
		}
	}
	n.hostID = hostID()
	if !swarm {
		if n.model, err = shard.ReadModelInfo(n.modelPath); err != nil {
			return nil, err
		}
		n.log.Info("hashing model", "path", n.modelPath, "size", n.model.FileSize)
		var hashProgress func(float32)
		if cfg.Progress != nil {
			hashProgress = cfg.Progress("hashing " + filepath.Base(n.modelPath))
		}
		if n.sha, err = shard.FileSHA256WithProgress(n.modelPath, filepath.Join(cfg.DataDir, "cache"), hashProgress); err != nil {
			return nil, err
		}
		b, _ := hex.DecodeString(n.sha)
		copy(n.shaBytes[:], b)
		if n.tok, err = shard.LoadTokenizer(n.modelPath); err != nil {
			return nil, err
		}
	}
	// A node without the model file skips the self-benchmark: it would fetch a layer it may
	// never serve. It announces no speed, which the planner takes as average.
	if !cfg.ClientOnly && !swarm {
		b, err := n.selfBench(ctx)
		if err != nil {
			return nil, err
		}
		n.speed, n.freeGPU, n.gpus, n.gpuAsked = b.MsPerLayer, b.FreeGPU, b.Devices, true
		startMs := b.RawMs
		if len(n.gpus) > 0 {
			gpuBytes := gpuOffer(n.gpus, n.cfg.GPULayers, slices.Max(n.shape().LayerCosts))
			n.offer += gpuBytes
			n.gpuBytes = gpuBytes
			startMs = blendedMs(b.RawMs, b.GPURawMs, gpuBytes, n.offer)
			n.speed = roundSpeed(startMs)
			n.log.Info("GPUs", "devices", deviceNames(n.gpus), "gpu_ms_per_layer", fmt.Sprintf("%.3g", b.GPURawMs),
				"cpu_ms_per_layer", fmt.Sprintf("%.3g", b.RawMs), "gpu_offer", gpuBytes, "announced_ms_per_layer", n.speed)
		}
		n.log.Info("self-benchmark", "layers", b.Range.String(), "layer_bytes", n.model.RangeBytes(b.Range),
			"ms_per_layer", fmt.Sprintf("%.3g", b.MsPerLayer), "measured_ms", fmt.Sprintf("%.3g", b.RawMs), "steps", b.Steps,
			"took", b.Took.Round(time.Millisecond), "gpus", b.GPUs, "free_gpu", b.FreeGPU, "offer", n.offer)
		n.speedT = newSpeedTracker(cfg.Speed, startMs, n.speed, nil)
	} else {
		n.speedT = newSpeedTracker(cfg.Speed, 0, 0, nil)
	}

	hostOpts := []p2p.Option{p2p.WithListen(cfg.Listen...), p2p.WithIdentityFile(filepath.Join(cfg.DataDir, "identity.key")), p2p.WithLogger(n.log), p2p.WithObserver(n.metrics)}
	if cfg.SwarmKey != "" {
		hostOpts = append(hostOpts, p2p.WithSwarmKey(cfg.SwarmKey))
	}
	if cfg.InjectLatency > 0 || cfg.InjectBandwidth > 0 {
		hostOpts = append(hostOpts, p2p.WithLatency(cfg.InjectLatency, cfg.InjectBandwidth))
	}
	if n.host, err = p2p.New(ctx, hostOpts...); err != nil {
		return nil, err
	}
	if err := n.writeAddrFile(); err != nil {
		return nil, err
	}
	n.startWeights()
	if !swarm {
		if err := n.serveWholeModel(); err != nil {
			return nil, err
		}
	}

	gossipHost, gossipPort, err := n.gossipAddr()
	if err != nil {
		return nil, err
	}
	dopts := []discovery.Option{
		discovery.WithBindAddr(gossipHost, gossipPort),
		discovery.WithHost(n.host.Libp2p()),
		discovery.WithMeta(n.meta()),
		discovery.WithLogger(n.log),
	}
	if cfg.SwarmKey != "" {
		raw, err := os.ReadFile(cfg.SwarmKey)
		if err != nil {
			return nil, fmt.Errorf("swarm key: %w", err)
		}
		key, err := discovery.DeriveSecretKey(raw)
		if err != nil {
			return nil, err
		}
		dopts = append(dopts, discovery.WithSecretKey(key))
	}
	if !cfg.MDNS {
		dopts = append(dopts, discovery.WithoutMDNS())
	}
	if n.members, err = discovery.New(ctx, dopts...); err != nil {
		return nil, err
	}
	if swarm {
		if len(cfg.Join) > 0 {
			go n.joinLoop(cfg.Join)
		}
		if cfg.hubSlices() {
			err = n.modelFromHub(ctx)
		} else {
			err = n.modelFromSwarm(ctx)
		}
		if err != nil {
			return nil, err
		}
		n.announce()
	}

	n.router = newRouter(n)
	gopts := []pipeline.GeneratorOption{pipeline.WithMaxContext(cfg.MaxContext), pipeline.WithGeneratorLogger(n.log),
		pipeline.WithObserver(n.metrics), pipeline.WithRecovery(cfg.RecoverFor, 8)}
	if cfg.Queue > 0 {
		n.admit = pipeline.NewAdmission(cfg.Queue, cfg.QueueTimeout)
		gopts = append(gopts, pipeline.WithAdmission(n.admit))
	}
	n.gen = pipeline.NewGenerator(n.tok, n.router, gopts...)
	if err := n.startAPI(); err != nil {
		return nil, err
	}
	n.announce() // the API address is known only now
	go n.refreshLoop()
	if len(cfg.Join) > 0 && !swarm {
		go n.joinLoop(cfg.Join)
	}
	go n.planLoop()
	if !cfg.ClientOnly && !swarm {
		go n.speedLoop()
	}
	n.log.Info("node started", "peer", n.host.ID().String(), "model", n.model.Name, "layers", n.model.Layers,
		"api", n.apiAddr, "gossip", n.members.LocalAddr(), "client_only", cfg.ClientOnly, "data_dir", cfg.DataDir)
	logBuild(n.log)
	return n, nil
}

// writeAddrFile records the node's full multiaddrs, so another node (or a script) can join it.
func (n *Node) writeAddrFile() error {
	var lines []string
	for _, a := range n.host.Addrs() {
		lines = append(lines, a.String())
	}
	if len(lines) == 0 {
		return errors.New("libp2p host has no addresses")
	}
	for _, l := range lines {
		n.log.Info("listening", "multiaddr", l)
	}
	return writeFileAtomic(filepath.Join(n.cfg.DataDir, "multiaddr"), []byte(strings.Join(lines, "\n")+"\n"))
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// gossipAddr is memberlist's bind address: --gossip, else the libp2p TCP port plus one (0 when
// libp2p picked its port, so memberlist picks too).
func (n *Node) gossipAddr() (string, int, error) {
	if n.cfg.Gossip != "" {
		h, p, err := net.SplitHostPort(n.cfg.Gossip)
		if err != nil {
			return "", 0, fmt.Errorf("--gossip %q: %w", n.cfg.Gossip, err)
		}
		port, err := strconv.Atoi(p)
		if err != nil {
			return "", 0, fmt.Errorf("--gossip %q: bad port", n.cfg.Gossip)
		}
		return h, port, nil
	}
	// The first TCP listen address: QUIC's UDP port may be the same number.
	a, err := ma.NewMultiaddr(n.cfg.Listen[0])
	if err != nil {
		return "", 0, fmt.Errorf("--listen %q: %w", n.cfg.Listen[0], err)
	}
	for _, s := range n.cfg.Listen {
		if m, err := ma.NewMultiaddr(s); err == nil {
			if _, err := m.ValueForProtocol(ma.P_TCP); err == nil {
				a = m
				break
			}
		}
	}
	host := "0.0.0.0"
	if ip, err := a.ValueForProtocol(ma.P_IP4); err == nil {
		host = ip
	}
	port := 0
	if p, err := a.ValueForProtocol(ma.P_TCP); err == nil {
		if v, _ := strconv.Atoi(p); v > 0 {
			port = v + 1
		}
	}
	return host, port, nil
}

func (n *Node) joinLoop(addrs []string) {
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		k, err := n.members.Join(ctx, addrs)
		cancel()
		if err == nil && k > 0 {
			n.log.Info("joined the swarm", "through", strings.Join(addrs, ","), "contacted", k)
			return
		}
		n.log.Warn("join failed; retrying", "err", err, "attempt", attempt+1)
		if n.closing() {
			return
		}
		time.Sleep(min(time.Duration(attempt+1)*500*time.Millisecond, 5*time.Second))
	}
}

func (n *Node) closing() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state == discovery.StateDraining && n.stage == nil
}

// meta is what this node tells the swarm about itself.
func (n *Node) meta() discovery.NodeMeta {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := discovery.NodeMeta{
		PeerID:      n.host.ID(),
		Addrs:       n.host.Libp2p().Addrs(),
		ModelSHA256: n.shaBytes,
		State:       n.state,
		FreeRAM:     uint64(freeMemory()),
		FreeGPU:     n.freeGPU,
		MsPerLayer:  n.speed,
		Chain:       n.chain,
		APIAddr:     n.apiAddr,
		MemoryBytes: n.offer,
		Host:        n.hostID,
		SharedOffer: n.offer > 0 && n.cfg.MaxMemory == 0,
	}
	if n.stage != nil {
		r := n.stage.Info().Range
		m.LayerStart, m.LayerEnd = r.Start, r.End
	}
	if n.next != nil {
		r := n.next.Info().Range
		m.NextStart, m.NextEnd = r.Start, r.End
	}
	m.Sessions = n.sessionsLocked()
	n.manifestMeta(&m)
	return m
}

// sessionsLocked counts the sessions on every stage this node holds: the current one, the
// one loaded for the next plan, and replaced ones still finishing theirs. n.mu is held.
func (n *Node) sessionsLocked() uint32 {
	total := 0
	for _, st := range append([]*shard.Stage{n.stage, n.next}, n.retiring...) {
		if st != nil {
			total += st.Sessions()
		}
	}
	return uint32(total)
}

// memoryOffer is the memory the node offers the planner: --max-memory, else 80% of the
// memory available at start. It is fixed at start because MemAvailable shrinks by what the
// node itself loads: an offer that followed it would shrink below the node's own slice and
// let the planner take away layers the node already holds.
func memoryOffer(cfg Config, available int64) int64 {
	switch {
	case cfg.ClientOnly:
		return 0
	case cfg.MaxMemory > 0:
		return cfg.MaxMemory
	}
	return available * 8 / 10
}

func (n *Node) announce() {
	if n.members == nil {
		return
	}
	n.annMu.Lock()
	defer n.annMu.Unlock()
	m := n.meta()
	if err := n.members.UpdateMeta(m, 2*time.Second); err != nil {
		n.log.Warn("announce", "err", err)
		return
	}
	n.lastMeta, n.announced = m, true
}

// refreshLoop re-announces the metadata that changes without a state change: the sessions
// the router weighs routes by and the free memory peers show. It gossips only when a value
// has moved (drifted), so an idle swarm stays quiet.
func (n *Node) refreshLoop() {
	n.every(reannounceEvery, func() {
		n.swarmMoving.Store(anyMoving(n.peers()))
		n.annMu.Lock()
		last, ok := n.lastMeta, n.announced
		n.annMu.Unlock()
		if !ok || drifted(last, n.meta()) {
			n.announce()
		}
	})
}

// every calls f every d until the node stops.
func (n *Node) every(d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-n.quit:
			return
		case <-t.C:
			f()
		}
	}
}

// drifted reports whether cur differs from the announced old in a way peers care about:
// any field but the free memories, or a free memory that moved by more than 5% (and 64 MiB);
// smaller moves are allocator noise that would gossip every second.
func drifted(old, cur discovery.NodeMeta) bool {
	moved := func(a, b uint64) bool {
		d := max(a, b) - min(a, b)
		return d >= 64<<20 && d >= a/20
	}
	if moved(old.FreeRAM, cur.FreeRAM) || moved(old.FreeGPU, cur.FreeGPU) {
		return true
	}
	old.FreeRAM, old.FreeGPU = cur.FreeRAM, cur.FreeGPU
	a, errA := old.Encode()
	b, errB := cur.Encode()
	return errA != nil || errB != nil || !bytes.Equal(a, b)
}

// peers returns the live members that serve (or could serve) this node's model.
func (n *Node) peers() []discovery.NodeMeta {
	var out []discovery.NodeMeta
	for _, m := range n.members.Members() {
		if m.PeerID == "" || m.ModelSHA256 != n.shaBytes {
			continue
		}
		out = append(out, m)
	}
	return out
}

// planLoop re-plans whenever membership changes, after the view settles.
func (n *Node) planLoop() {
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	n.replan()
	for {
		select {
		case _, ok := <-n.members.Events():
			if !ok {
				return
			}
			time.Sleep(n.cfg.ReplanDelay)
			for drained := false; !drained; { // coalesce a burst of events
				select {
				case <-n.members.Events():
				default:
					drained = true
				}
			}
		case <-tick.C:
		}
		if n.isDraining() {
			return
		}
		n.replan()
	}
}

func (n *Node) isDraining() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state == discovery.StateDraining
}

func (n *Node) shape() shard.ModelShape {
	return n.model.Shape(n.cfg.MaxContext, n.cfg.MaxSessions, 2) // the stages' KV cache is F16
}

// capacities lists the nodes a plan is made of: every live member that offers memory.
func (n *Node) capacities() []shard.NodeCapacity {
	var shape shard.ModelShape
	if n.model != nil {
		shape = n.shape()
	}
	return capacitiesOf(shape, n.peers())
}

// capacitiesOf is what the planner sees of the members: their offers (nodes of one machine
// splitting its memory, host.go), announced speeds and current ranges.
func capacitiesOf(shape shard.ModelShape, members []discovery.NodeMeta) []shard.NodeCapacity {
	var nodes []shard.NodeCapacity
	var kept []discovery.NodeMeta
	for _, m := range members {
		if m.MemoryBytes <= 0 || m.State == discovery.StateDraining {
			continue
		}
		kept = append(kept, m)
		c := shard.NodeCapacity{ID: m.PeerID.String(), MemoryBytes: m.MemoryBytes, MsPerLayer: float64(m.MsPerLayer), CurrentChain: m.Chain}
		if m.LayerEnd > m.LayerStart {
			c.Current = shard.Range{Start: m.LayerStart, End: m.LayerEnd}
		}
		nodes = append(nodes, c)
	}
	splitHosts(shape, kept, nodes)
	return nodes
}

func (n *Node) liveMembersKey() string { return membersKey(n.capacities()) }

// replan computes the swarm's plan from the live view (every node computes the same one) and
// moves this node to its part of it.
func (n *Node) replan() {
	nodes := n.capacities()
	if n.cfg.ClientOnly || len(nodes) == 0 {
		return
	}
	plan, err := shard.PlanLayers(n.shape(), nodes)
	n.mu.Lock()
	n.planErr = err
	cur := shard.Range{}
	if n.stage != nil {
		cur = n.stage.Info().Range
	}
	n.mu.Unlock()
	if err != nil {
		n.log.Warn("the swarm cannot hold the model", "err", err)
		return
	}
	mine, _ := plan.Lookup(n.host.ID().String())
	if mine.Range == cur {
		n.mu.Lock()
		changed := n.chain != mine.Chain
		n.chain = mine.Chain
		n.mu.Unlock()
		if changed {
			n.announce()
		}
		return
	}
	if err := n.moveTo(mine.Range, mine.Chain, membersKey(nodes)); err != nil {
		n.log.Error("could not load the planned layers", "range", mine.Range.String(), "err", err)
	}
}

// membersKey names the set of nodes a plan was computed from; a move waits for the swarm to
// settle only while that set holds.
func membersKey(nodes []shard.NodeCapacity) string {
	ids := make([]string, len(nodes))
	for i, c := range nodes {
		ids[i] = c.ID
	}
	slices.Sort(ids)
	return strings.Join(ids, ",")
}

// moveTo loads r and serves it beside the old range, announced as the node's next range, and
// drops the old range only once the swarm's settled ranges cover every layer: a re-plan moves
// layers between nodes without a moment in which some layer has no server. members is the
// membersKey of the plan that asked for r.
func (n *Node) moveTo(r shard.Range, chain int, members string) error {
	n.mu.Lock()
	old := n.stage
	if old == nil {
		n.state = discovery.StateLoading
	}
	// A plan that returns to a range this node is still draining takes that stage back: it is
	// loaded and served already, and loading it again would collide with it on the host.
	var st *shard.Stage
	if i := slices.IndexFunc(n.retiring, func(s *shard.Stage) bool { return s.Info().Range == r }); i >= 0 && !r.Empty() {
		st = n.retiring[i]
		n.retiring = slices.Delete(n.retiring, i, i+1)
		n.log.Info("serving a draining range again", "range", r.String())
	}
	n.mu.Unlock()
	if st == nil && !r.Empty() {
		n.announce()
		n.log.Info("loading layers", "range", r.String(), "of", n.model.Layers, "weights", n.model.RangeBytes(r))
		var err error
		opts := []shard.StageOption{
			shard.WithSliceDir(filepath.Join(n.cfg.DataDir, "slices")),
			shard.WithModelSHA256(n.sha),
			shard.WithThreads(n.cfg.Threads),
			shard.WithMaxSessions(n.cfg.MaxSessions),
			shard.WithMaxContext(n.cfg.MaxContext),
			shard.WithLogger(n.log),
			shard.WithProgress(n.progress(r)),
		}
		if l := n.stageLock(); l != nil {
			opts = append(opts, shard.WithCPULock(l))
		}
		if n.cfg.Deterministic {
			opts = append(opts, shard.WithUnbatched())
		}
		var file string
		if file, err = n.stageFile(context.Background(), r); err == nil {
			if st, err = n.loadStage(context.Background(), file, r, opts); err == nil {
				n.servedFile(file)
			}
		}
		if err != nil {
			n.mu.Lock()
			if n.stage == nil {
				n.state = discovery.StateIdle
			}
			n.mu.Unlock()
			return err
		}
		if err := n.host.ServeStage(n.timed(st)); err != nil {
			st.Close()
			return err
		}
	}
	if old != nil {
		n.mu.Lock()
		n.next = st
		n.mu.Unlock()
		n.announce()
		if !n.awaitSettled(r, members) {
			// The plan moved on: keep serving the old range, which the swarm still counts on,
			// and let the new stage drain (sessions may have been routed to it already); the
			// next re-plan starts from here, and takes it back if it asks for r again.
			n.mu.Lock()
			n.next = nil
			if st != nil {
				n.retiring = append(n.retiring, st)
			}
			n.mu.Unlock()
			n.announce()
			go n.retire(st)
			return nil
		}
	}
	n.mu.Lock()
	n.stage, n.next, n.chain, n.state = st, nil, chain, discovery.StateServing
	if st == nil {
		n.chain, n.state = -1, discovery.StateIdle
	}
	if old != nil {
		n.retiring = append(n.retiring, old)
	}
	n.mu.Unlock()
	n.announce()
	if st != nil {
		n.log.Info("serving layers", "range", r.String(), "chain", chain)
	}
	go n.retire(old)
	return nil
}

// awaitSettled waits until the ranges the swarm is moving to (each node's next range, or its
// current one when it is not moving) chain through every layer, with this node at mine, and
// reports whether to switch. A node that never finishes loading must not pin the old plan
// forever, hence the bound, after which it switches anyway. It reports false, to keep the old
// range, once the plan is obsolete: a node joined or died (a dead node's layers have no server
// in the plan being waited for, so it would never settle), or the plan of the swarm as it is
// now gives this node another range (nodes that planned from different views moved to ranges
// that do not chain, each waiting for the others). Either way the next re-plan, which this
// wait would otherwise block, takes over.
func (n *Node) awaitSettled(mine shard.Range, members string) bool {
	deadline := time.Now().Add(max(n.cfg.DrainWait, 30*time.Second))
	for time.Now().Before(deadline) {
		if n.liveMembersKey() != members {
			n.log.Info("membership changed while moving; keeping the old range and re-planning", "range", mine.String())
			return false
		}
		if plan, err := shard.PlanLayers(n.shape(), n.capacities()); err == nil {
			if now, _ := plan.Lookup(n.host.ID().String()); now.Range != mine {
				n.log.Info("the plan changed while moving; keeping the old range and re-planning", "range", mine.String(), "plan_now", now.Range.String())
				return false
			}
		}
		var cands []pipeline.Candidate
		for _, m := range n.peers() {
			r := shard.Range{Start: m.LayerStart, End: m.LayerEnd}
			if m.NextEnd > m.NextStart {
				r = shard.Range{Start: m.NextStart, End: m.NextEnd}
			}
			if m.PeerID == n.host.ID() {
				r = mine
			} else if !isServing(m.State) {
				continue
			}
			if !r.Empty() {
				cands = append(cands, pipeline.Candidate{ID: m.PeerID.String(), Range: r})
			}
		}
		if _, err := pipeline.ChooseRoute(cands, n.model.Layers, 0, nil); err == nil {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	n.log.Warn("the swarm did not settle on the new plan in time; switching anyway")
	return true
}

// retire stops an old stage once its sessions are done (or after DrainWait). It stays up a
// moment even when idle: routers whose view predates the switch may still pick it.
func (n *Node) retire(old *shard.Stage) {
	if old == nil {
		return
	}
	time.Sleep(time.Second)
	deadline := time.Now().Add(n.cfg.DrainWait)
	for old.Sessions() > 0 && time.Now().Before(deadline) && n.isRetiring(old) {
		time.Sleep(100 * time.Millisecond)
	}
	n.mu.Lock()
	i := slices.Index(n.retiring, old)
	if i >= 0 {
		n.retiring = slices.Delete(n.retiring, i, i+1)
	}
	n.mu.Unlock()
	if i < 0 { // a later plan took it back (moveTo)
		return
	}
	n.host.StopStage(n.sha, old.Info().Range)
	old.Close()
	n.log.Info("released layers", "range", old.Info().Range.String())
}

func (n *Node) isRetiring(st *shard.Stage) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Contains(n.retiring, st)
}

// progress reports cutting and loading a slice.
func (n *Node) progress(r shard.Range) func(float32) {
	return n.progressFor("loading layers " + r.String())
}

// Close drains the node: it stops taking sessions, lets running ones finish (bounded), leaves
// the swarm so the others re-plan at once, and frees everything.
func (n *Node) Close() error {
	n.quitOnce.Do(func() { close(n.quit) })
	n.mu.Lock()
	n.state = discovery.StateDraining
	st := n.stage
	n.mu.Unlock()
	if n.members != nil {
		start := time.Now()
		n.announce()
		left := 0
		if st != nil {
			n.log.Info("draining: no new sessions", "sessions", st.Sessions(), "range", st.Info().Range.String())
			deadline := time.Now().Add(min(n.cfg.DrainWait, 10*time.Second))
			for st.Sessions() > 0 && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond)
			}
			if left = st.Sessions(); left > 0 {
				n.log.Warn("drain time is up; cutting sessions", "sessions", left)
			}
		}
		if err := n.members.Leave(2 * time.Second); err != nil {
			n.log.Warn("leave", "err", err)
		} else {
			n.log.Info("left the swarm", "took", time.Since(start).Round(time.Millisecond), "sessions_cut", left)
		}
		_ = n.members.Shutdown()
	}
	if n.api != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = n.api.Shutdown(ctx)
		cancel()
	}
	n.mu.Lock()
	n.stage = nil
	n.mu.Unlock()
	if n.host != nil {
		_ = n.host.Close()
	}
	if st != nil {
		st.Close()
	}
	if n.cpu != nil {
		_ = n.cpu.Close()
	}
	if n.hostCPU != nil {
		_ = n.hostCPU.Close()
	}
	return nil
}

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.host.ID() }

// APIAddr is the host:port the API listens on.
func (n *Node) APIAddr() string { return n.apiAddr }

// logBuild says which vector extensions ggml's kernels were compiled for, and warns when the
// CPU has better ones: a plain `go build` compiles ggml with no -march and runs 3-27x slower.
func logBuild(log *slog.Logger) {
	r := cpufeat.Check()
	log.Info("ggml CPU build", "compiled_for", r.BuiltString(), "cpu_has", r.CPUString())
	if r.Slower {
		log.Warn("ggml was compiled without this CPU's vector extensions, so compute runs several times slower than it could; build with `make build` (CGO_CFLAGS=-march=native)",
			"compiled_for", r.BuiltString(), "cpu_has", r.CPUString())
	}
}
