package node

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// The dashboard is three static files compiled into the binary: no CDN, no fonts, nothing
// fetched from outside the node, so it works on a swarm with no internet.
//
//go:embed web
var webFiles embed.FS

// dashboard serves the page and the JSON it polls.
type dashboard struct {
	n      *Node
	client *http.Client
}

// peerStatsTimeout bounds the wait for one peer's /strata/node: a slow or gone peer must not
// stall the page, which polls every second.
const peerStatsTimeout = 800 * time.Millisecond

func newDashboard(n *Node) *dashboard {
	return &dashboard{n: n, client: &http.Client{
		Timeout: peerStatsTimeout,
		// Peers' API addresses come from gossip: never follow a redirect somewhere else.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

func (d *dashboard) static() http.Handler {
	sub, err := fs.Sub(webFiles, "web")
	if err != nil {
		panic(fmt.Sprintf("dashboard: embedded files: %v", err)) // a build defect, not input
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// Everything the page loads or calls is this node's own: say so, so that nothing
		// injected into it (a model's output is shown as text, but still) can reach elsewhere.
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache") // a node upgrade must not leave a stale page behind
		files.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// serveNode answers GET /strata/node: this node's counters, for the dashboard of any node.
func (d *dashboard) serveNode(w http.ResponseWriter, r *http.Request) {
	st, err := d.n.Stats()
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// SwarmView is GET /strata/swarm: this node's view of the swarm (/health) and every reachable
// node's counters. Counters are totals; the page turns two polls into rates.
type SwarmView struct {
	TimeMs int64                 `json:"time_ms"`
	Health Health                `json:"health"`
	Nodes  map[string]*NodeStats `json:"nodes"`
	// Why a node's counters are missing, by peer ID (its API is unreachable from here, it
	// listens on loopback on another machine, it timed out).
	Unreachable map[string]string `json:"unreachable,omitempty"`
}

func (d *dashboard) serveSwarm(w http.ResponseWriter, r *http.Request) {
	v := SwarmView{TimeMs: time.Now().UnixMilli(), Health: d.n.Health(), Nodes: map[string]*NodeStats{}, Unreachable: map[string]string{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, p := range v.Health.Peers {
		wg.Go(func() {
			var st NodeStats
			var err error
			if p.Self {
				st, err = d.n.Stats()
			} else {
				st, err = d.peerStats(r.Context(), p)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				v.Unreachable[p.PeerID] = err.Error()
				return
			}
			v.Nodes[p.PeerID] = &st
		})
	}
	wg.Wait()
	writeJSON(w, http.StatusOK, v)
}

// peerStats fetches a peer's /strata/node.
func (d *dashboard) peerStats(ctx context.Context, p PeerHealth) (NodeStats, error) {
	var st NodeStats
	addr, err := peerAPIAddr(p)
	if err != nil {
		return st, err
	}
	if err := d.onPeersHost(ctx, p.PeerID, addr); err != nil {
		return st, err
	}
	get := func(path string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
		if err != nil {
			return nil, fmt.Errorf("peer stats: %w", err)
		}
		resp, err := d.client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("peer stats: %w", err)
		}
		return resp, nil
	}
	resp, err := get("/strata/node")
	if err != nil {
		return st, err
	}
	if resp.StatusCode == http.StatusNotFound {
		// A node from before the move to /strata/ serves its counters at /api/node.
		resp.Body.Close()
		if resp, err = get("/api/node"); err != nil {
			return st, err
		}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("peer stats: %s from %s", resp.Status, addr)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&st); err != nil {
		return st, fmt.Errorf("peer stats from %s: %w", addr, err)
	}
	// The address came from gossip: whatever answers there must be the peer we asked for.
	if st.PeerID != p.PeerID {
		return NodeStats{}, fmt.Errorf("peer stats: %s answers as %s, not %s", addr, st.PeerID, p.PeerID)
	}
	return st, nil
}

// peerAPIAddr is where this node can reach a peer's API. A peer listening on every interface
// announces 0.0.0.0 or ::, which is reached through the address it gossips from; one
// listening on loopback is reachable only from its own machine.
func peerAPIAddr(p PeerHealth) (string, error) {
	if p.API == "" {
		return "", errors.New("the node announces no API address")
	}
	host, port, err := net.SplitHostPort(p.API)
	if err != nil {
		return "", fmt.Errorf("API address %q: %w", p.API, err)
	}
	gossipHost, _, gerr := net.SplitHostPort(p.Gossip)
	gossipIP := net.ParseIP(gossipHost)
	ip := net.ParseIP(host)
	switch {
	case ip == nil:
		return "", fmt.Errorf("API address %q is not an IP address", p.API)
	case ip.IsUnspecified():
		if gerr != nil || gossipIP == nil || gossipIP.IsUnspecified() {
			return "", fmt.Errorf("API listens on %s and the node's gossip address %q says nothing better", p.API, p.Gossip)
		}
		return net.JoinHostPort(gossipHost, port), nil
	case ip.IsLoopback() && gossipIP != nil && !gossipIP.IsLoopback() && !gossipIP.IsUnspecified():
		return "", fmt.Errorf("API listens on %s, on its own machine only (start it with --api 0.0.0.0:PORT to show its counters here)", p.API)
	}
	return p.API, nil
}

// onPeersHost checks that addr, a peer's API address as gossip announced it, is on the host
// the peer's own libp2p connection comes from: without a swarm key any joined peer can
// announce any host:port, and this node would probe it on every dashboard poll. libp2p
// authenticates the peer ID at the connection's end, so its remote IP is the peer's.
func (d *dashboard) onPeersHost(ctx context.Context, peerID, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("API address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	id, err := peer.Decode(peerID)
	if err != nil || ip == nil {
		return fmt.Errorf("peer %q at %q: not checkable", peerID, addr)
	}
	var addrs []ma.Multiaddr
	for _, m := range d.n.peers() {
		if m.PeerID == id {
			addrs = m.Addrs
		}
	}
	h := d.n.host.Libp2p()
	if len(h.Network().ConnsToPeer(id)) == 0 {
		cctx, cancel := context.WithTimeout(ctx, peerStatsTimeout)
		err := d.n.host.Connect(cctx, peer.AddrInfo{ID: id, Addrs: addrs})
		cancel()
		if err != nil {
			return fmt.Errorf("no libp2p connection to check its API address against: %w", err)
		}
	}
	var seen []string
	for _, c := range h.Network().ConnsToPeer(id) {
		rip, err := manet.ToIP(c.RemoteMultiaddr())
		if err != nil {
			continue
		}
		if rip.Equal(ip) {
			return nil
		}
		seen = append(seen, rip.String())
	}
	return fmt.Errorf("API address %s is not on the peer's own host (its libp2p connections come from %v)", addr, seen)
}
