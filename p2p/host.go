// Package p2p is the wire between model slices: libp2p hosts (identity, private swarms,
// resource limits) and the stage protocol that streams activations along a chain of stages.
package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
)

// Host is a Strata node's libp2p host: TCP (and QUIC outside private swarms), Noise, yamux,
// explicit resource limits sized for multi-megabyte activations, and a connection manager
// that keeps pipeline neighbours connected.
type Host struct {
	h       host.Host
	cm      *connmgr.BasicConnMgr
	log     *slog.Logger
	cfg     hostConfig
	private bool

	mu      sync.Mutex
	stage   *stageServer
	weights *weightsCounters // weights.go
}

// Option configures New.
type Option func(*hostConfig)

type hostConfig struct {
	listen       []string
	identityFile string
	identity     crypto.PrivKey
	swarmKeyFile string
	logger       *slog.Logger
	dialTimeout  time.Duration
	connLow      int
	connHigh     int
	peerMemory   int64
	observer     Observer // stage traffic, for metrics (stage.go)

	latency linkEmulation // WithLatency (latency.go)
}

// WithListen sets the multiaddrs to listen on. Default: TCP and QUIC on every interface at
// random ports (TCP only with a swarm key).
func WithListen(addrs ...string) Option {
	return func(c *hostConfig) { c.listen = append(c.listen, addrs...) }
}

// WithIdentityFile keeps the node's key in path (created, mode 0600, if absent), so the
// peer ID is stable across restarts. Without it (or WithIdentity) each start gets a new ID.
func WithIdentityFile(path string) Option { return func(c *hostConfig) { c.identityFile = path } }

// WithIdentity uses k as the node's key.
func WithIdentity(k crypto.PrivKey) Option { return func(c *hostConfig) { c.identity = k } }

// WithSwarmKey makes the node part of the private swarm of the swarm.key file at path (see
// GenerateSwarmKey): it connects only to nodes with the same key. Private swarms are TCP
// only, because go-libp2p's QUIC transport does not support pre-shared keys.
func WithSwarmKey(path string) Option { return func(c *hostConfig) { c.swarmKeyFile = path } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *hostConfig) { c.logger = l } }

// WithDialTimeout bounds connecting to a peer (default 5 s). A node outside a private swarm
// dialling into it is not refused, it hangs in the handshake: this timeout is what ends it.
func WithDialTimeout(d time.Duration) Option { return func(c *hostConfig) { c.dialTimeout = d } }

// WithConnLimits sets the connection manager's watermarks (default 160/192): above high it
// trims to low, never closing a protected pipeline neighbour.
func WithConnLimits(low, high int) Option {
	return func(c *hostConfig) { c.connLow, c.connHigh = low, high }
}

// WithPeerMemory sets how much memory (yamux receive windows and stage streams) one peer may
// hold on this node (default 1 GiB).
func WithPeerMemory(bytes int64) Option { return func(c *hostConfig) { c.peerMemory = bytes } }

// New starts a libp2p host.
func New(ctx context.Context, opts ...Option) (*Host, error) {
	cfg := hostConfig{
		logger:      slog.Default(),
		dialTimeout: 5 * time.Second,
		connLow:     160,
		connHigh:    192,
		peerMemory:  1 << 30,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := cfg.latency.validate(); err != nil {
		return nil, err
	}
	if cfg.dialTimeout <= 0 {
		return nil, fmt.Errorf("dial timeout must be positive, got %s", cfg.dialTimeout)
	}
	key := cfg.identity
	if key == nil && cfg.identityFile != "" {
		var err error
		if key, err = LoadOrCreateIdentity(cfg.identityFile); err != nil {
			return nil, err
		}
	}
	var psk pnet.PSK
	if cfg.swarmKeyFile != "" {
		var err error
		if psk, err = LoadSwarmKey(cfg.swarmKeyFile); err != nil {
			return nil, err
		}
	}
	listen := cfg.listen
	if len(listen) == 0 {
		listen = []string{"/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"}
		if psk == nil {
			listen = append(listen, "/ip4/0.0.0.0/udp/0/quic-v1", "/ip6/::/udp/0/quic-v1")
		}
	}
	addrs := make([]ma.Multiaddr, 0, len(listen))
	for _, s := range listen {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: %w", s, err)
		}
		if psk != nil && isQUIC(a) {
			return nil, fmt.Errorf("listen address %s: QUIC cannot be used with a swarm key (go-libp2p's QUIC has no pre-shared key support); listen on TCP only", s)
		}
		addrs = append(addrs, a)
	}

	rm, err := newResourceManager(cfg.peerMemory)
	if err != nil {
		return nil, err
	}
	cm, err := connmgr.NewConnManager(cfg.connLow, cfg.connHigh, connmgr.WithGracePeriod(time.Minute))
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("connection manager: %w", err)
	}
	lopts := []libp2p.Option{
		libp2p.ListenAddrs(addrs...),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		libp2p.WithDialTimeout(cfg.dialTimeout),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
	}
	if psk != nil {
		lopts = append(lopts, libp2p.PrivateNetwork(psk))
	} else {
		lopts = append(lopts, libp2p.Transport(quic.NewTransport))
	}
	if key != nil {
		lopts = append(lopts, libp2p.Identity(key))
	}
	h, err := libp2p.New(lopts...)
	if err != nil {
		rm.Close()
		cm.Close()
		return nil, fmt.Errorf("start libp2p host: %w", err)
	}
	var lh host.Host = h
	if cfg.latency.active() {
		lh = newLatencyHost(h, cfg.latency)
	}
	hh := &Host{h: lh, cm: cm, log: cfg.logger.With("peer", shortID(h.ID())), cfg: cfg, private: psk != nil}
	hh.log.Debug("host started", "addrs", hh.Addrs(), "private", hh.private)
	return hh, nil
}

