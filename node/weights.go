package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
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

func (c *Config) fromSwarm() bool { return c.Model == SwarmModel || c.swarmName != "" }

// nameInSwarm: a --model that is neither a file, nor in Ollama's store, nor remote, on a node
// that looks for peers, names a model the swarm serves (its ID in /v1/models); the node then
// fetches its slices of that model from the peers serving it. A path-like name stays an error.
func (c *Config) nameInSwarm() bool {
	if c.Model == SwarmModel || fetch.IsRemote(c.Model) || (len(c.Join) == 0 && !c.MDNS) {
		return false
	}
	if strings.HasSuffix(c.Model, ".gguf") || strings.HasPrefix(c.Model, "/") || strings.HasPrefix(c.Model, ".") {
		return false
	}
	_, err := fetch.ResolveLocal(c.Model, "")
	return err != nil
}

// hubSlices: --slices-only with a remote --model reads the header and the node's slices from
// the hub in ranges instead of downloading the whole file.
func (c *Config) hubSlices() bool { return c.SlicesOnly && fetch.IsRemote(c.Model) }

// weightsState is what the node serves on the weights protocol and how it fetches.
type weightsState struct {
	holdings *peerfetch.Holdings
	limit    *p2p.Limiter
	manifest []byte   // the encoded manifest of the model, once known
	id       [16]byte // its id's first 16 bytes, as gossiped

	hub    *peerfetch.HubHeader // --slices-only: the model's header, from the hub or the cache
	hubMu  sync.Mutex
	remote *fetch.Remote // --slices-only: the model file on the hub, opened when first needed

	// name is the model's ID as the peer it was taken from gossips it (--model swarm).
	name string

	mu      sync.Mutex
	fetches []*FetchStatus // recent slice fetches, oldest first
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
	want := n.cfg.swarmName
	if want != "" {
		n.log.Info("model not on this machine: waiting for a peer serving its weights", "model", want)
	} else {
		n.log.Info("no model file: waiting for a peer serving a model's weights")
	}
	lastNote := time.Now()
	for {
		var seen []string
		for _, m := range n.members.Members() {
			if m.PeerID == "" || m.PeerID == n.host.ID() || m.ModelSHA256 == ([32]byte{}) || m.ManifestID == ([16]byte{}) {
				continue
			}
			if want != "" && m.ModelName != want && !strings.HasPrefix(hex.EncodeToString(m.ModelSHA256[:]), strings.TrimPrefix(want, "sha256:")) {
				seen = append(seen, m.ModelName)
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
			n.w.name = m.ModelName
			if err := n.useManifest(enc); err != nil {
				return err
			}
			n.log.Info("serving the swarm's model", "model", n.model.Name, "sha256", sha[:12], "layers", n.model.Layers,
				"manifest", weights.ID(enc)[:16], "from", m.PeerID.String())
			return nil
		}
		if want != "" && time.Since(lastNote) > 10*time.Second {
			// A typo waits here too: say what was looked for where, and what the swarm serves.
			_, local := fetch.ResolveLocal(want, "")
			n.log.Warn("no peer serves the model yet; still waiting (it is not on this machine either)", "model", want,
				"served_by_peers", seen, "local", local)
			lastNote = time.Now()
		}
		select {
		case <-ctx.Done():
			if want != "" {
				return fmt.Errorf("no peer served model %q: %w", want, ctx.Err())
			}
			return fmt.Errorf("no peer served a model's weights: %w", ctx.Err())
		case <-n.quit:
			return errors.New("node closed")
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// modelFromHub reads the model's header from the hub with Range requests, or from the copy
// cached by an earlier start (so a restart needs no network): the node then plans like any
// other and reads only its slices, from peers when they have the model's manifest, else from
// the hub.
func (n *Node) modelFromHub(ctx context.Context) error {
	cache := peerfetch.HubHeaderPath(filepath.Join(n.cfg.DataDir, "cache"), n.cfg.Model)
	hh, err := peerfetch.LoadHubHeader(cache, n.cfg.Model)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			n.log.Warn("cached model header unusable; reading it from the hub again", "err", err)
		}
		rm, err := n.hubRemote(ctx)
		if err != nil {
			return err
		}
		_, hdr, hb, err := peerfetch.RemoteHeader(ctx, rm)
		if err != nil {
			return err
		}
		hh = &peerfetch.HubHeader{Ref: n.cfg.Model, ModelSHA256: rm.SHA256(), Size: rm.Size(), Header: hdr}
		if err := hh.Save(cache); err != nil {
			n.log.Warn("could not cache the model's header", "err", err)
		}
		n.log.Info("reading only this node's slices of the model from the hub", "sha256", rm.SHA256()[:12],
			"size", rm.Size(), "header_bytes", hb)
	} else {
		n.log.Info("using the model's header cached by an earlier start", "sha256", hh.ModelSHA256[:12], "size", hh.Size,
			"checked_against_manifest", hh.Manifest != "")
	}
	meta, err := weights.ParseHeader(hh.Header, hh.Size)
	if err != nil {
		return err
	}
	if n.model, err = shard.ModelInfoOf(meta, hh.Size); err != nil {
		return err
	}
	if n.tok, err = shard.TokenizerOf(meta); err != nil {
		return err
	}
	n.sha = hh.ModelSHA256
	b, _ := hex.DecodeString(n.sha)
	copy(n.shaBytes[:], b)
	n.w.hub = hh
	n.log.Info("model from the hub", "model", n.model.Name, "layers", n.model.Layers, "sha256", n.sha[:12])
	go n.watchManifest()
	return nil
}

// hubRemote opens the model file on the hub, once: only when something must be read from it.
func (n *Node) hubRemote(ctx context.Context) (*fetch.Remote, error) {
	n.w.hubMu.Lock()
	defer n.w.hubMu.Unlock()
	if n.w.remote != nil {
		return n.w.remote, nil
	}
	f := fetch.New(filepath.Join(n.cfg.DataDir, "models"), fetch.WithLogger(n.log))
	rm, err := f.OpenRemote(ctx, n.cfg.Model)
	if err != nil {
		return nil, err
	}
	if rm.SHA256() == "" {
		return nil, fmt.Errorf("--slices-only: the server names no sha256 for %s; append #sha256=HEX to name the model", n.cfg.Model)
	}
	if n.sha != "" && rm.SHA256() != n.sha {
		return nil, fmt.Errorf("--slices-only: %s now names model %s, the cached header is of %s; remove %s to start anew",
			n.cfg.Model, rm.SHA256()[:12], n.sha[:12], filepath.Join(n.cfg.DataDir, "cache"))
	}
	n.w.remote = rm
	return rm, nil
}

// findManifest takes the model's manifest from a peer gossiping one, if this node has none,
// and reports whether the node has one now.
func (n *Node) findManifest(ctx context.Context) bool {
	n.mu.Lock()
	have := n.w.manifest != nil
	n.mu.Unlock()
	if have {
		return true
	}
	for _, m := range n.peers() {
		if m.PeerID == n.host.ID() || m.ManifestID == ([16]byte{}) {
			continue
		}
		src := peerfetch.PeerSource(n.host, peer.AddrInfo{ID: m.PeerID, Addrs: m.Addrs}, n.w.limit, nil)
		enc, _, _, err := peerfetch.FetchManifest(ctx, n.sha, hex.EncodeToString(m.ManifestID[:]), []peerfetch.Source{src}, n.log)
		if err == nil && n.useManifest(enc) == nil {
			n.log.Info("got the model's weights manifest from a peer", "id", weights.ID(enc)[:16], "peer", m.PeerID.String())
			return true
		}
	}
	return false
}

// watchManifest, on a node that read its header and slices from the hub, waits for a peer
// with the model's manifest and then checks against it what the hub alone could not vouch
// for: the cached header and every slice read from the hub.
func (n *Node) watchManifest() {
	for !n.findManifest(context.Background()) {
		select {
		case <-n.quit:
			return
		case <-time.After(time.Second):
		}
	}
	n.mu.Lock()
	enc := n.w.manifest
	n.mu.Unlock()
	man, err := weights.Decode(enc)
	if err != nil {
		n.log.Error("the swarm's manifest does not decode", "err", err)
		return
	}
	id := weights.ID(enc)
	if hh := n.w.hub; hh != nil && hh.Manifest != id {
		if !bytes.Equal(hh.Header, man.Header) || hh.Size != man.FileSize {
			n.log.Error("the model header read from the hub differs from the swarm's manifest: the hub or the swarm serves another file; removing the cached header",
				"manifest", id[:16])
			_ = os.Remove(peerfetch.HubHeaderPath(filepath.Join(n.cfg.DataDir, "cache"), n.cfg.Model))
		} else {
			hh.Manifest = id
			if err := hh.Save(peerfetch.HubHeaderPath(filepath.Join(n.cfg.DataDir, "cache"), n.cfg.Model)); err != nil {
				n.log.Warn("could not record the header's check", "err", err)
			}
			n.log.Info("model header read from the hub matches the swarm's manifest", "manifest", id[:16])
		}
	}
	n.recheckSlices(man, id)
}

// recheckSlices checks each cached slice of the model that was read from the hub unverified
// against the manifest; one that fails is deleted and no longer served to peers.
func (n *Node) recheckSlices(man *weights.Manifest, id string) {
	dir := filepath.Join(n.cfg.DataDir, "slices")
	files, _ := filepath.Glob(filepath.Join(dir, n.sha[:16]+"-*.gguf"))
	for _, p := range files {
		rec, err := peerfetch.CheckRecord(p, n.sha)
		if err != nil || rec.Verified {
			continue // a damaged one is fetched again when next loaded
		}
		if err := peerfetch.VerifySlice(p, man); err != nil {
			n.log.Error("a slice read from the hub does not match the swarm's manifest: deleted and no longer served to peers; restart the node to fetch it again",
				"slice", filepath.Base(p), "err", err)
			n.w.holdings.RemoveFile(n.shaBytes, p)
			_ = peerfetch.RemoveSlice(p)
			n.setFetchResult(p, false, err)
			continue
		}
		rec.Verified, rec.Manifest = true, id
		if err := peerfetch.WriteRecord(p, rec); err != nil {
			n.log.Warn("could not record the slice's check", "slice", filepath.Base(p), "err", err)
		}
		n.setFetchResult(p, true, nil)
		n.log.Info("slice read from the hub matches the swarm's manifest", "slice", filepath.Base(p), "manifest", id[:16])
	}
}

// cachedSlice checks a fetched slice in the cache before it is loaded: its bytes against
// the digest recorded beside it (one read, no network), and, if it was read from the hub
// unverified and the node now has the manifest, each tensor against the manifest. A slice
// that fails is deleted, to be fetched again.
func (n *Node) cachedSlice(p string) bool {
	if _, err := os.Stat(p); err != nil {
		return false
	}
	rec, err := peerfetch.CheckRecord(p, n.sha)
	if err == nil && !rec.Verified {
		n.mu.Lock()
		enc := n.w.manifest
		n.mu.Unlock()
		if enc != nil {
			var man *weights.Manifest
			if man, err = weights.Decode(enc); err == nil {
				if err = peerfetch.VerifySlice(p, man); err == nil {
					rec.Verified, rec.Manifest = true, weights.ID(enc)
					err = peerfetch.WriteRecord(p, rec)
					n.log.Info("slice read from the hub matches the swarm's manifest", "slice", filepath.Base(p), "manifest", rec.Manifest[:16])
				}
			}
		}
	}
	if err != nil {
		n.log.Warn("cached slice fails its check; fetching it again", "slice", filepath.Base(p), "err", err)
		_ = peerfetch.RemoveSlice(p)
		return false
	}
	n.log.Info("using the cached slice", "slice", filepath.Base(p), "from", rec.From, "verified", rec.Verified)
	return true
}

// stageFile is the GGUF a stage of r loads: the model file when this node holds it, else the
// slice of r, from the slice cache or fetched from the peers serving the model (or the hub).
func (n *Node) stageFile(ctx context.Context, r shard.Range) (string, error) {
	if n.modelPath != "" {
		return n.modelPath, nil
	}
	p := shard.SliceCache{Dir: filepath.Join(n.cfg.DataDir, "slices")}.Path(n.sha, r)
	if n.cachedSlice(p) {
		return p, nil
	}
	hub := n.w.hub != nil
	if hub {
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
	if hub && (enc == nil || len(srcs) == 0) {
		return p, n.fetchFromHub(ctx, r, p, enc, id)
	}
	status := n.newFetch(r, "peers", p)
	n.w.mu.Lock()
	status.Sources = len(srcs)
	n.w.mu.Unlock()
	st, err := peerfetch.Fetch(ctx, peerfetch.Request{ModelSHA256: n.sha, ManifestID: hex.EncodeToString(id[:]), Range: r, Dst: p}, srcs,
		peerfetch.WithManifest(enc), peerfetch.WithLogger(n.log), peerfetch.WithProgress(n.fetchProgress(status, "fetching layers "+r.String())),
		peerfetch.WithSourceBytes(n.fetchSource(status)))
	if err != nil && hub && ctx.Err() == nil {
		n.log.Warn("peers could not serve the slice; reading it from the hub", "layers", r.String(), "err", err)
		n.endFetch(status, st.SliceBytes, st.TensorBytes, st.Dropped, false, err)
		return p, n.fetchFromHub(ctx, r, p, enc, id)
	}
	if err == nil {
		err = peerfetch.WriteRecord(p, peerfetch.Record{ModelSHA256: n.sha, Manifest: weights.ID(enc), Verified: true, From: "peers"})
	}
	n.endFetch(status, st.SliceBytes, st.TensorBytes, st.Dropped, err == nil, err)
	if err != nil {
		return "", err
	}
	return p, nil
}

func (n *Node) fetchFromHub(ctx context.Context, r shard.Range, p string, enc []byte, id [16]byte) error {
	rm, err := n.hubRemote(ctx)
	if err != nil {
		return err
	}
	status := n.newFetch(r, "hub", p)
	n.w.mu.Lock()
	status.Sources = 1
	n.w.mu.Unlock()
	opts := []peerfetch.Option{peerfetch.WithLogger(n.log), peerfetch.WithHeader(n.w.hub.Header),
		peerfetch.WithProgress(n.fetchProgress(status, "reading layers "+r.String()+" from the hub")),
		peerfetch.WithSourceBytes(n.fetchSource(status))}
	if enc != nil {
		opts = append(opts, peerfetch.WithManifest(enc))
	}
	st, err := peerfetch.FetchFromHub(ctx, peerfetch.Request{ModelSHA256: n.sha, ManifestID: hex.EncodeToString(id[:]), Range: r, Dst: p}, rm, opts...)
	if err == nil {
		rec := peerfetch.Record{ModelSHA256: n.sha, Verified: st.Verified, From: "hub"}
		if st.Verified {
			rec.Manifest = weights.ID(enc)
		}
		err = peerfetch.WriteRecord(p, rec)
	}
	n.endFetch(status, st.SliceBytes, st.TensorBytes, nil, err == nil && st.Verified, err)
	return err
}

// FetchStatus is one slice fetch, in progress or done, as /health, `strata status` and the
// dashboard show it.
type FetchStatus struct {
	Range       shard.Range      `json:"range"`
	From        string           `json:"from"` // "peers" or "hub"
	SliceBytes  int64            `json:"slice_bytes"`
	TensorBytes int64            `json:"tensor_bytes"`      // received so far, every attempt counted
	Sources     int              `json:"sources"`           // peers asked (1 for the hub)
	Peers       map[string]int64 `json:"peers,omitempty"`   // bytes received from each source (a peer ID, or "hub")
	Dropped     []string         `json:"dropped,omitempty"` // peers whose bytes failed the manifest's check
	BytesPerSec float64          `json:"bytes_per_sec"`
	Done        bool             `json:"done"`
	// Verified: every tensor matched the manifest. A slice read from the hub with no manifest
	// in the swarm is unverified until one appears.
	Verified bool   `json:"verified"`
	Error    string `json:"error,omitempty"`

	file    string
	started time.Time
}

// keptFetches bounds the fetches a node remembers for its status.
const keptFetches = 8

func (n *Node) newFetch(r shard.Range, from, file string) *FetchStatus {
	st := &FetchStatus{Range: r, From: from, SliceBytes: n.model.RangeBytes(r), Peers: map[string]int64{}, file: file, started: time.Now()}
	n.w.mu.Lock()
	defer n.w.mu.Unlock()
	if len(n.w.fetches) >= keptFetches {
		n.w.fetches = n.w.fetches[1:]
	}
	n.w.fetches = append(n.w.fetches, st)
	return st
}

func (n *Node) fetchProgress(st *FetchStatus, label string) func(float32) {
	bar := n.progressFor(label)
	return func(f float32) {
		bar(f)
		n.w.mu.Lock()
		st.TensorBytes = int64(f * float32(st.SliceBytes))
		st.BytesPerSec = float64(st.TensorBytes) / max(time.Since(st.started).Seconds(), 1e-3)
		n.w.mu.Unlock()
	}
}

func (n *Node) fetchSource(st *FetchStatus) func(string, int64) {
	return func(src string, k int64) {
		n.w.mu.Lock()
		st.Peers[src] += k
		n.w.mu.Unlock()
	}
}

func (n *Node) endFetch(st *FetchStatus, slice, got int64, dropped []string, verified bool, err error) {
	n.w.mu.Lock()
	defer n.w.mu.Unlock()
	if slice > 0 {
		st.SliceBytes = slice
	}
	st.TensorBytes, st.Dropped, st.Done, st.Verified = got, dropped, err == nil, verified
	st.BytesPerSec = float64(got) / max(time.Since(st.started).Seconds(), 1e-3)
	if err != nil {
		st.Error = err.Error()
	}
}

// setFetchResult records a later check of a fetched slice file.
func (n *Node) setFetchResult(file string, verified bool, err error) {
	n.w.mu.Lock()
	defer n.w.mu.Unlock()
	for _, st := range n.w.fetches {
		if st.file == file {
			st.Verified = verified
			if err != nil {
				st.Error = err.Error()
			}
		}
	}
}

// Fetches are the node's recent slice fetches, oldest first.
func (n *Node) Fetches() []FetchStatus {
	n.w.mu.Lock()
	defer n.w.mu.Unlock()
	out := make([]FetchStatus, 0, len(n.w.fetches))
	for _, st := range n.w.fetches {
		c := *st
		c.Peers = maps.Clone(st.Peers)
		c.Dropped = slices.Clone(st.Dropped)
		out = append(out, c)
	}
	return out
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

// manifestMeta fills the manifest id into the metadata; n.mu is held.
func (n *Node) manifestMeta(m *discovery.NodeMeta) {
	if !bytes.Equal(n.w.id[:], make([]byte, 16)) {
		m.ManifestID = n.w.id
	}
	if id := n.ModelID(); len(id) <= discovery.MaxModelName {
		m.ModelName = id
	}
}
