package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/strata-llm/strata/api"
	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

func (n *Node) startAPI() error {
	// A body several times the longest prompt that could fit (JSON escapes, a template's own
	// text) is plenty; past it nothing is read.
	maxBody := min(max(8*int64(n.gen.MaxPromptBytes()), 1<<20), 16<<20)
	opts := []api.Option{api.WithAPIKey(n.cfg.APIKey), api.WithLogger(n.log), api.WithMaxBodyBytes(maxBody)}
	if n.cfg.ProtectMonitoring {
		if n.cfg.APIKey == "" {
			return errors.New("--protect-monitoring needs an API key (--api-key or STRATA_API_KEY)")
		}
		opts = append(opts, api.WithProtectAll())
	}
	srv := api.NewServer(n, opts...)
	srv.Handle("GET /health", http.HandlerFunc(n.serveHealth))
	for pattern, h := range n.extraRoutes() {
		srv.Handle(pattern, h)
	}
	ln, err := net.Listen("tcp", n.cfg.API)
	if err != nil {
		return fmt.Errorf("api listen %s: %w", n.cfg.API, err)
	}
	n.apiAddr = ln.Addr().String()
	n.api = &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := n.api.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("api server", "err", err)
		}
	}()
	return writeFileAtomic(filepath.Join(n.cfg.DataDir, "api"), []byte(n.apiAddr+"\n"))
}

// Models lists the model this node's swarm serves.
func (n *Node) Models(ctx context.Context) ([]pipeline.ModelCard, error) {
	_, routeErr := n.router.route(0, nil)
	return []pipeline.ModelCard{{
		ID:            n.ModelID(),
		SHA256:        n.sha,
		ContextLength: n.cfg.MaxContext,
		ChatTemplate:  n.model.ChatTemplate,
		BOS:           n.tok.BOS,
		EOS:           n.tok.EOS,
		Vocab:         n.model.Vocab,
		Ready:         routeErr == nil,
	}}, nil
}

// ModelID is the name clients use for the model: the --model argument's base name.
func (n *Node) ModelID() string {
	switch {
	case n.cfg.swarmName != "":
		return n.cfg.swarmName
	case n.cfg.fromSwarm() && n.w.name != "":
		return n.w.name // the name the swarm serves it under
	case n.cfg.fromSwarm() && n.model != nil && n.model.Name != "":
		return n.model.Name // no file name to go by
	}
	return modelID(n.cfg.Model)
}

// Generate runs a completion through the swarm.
func (n *Node) Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error) {
	return n.gen.Generate(ctx, req, emit)
}

// Embed runs an input through every layer of the swarm and returns its pooled final hidden
// state (/v1/embeddings, /api/embed).
func (n *Node) Embed(ctx context.Context, req pipeline.EmbedRequest) (pipeline.EmbedResult, error) {
	return n.gen.Embed(ctx, req)
}

// Health is the node's view of the swarm, served at /health.
type Health struct {
	Ready       bool         `json:"ready"`
	Missing     string       `json:"missing,omitempty"`
	PeerID      string       `json:"peer_id"`
	State       string       `json:"state"`
	Model       string       `json:"model"`
	ModelSHA256 string       `json:"model_sha256"`
	Layers      int          `json:"layers"`
	Range       *shard.Range `json:"range,omitempty"`
	API         string       `json:"api"`
	Peers       []PeerHealth `json:"peers"`
	// Busy: requests are waiting for room (every route is full). A busy swarm is ready.
	Busy    bool          `json:"busy"`
	Queue   *QueueHealth  `json:"queue,omitempty"`
	Fetches []FetchStatus `json:"fetches,omitempty"` // this node's recent slice fetches, from peers or the hub (weights.go)
	// AtPlan: this node serves exactly what the plan of the swarm as it sees it now gives it,
	// and is not moving. A membership change flips it until the node has re-planned, so a
	// swarm whose nodes are all ready and at plan has settled (tests and scripts wait for it).
	AtPlan bool `json:"at_plan"`
	// RangeMemory is the weights and KV cache of each layer this node serves (layers.go).
	RangeMemory *RangeMemory `json:"range_memory,omitempty"`
	// Placement is where this node's stage computes: which layers sit on which device.
	Placement *PlacementHealth `json:"placement,omitempty"`
	// Speed is this node's speed: measured at start, measured now, announced (speed.go).
	Speed *SpeedHealth `json:"speed,omitempty"`
}