// newResourceManager is libp2p's autoscaled limits with room for pipeline traffic. The
// defaults are sized for many small DHT-style streams: 16 MiB per protocol per peer and
// ~460 MB per peer on a 24 GB machine. One prefill step of 512 tokens x 8192 hidden is
// 16 MiB in f32, and a neighbour in a pipeline carries every session's activations over one
// connection, whose yamux windows (up to 16 MiB per stream) are charged to the peer. So:
//   - peer memory defaults to 1 GiB (WithPeerMemory), the stage protocol may use all of it;
//   - the stage protocol gets 1024 streams per peer each way (one stream per session per hop);
//   - the protocol as a whole gets 4 GiB and 8192 streams, below the system limits;
//   - private networks are exempt from libp2p's 8 connections per IPv4 address: a lab's nodes
//     behind one NAT, or containers sharing a host's address, would otherwise be reset. Public
//     addresses keep the limit (loopback is exempt already, which is why tests never hit it).
func newResourceManager(peerMemory int64) (network.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	limits.AddProtocolLimit(StageProtocol,
		rcmgr.BaseLimit{StreamsInbound: 4096, StreamsOutbound: 4096, Streams: 8192, Memory: 4 << 30},
		rcmgr.BaseLimitIncrease{})
	limits.AddProtocolPeerLimit(StageProtocol,
		rcmgr.BaseLimit{StreamsInbound: 1024, StreamsOutbound: 1024, Streams: 2048, Memory: peerMemory},
		rcmgr.BaseLimitIncrease{})
	addWeightsLimits(&limits)
	scaled := limits.AutoScale()
	partial := rcmgr.PartialLimitConfig{
		PeerDefault: rcmgr.ResourceLimits{Memory: rcmgr.LimitVal64(peerMemory)},
	}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(partial.Build(scaled)), rcmgr.WithMetricsDisabled(),
		rcmgr.WithNetworkPrefixLimit(privateNetworks()))
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	return rm, nil
}

// privateNetworks are the LAN and NAT ranges whose shared addresses may carry many nodes'
// connections.
func privateNetworks() (v4, v6 []rcmgr.NetworkPrefixLimit) {
	v4 = []rcmgr.NetworkPrefixLimit{
		{Network: netip.MustParsePrefix("10.0.0.0/8"), ConnCount: 4096},
		{Network: netip.MustParsePrefix("172.16.0.0/12"), ConnCount: 4096},
		{Network: netip.MustParsePrefix("192.168.0.0/16"), ConnCount: 4096},
		{Network: netip.MustParsePrefix("100.64.0.0/10"), ConnCount: 4096}, // carrier-grade NAT, Tailscale
	}
	v6 = []rcmgr.NetworkPrefixLimit{
		{Network: netip.MustParsePrefix("fc00::/7"), ConnCount: 4096},
		{Network: netip.MustParsePrefix("fe80::/10"), ConnCount: 4096},
	}
	return v4, v6
}

