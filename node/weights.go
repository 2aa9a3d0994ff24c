package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/fetch"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
	"github.com/strata-llm/strata/weights/peerfetch"
)

// SwarmModel as --model takes the model the swarm serves: the node holds no model file and
// fetches only the slices the plan gives it, from the peers that hold them.
const SwarmModel = "swarm"

func (c *Config) fromSwarm() bool { return c.Model == SwarmModel }

// hubSlices: --slices-only with a remote --model reads the header and the node's slices from
// the hub in ranges instead of downloading the whole file.
func (c *Config) hubSlices() bool { return c.SlicesOnly && fetch.IsRemote(c.Model) }

// weightsState is what the node serves on the weights protocol and how it fetches.
type weightsState struct {
	holdings *peerfetch.Holdings
	limit    *p2p.Limiter
	manifest []byte   // the encoded manifest of the model, once known
	id       [16]byte // its id's first 16 bytes, as gossiped

	remote *fetch.Remote // --slices-only: the model file on the hub

	mu    sync.Mutex
	fetch *FetchStatus // the fetch in progress, if any
}

// FetchStatus is a slice fetch in progress or the last one done.
type FetchStatus struct {
	Range       shard.Range `json:"range"`
	SliceBytes  int64       `json:"slice_bytes"`
	TensorBytes int64       `json:"tensor_bytes"`
	Sources     int         `json:"sources"`           // peers asked
	Dropped     []string    `json:"dropped,omitempty"` // peers whose bytes failed the manifest's check
	BytesPerSec float64     `json:"bytes_per_sec"`
	Done        bool        `json:"done"`
	Error       string      `json:"error,omitempty"`

	started time.Time
}

func (n *Node) startWeights() {
	n.w.holdings = peerfetch.NewHoldings()
	n.w.limit = p2p.NewLimiter(n.cfg.FetchBandwidth)
	n.host.ServeWeights(n.w.holdings, p2p.WithServeBandwidth(n.w.limit))
}

// serveWholeModel builds (or reads from the cache) the manifest of the model file this node
// holds and serves it and the file's tensors to peers fetching their slices.
func (n *Node) serveWholeModel() error {
	cache := filepath.Join(n.cfg.DataDir, "cache", "manifest-"+n.sha[:32])
	enc, err := os.ReadFile(cache)
	if err == nil {
		if m, derr := weights.Decode(enc); derr != nil || m.ModelSHA256 != n.sha || m.FileSize != n.model.FileSize {
			enc = nil
		}
	}
	if enc == nil {
		start := time.Now()
		m, err := weights.Build(n.modelPath, n.sha)
		if err != nil {
			return err
		}
		if enc, err = m.Encode(); err != nil {
			return err
		}
		if err := writeFileAtomic(cache, enc); err != nil {
			n.log.Warn("could not cache the weights manifest", "err", err)
		}
		n.log.Info("built weights manifest", "id", weights.ID(enc)[:16], "tensors", len(m.Tensors), "took", time.Since(start).Round(time.Millisecond))
	}
	if err := n.useManifest(enc); err != nil {
		return err
	}
	return n.w.holdings.AddFile(n.shaBytes, n.modelPath)
}

func (n *Node) useManifest(enc []byte) error {
	if _, err := n.w.holdings.AddManifest(enc); err != nil {
		return err
	}
	id, _ := hex.DecodeString(weights.ID(enc))
	n.mu.Lock()
	n.w.manifest = enc
	copy(n.w.id[:], id)
	n.mu.Unlock()
	return nil
}