// PeerHealth is one member of the swarm as this node sees it.
type PeerHealth struct {
	PeerID string      `json:"peer_id"`
	State  string      `json:"state"`
	Range  shard.Range `json:"range"`
	// Next is the range a node moving to a new plan has loaded and serves beside Range, which
	// it retires once the swarm's next ranges cover every layer.
	Next       *shard.Range `json:"next,omitempty"`
	Chain      int          `json:"chain"`
	API        string       `json:"api,omitempty"`
	Gossip     string       `json:"gossip"`
	Memory     int64        `json:"memory_bytes"`
	FreeRAM    uint64       `json:"free_ram_bytes"`
	FreeGPU    uint64       `json:"free_gpu_bytes,omitempty"` // only nodes whose ggml sees a GPU
	MsPerLayer float32      `json:"ms_per_layer"`
	Sessions   uint32       `json:"sessions"`
	Self       bool         `json:"self,omitempty"`
}

// Health reports readiness: the swarm has a route through every layer.
func (n *Node) Health() Health {
	h := Health{
		PeerID:      n.host.ID().String(),
		Model:       n.ModelID(),
		ModelSHA256: n.sha,
		Layers:      n.model.Layers,
		API:         n.apiAddr,
	}
	n.mu.Lock()
	h.State = n.state.String()
	if n.stage != nil {
		r := n.stage.Info().Range
		h.Range = &r
		h.RangeMemory = rangeMemory(n.model, r, n.cfg.MaxContext, n.cfg.MaxSessions, 2) // as shape()
		h.Placement = stagePlacement(n.stage)
	}
	planErr := n.planErr
	n.mu.Unlock()
	n.mu.Lock()
	live := n.sessionsLocked()
	n.mu.Unlock()
	for _, m := range n.peers() {
		if m.PeerID == n.host.ID() {
			m.Sessions = live // our own count is live, not as of the last announcement
		}
		h.Peers = append(h.Peers, PeerHealth{
			PeerID: m.PeerID.String(), State: m.State.String(), Range: shard.Range{Start: m.LayerStart, End: m.LayerEnd},
			Chain: m.Chain, API: m.APIAddr, Gossip: m.Addr, Memory: m.MemoryBytes, FreeRAM: m.FreeRAM, FreeGPU: m.FreeGPU,
			MsPerLayer: m.MsPerLayer, Sessions: m.Sessions, Self: m.PeerID == n.host.ID(),
		})
		if m.NextEnd > m.NextStart && (m.NextStart != m.LayerStart || m.NextEnd != m.LayerEnd) {
			h.Peers[len(h.Peers)-1].Next = &shard.Range{Start: m.NextStart, End: m.NextEnd}
		}
	}
	h.Fetches = n.Fetches()
	if n.speedT != nil && !n.cfg.ClientOnly {
		sp := n.speedT.health()
		h.Speed = &sp
	}
	h.AtPlan = n.atPlan()
	_, err := n.router.route(0, nil)
	h.Ready = err == nil
	if q, busy := n.queueHealth(); n.admit != nil {
		h.Queue, h.Busy = &q, busy
	}
	switch {
	case planErr != nil:
		h.Missing = planErr.Error()
	case err != nil:
		h.Missing = err.Error()
	}
	return h
}

func (n *Node) atPlan() bool {
	if n.cfg.ClientOnly {
		return true
	}
	plan, err := shard.PlanLayers(n.shape(), n.capacities())
	if err != nil {
		return false
	}
	mine, _ := plan.Lookup(n.host.ID().String())
	n.mu.Lock()
	defer n.mu.Unlock()
	cur := shard.Range{}
	if n.stage != nil {
		cur = n.stage.Info().Range
	}
	return n.next == nil && n.state != discovery.StateLoading && mine.Range == cur
}

func (n *Node) serveHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(n.Health())
}

// serving reports the members whose stage can take sessions now.
func isServing(s discovery.State) bool { return s == discovery.StateServing }