func isQUIC(a ma.Multiaddr) bool {
	for _, c := range a {
		if c.Protocol().Code == ma.P_QUIC || c.Protocol().Code == ma.P_QUIC_V1 {
			return true
		}
	}
	return false
}

// ID is the node's peer ID.
func (h *Host) ID() peer.ID { return h.h.ID() }

// Libp2p is the underlying host, for discovery and routing built on top of it.
func (h *Host) Libp2p() host.Host { return h.h }

// Private reports whether the host runs in a private swarm (a swarm key).
func (h *Host) Private() bool { return h.private }

// Addrs returns the node's full multiaddrs, each ending in /p2p/<ID>, as other nodes dial
// them. Unspecified listen addresses (0.0.0.0) are expanded to the interface addresses.
func (h *Host) Addrs() []ma.Multiaddr {
	addrs, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: h.h.ID(), Addrs: h.h.Addrs()})
	if err != nil {
		return nil // only for an empty ID, which a running host never has
	}
	return addrs
}

// AddrInfo is the node's ID and listen addresses.
func (h *Host) AddrInfo() peer.AddrInfo { return peer.AddrInfo{ID: h.h.ID(), Addrs: h.h.Addrs()} }

// ErrRefused is wrapped by Connect's errors when the peer was reached but the handshake
// failed, which in practice is a swarm key mismatch.
var ErrRefused = errors.New("connection refused in handshake")

// Connect dials a peer, bounded by the dial timeout.
func (h *Host) Connect(ctx context.Context, ai peer.AddrInfo) error {
	if ai.ID == h.h.ID() {
		return nil
	}
	if h.h.Network().Connectedness(ai.ID) == network.Connected {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, h.cfg.dialTimeout)
	defer cancel()
	err := h.h.Connect(ctx, ai)
	if err == nil {
		return nil
	}
	if handshakeFailure(err) || ctx.Err() != nil && reachable(ai) {
		return fmt.Errorf("connect to %s: %w: swarm key mismatch or peer is in a private swarm (%s): %w", shortID(ai.ID), ErrRefused, h.swarmHint(), err)
	}
	return fmt.Errorf("connect to %s: %w", shortID(ai.ID), err)
}

func (h *Host) swarmHint() string {
	if h.private {
		return "this node has a swarm key"
	}
	return "this node has no swarm key"
}

// handshakeFailure recognizes a connection that was made and then dropped while upgrading:
// a different swarm key breaks the first encrypted bytes; a node without a key talks to a
// keyed node in plaintext, which the other side cannot decrypt.
func handshakeFailure(err error) bool {
	s := err.Error()
	for _, sub := range []string{"failed to negotiate security protocol", "failed to negotiate stream multiplexer", "privnet"} {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// reachable reports whether some TCP address of ai accepts connections: a dial that timed
// out although the port answers was stuck in the handshake, not in the network.
func reachable(ai peer.AddrInfo) bool {
	for _, a := range ai.Addrs {
		network, addr, err := tcpAddr(a)
		if err != nil {
			continue
		}
		c, err := net.DialTimeout(network, addr, 500*time.Millisecond)
		if err == nil {
			c.Close()
			return true
		}
	}
	return false
}

func tcpAddr(a ma.Multiaddr) (string, string, error) {
	var ip, port string
	netw := "tcp4"
	for _, c := range a {
		switch c.Protocol().Code {
		case ma.P_IP4:
			ip = c.Value()
		case ma.P_IP6:
			ip, netw = c.Value(), "tcp6"
		case ma.P_TCP:
			port = c.Value()
		}
	}
	if ip == "" || port == "" {
		return "", "", errors.New("not an IP/TCP address")
	}
	return netw, net.JoinHostPort(ip, port), nil
}

// Protect keeps the connection to id open while any tag holds it (pipeline neighbours).
func (h *Host) Protect(id peer.ID, tag string) { h.cm.Protect(id, tag) }

// Unprotect drops one tag's hold on id.
func (h *Host) Unprotect(id peer.ID, tag string) bool { return h.cm.Unprotect(id, tag) }

// Close stops serving and closes every connection.
func (h *Host) Close() error {
	h.mu.Lock()
	srv := h.stage
	h.mu.Unlock()
	if srv != nil {
		srv.stop()
	}
	err := h.h.Close() // resets every stream; closes the connection and resource managers too
	if srv != nil {
		srv.wg.Wait()
	}
	return err
}

func shortID(id peer.ID) string {
	s := id.String()
	if len(s) > 12 {
		return s[len(s)-8:]
	}
	return s
}