// modelFromSwarm waits for a peer that serves a model with a manifest, fetches the manifest
// and takes the model's description and tokenizer from its header: the node then plans and
// fetches its layers like any other, holding no model file.
func (n *Node) modelFromSwarm(ctx context.Context) error {
	n.log.Info("no model file: waiting for a peer serving a model's weights")
	for {
		for _, m := range n.members.Members() {
			if m.PeerID == "" || m.PeerID == n.host.ID() || m.ModelSHA256 == ([32]byte{}) || m.ManifestID == ([16]byte{}) {
				continue
			}
			sha := hex.EncodeToString(m.ModelSHA256[:])
			src := peerfetch.PeerSource(n.host, peer.AddrInfo{ID: m.PeerID, Addrs: m.Addrs}, n.w.limit, nil)
			enc, man, _, err := peerfetch.FetchManifest(ctx, sha, hex.EncodeToString(m.ManifestID[:]), []peerfetch.Source{src}, n.log)
			if err != nil {
				n.log.Warn("could not get the weights manifest", "peer", m.PeerID.String(), "err", err)
				continue
			}
			meta, err := man.Parse()
			if err != nil {
				return err
			}
			if n.model, err = shard.ModelInfoOf(meta, man.FileSize); err != nil {
				return err
			}
			if n.tok, err = shard.TokenizerOf(meta); err != nil {
				return err
			}
			n.sha, n.shaBytes = sha, m.ModelSHA256
			if err := n.useManifest(enc); err != nil {
				return err
			}
			n.log.Info("serving the swarm's model", "model", n.model.Name, "sha256", sha[:12], "layers", n.model.Layers,
				"manifest", weights.ID(enc)[:16], "from", m.PeerID.String())
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no peer served a model's weights: %w", ctx.Err())
		case <-n.quit:
			return errors.New("node closed")
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// modelFromHub reads the model's header from the hub with Range requests: the node then
// plans like any other and reads only its slices, from peers when they have the model's
// manifest, else from the hub.
func (n *Node) modelFromHub(ctx context.Context) error {
	f := fetch.New(filepath.Join(n.cfg.DataDir, "models"), fetch.WithLogger(n.log))
	rm, err := f.OpenRemote(ctx, n.cfg.Model)
	if err != nil {
		return err
	}
	if rm.SHA256() == "" {
		return fmt.Errorf("--slices-only: the server names no sha256 for %s; append #sha256=HEX to name the model", n.cfg.Model)
	}
	meta, hb, err := peerfetch.RemoteHeader(ctx, rm)
	if err != nil {
		return err
	}
	if n.model, err = shard.ModelInfoOf(meta, rm.Size()); err != nil {
		return err
	}
	if n.tok, err = shard.TokenizerOf(meta); err != nil {
		return err
	}
	n.sha = rm.SHA256()
	b, _ := hex.DecodeString(n.sha)
	copy(n.shaBytes[:], b)
	n.w.remote = rm
	n.log.Info("reading only this node's slices of the model from the hub", "model", n.model.Name, "sha256", n.sha[:12],
		"size", rm.Size(), "header_bytes", hb)
	return nil
}

// findManifest takes the model's manifest from a peer gossiping one, if this node has none.
func (n *Node) findManifest(ctx context.Context) {
	n.mu.Lock()
	have := n.w.manifest != nil
	n.mu.Unlock()
	if have {
		return
	}
	for _, m := range n.peers() {
		if m.PeerID == n.host.ID() || m.ManifestID == ([16]byte{}) {
			continue
		}
		src := peerfetch.PeerSource(n.host, peer.AddrInfo{ID: m.PeerID, Addrs: m.Addrs}, n.w.limit, nil)
		enc, _, _, err := peerfetch.FetchManifest(ctx, n.sha, hex.EncodeToString(m.ManifestID[:]), []peerfetch.Source{src}, n.log)
		if err == nil && n.useManifest(enc) == nil {
			return
		}
	}
}

// stageFile is the GGUF a stage of r loads: the model file when this node holds it, else the
// slice of r, from the slice cache or fetched from the peers serving the model.
func (n *Node) stageFile(ctx context.Context, r shard.Range) (string, error) {
	if n.modelPath != "" {
		return n.modelPath, nil
	}
	p := shard.SliceCache{Dir: filepath.Join(n.cfg.DataDir, "slices")}.Path(n.sha, r)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	if n.w.remote != nil {
		n.findManifest(ctx)
	}
	var srcs []peerfetch.Source
	for _, m := range n.peers() {
		if m.PeerID == n.host.ID() || m.PeerID == "" {
			continue
		}
		// Every peer of the model may hold the tensors (its whole file, or slices it served):
		// one that lacks one says so and the fetch asks the others.
		srcs = append(srcs, peerfetch.PeerSource(n.host, peer.AddrInfo{ID: m.PeerID, Addrs: m.Addrs}, n.w.limit, nil))
	}
	n.mu.Lock()
	enc, id := n.w.manifest, n.w.id
	n.mu.Unlock()
	if n.w.remote != nil && (enc == nil || len(srcs) == 0) {
		return p, n.fetchFromHub(ctx, r, p, enc, id)
	}
	status := &FetchStatus{Range: r, Sources: len(srcs), SliceBytes: n.model.RangeBytes(r), started: time.Now()}
	n.w.mu.Lock()
	n.w.fetch = status
	n.w.mu.Unlock()
	bar := n.progressFor("fetching layers " + r.String())
	report := func(f float32) {
		bar(f)
		n.w.mu.Lock()
		status.TensorBytes = int64(f * float32(status.SliceBytes))
		status.BytesPerSec = float64(status.TensorBytes) / max(time.Since(status.started).Seconds(), 1e-3)
		n.w.mu.Unlock()
	}
	st, err := peerfetch.Fetch(ctx, peerfetch.Request{ModelSHA256: n.sha, ManifestID: hex.EncodeToString(id[:]), Range: r, Dst: p}, srcs,
		peerfetch.WithManifest(enc), peerfetch.WithLogger(n.log), peerfetch.WithProgress(report))
	if err != nil && n.w.remote != nil && ctx.Err() == nil {
		n.log.Warn("peers could not serve the slice; reading it from the hub", "layers", r.String(), "err", err)
		return p, n.fetchFromHub(ctx, r, p, enc, id)
	}
	n.w.mu.Lock()
	status.SliceBytes, status.TensorBytes, status.Dropped, status.Done = st.SliceBytes, st.TensorBytes, st.Dropped, err == nil
	status.BytesPerSec = float64(st.TensorBytes) / max(time.Since(status.started).Seconds(), 1e-3)
	if err != nil {
		status.Error = err.Error()
	}
	n.w.mu.Unlock()
	if err != nil {
		return "", err
	}
	return p, nil
}

func (n *Node) fetchFromHub(ctx context.Context, r shard.Range, p string, enc []byte, id [16]byte) error {
	status := &FetchStatus{Range: r, SliceBytes: n.model.RangeBytes(r), started: time.Now()}
	n.w.mu.Lock()
	n.w.fetch = status
	n.w.mu.Unlock()
	opts := []peerfetch.Option{peerfetch.WithLogger(n.log), peerfetch.WithProgress(n.progressFor("reading layers " + r.String() + " from the hub"))}
	if enc != nil {
		opts = append(opts, peerfetch.WithManifest(enc))
	}
	st, err := peerfetch.FetchFromHub(ctx, peerfetch.Request{ModelSHA256: n.sha, ManifestID: hex.EncodeToString(id[:]), Range: r, Dst: p}, n.w.remote, opts...)
	n.w.mu.Lock()
	status.SliceBytes, status.TensorBytes, status.Done = st.SliceBytes, st.TensorBytes, err == nil
	status.BytesPerSec = float64(st.TensorBytes) / max(time.Since(status.started).Seconds(), 1e-3)
	if err != nil {
		status.Error = err.Error()
	}
	n.w.mu.Unlock()
	return err
}

// servedFile offers a loaded stage's slice file to peers fetching these layers.
func (n *Node) servedFile(file string) {
	if file == n.modelPath || n.w.holdings == nil {
		return
	}
	if err := n.w.holdings.AddFile(n.shaBytes, file); err != nil {
		n.log.Warn("cannot serve the slice's weights", "file", file, "err", err)
	}
}

// Fetch is the slice fetch in progress or the last one, if any.
func (n *Node) Fetch() *FetchStatus {
	n.w.mu.Lock()
	defer n.w.mu.Unlock()
	if n.w.fetch == nil {
		return nil
	}
	c := *n.w.fetch
	return &c
}

// manifestMeta fills the manifest id into the metadata; n.mu is held.
func (n *Node) manifestMeta(m *discovery.NodeMeta) {
	if !bytes.Equal(n.w.id[:], make([]byte, 16)) {
		m.ManifestID = n.w.id
	}
}
