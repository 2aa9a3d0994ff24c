// Package discovery finds the nodes of a Strata swarm and keeps track of which are alive
// and what each one serves.
//
// Membership runs hashicorp/memberlist on its own UDP+TCP port beside libp2p rather than
// over libp2p streams. A memberlist transport over libp2p works (it was built and detected
// a kill as fast as UDP) but needs a NodeAwareTransport that fakes UDP packets and IP:port
// addresses, and it puts failure-detector probes on the same yamux connection as multi-MB
// activation frames: a probe stuck behind a 4 MB frame looks like a dead node, so busy
// pipelines would suspect healthy neighbours. A separate port keeps probes independent of
// pipeline traffic; SecretKey encrypts it as the swarm key encrypts libp2p.
//
// libp2p remains the way in: a node reachable at a libp2p multiaddr answers the
// /strata/members/1.0.0 protocol with its memberlist address, so Join accepts the same
// addresses as `--join`, and peers found by mDNS join the same way.
package discovery

import (
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"
	"github.com/libp2p/go-libp2p/core/host"
)

// EventKind says what happened to a member.
type EventKind uint8

const (
	EventJoin   EventKind = iota // a node joined (or this node started)
	EventLeave                   // a node left or was declared dead
	EventUpdate                  // a node changed its metadata
)

func (k EventKind) String() string {
	switch k {
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	case EventUpdate:
		return "update"
	}
	return fmt.Sprintf("event(%d)", uint8(k))
}

// Event is a change in membership.
type Event struct {
	Kind   EventKind
	Member NodeMeta
}

// eventBuffer is how many events wait for a slow consumer before new ones are dropped.
const eventBuffer = 1024

// Membership is this node's view of the swarm.
type Membership struct {
	log     *slog.Logger
	ml      *memberlist.Memberlist
	host    host.Host // nil without WithHost
	mdns    io.Closer // nil when mDNS is off or failed to start
	mdnsErr error     // why mDNS is not running, when it was wanted

	ctx    context.Context // cancelled by Shutdown; bounds background joins
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	meta    NodeMeta
	encoded []byte
	events  chan Event
	dropped int
	closed  bool
	joining map[string]bool // peers being joined after an mDNS find
	// view is the members as the event delegate last saw them. memberlist hands its delegate
	// node structs under its own lock, and changes them later without it: reading them at any
	// other time races, so Members answers from this copy.
	view map[string]NodeMeta
}

type config struct {
	bindHost      string
	bindPort      int
	advertiseHost string
	advertisePort int
	name          string
	secretKey     []byte
	log           *slog.Logger
	meta          NodeMeta
	tune          []func(*memberlist.Config)
	host          host.Host
	mdns          bool
	mdnsService   string
}

// Option configures New.
type Option func(*config) error

// WithBindAddr sets the address memberlist listens on, UDP and TCP; port 0 picks a free
// port. The default is 0.0.0.0 and port 0.
func WithBindAddr(host string, port int) Option {
	return func(c *config) error {
		if net.ParseIP(host) == nil {
			return fmt.Errorf("bind address %q is not an IP address", host)
		}
		if port < 0 || port > 65535 {
			return fmt.Errorf("bind port %d out of range", port)
		}
		c.bindHost, c.bindPort = host, port
		return nil
	}
}

// WithAdvertiseAddr sets the address other nodes use to reach this one, when it differs
// from the bound one (NAT, containers). Port 0 means the bound port.
func WithAdvertiseAddr(host string, port int) Option {
	return func(c *config) error {
		if net.ParseIP(host) == nil {
			return fmt.Errorf("advertise address %q is not an IP address", host)
		}
		if port < 0 || port > 65535 {
			return fmt.Errorf("advertise port %d out of range", port)
		}
		c.advertiseHost, c.advertisePort = host, port
		return nil
	}
}

// WithName sets the memberlist node name, which must be unique in the swarm. The default
// is the metadata's peer ID, or a random name without one.
func WithName(name string) Option {
	return func(c *config) error {
		if name == "" {
			return errors.New("empty node name")
		}
		c.name = name
		return nil
	}
}

// WithSecretKey encrypts and authenticates gossip with AES-GCM. The key must be 16, 24 or
// 32 bytes; DeriveSecretKey turns a swarm key into one.
func WithSecretKey(key []byte) Option {
	return func(c *config) error {
		switch len(key) {
		case 16, 24, 32:
		default:
			return fmt.Errorf("gossip secret key of %d bytes, want 16, 24 or 32", len(key))
		}
		c.secretKey = slices.Clone(key)
		return nil
	}
}

// DeriveSecretKey derives a 32-byte gossip key from a swarm key, so a private swarm's
// membership traffic is encrypted with a key distinct from the one its libp2p PSK uses.
func DeriveSecretKey(swarmKey []byte) ([]byte, error) {
	if len(swarmKey) == 0 {
		return nil, errors.New("derive gossip key: empty swarm key")
	}
	k, err := hkdf.Key(sha256.New, swarmKey, nil, "strata memberlist gossip v1", 32)
	if err != nil {
		return nil, fmt.Errorf("derive gossip key: %w", err)
	}
	return k, nil
}

// WithLogger sets the logger; memberlist's own log lines go to it too.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.log = l
		return nil
	}
}

// WithMeta sets the metadata announced at start; UpdateMeta changes it later.
func WithMeta(m NodeMeta) Option {
	return func(c *config) error {
		if _, err := m.Encode(); err != nil {
			return err
		}
		c.meta = m
		return nil
	}
}

// WithConfig adjusts the memberlist configuration after Strata's tuning, e.g. to make
// failure detection less eager on a loaded WAN.
func WithConfig(f func(*memberlist.Config)) Option {
	return func(c *config) error {
		if f == nil {
			return errors.New("nil memberlist config function")
		}
		c.tune = append(c.tune, f)
		return nil
	}
}

// WithHost lets Join take libp2p multiaddrs and makes this node answer the
// /strata/members/1.0.0 protocol on h. It also starts mDNS discovery unless WithoutMDNS.
func WithHost(h host.Host) Option {
	return func(c *config) error {
		if h == nil {
			return errors.New("nil libp2p host")
		}
		c.host = h
		return nil
	}
}

// WithoutMDNS turns off local-network discovery.
func WithoutMDNS() Option {
	return func(c *config) error {
		c.mdns = false
		return nil
	}
}

// WithMDNSService sets the mDNS service name; nodes only find others with the same one.
func WithMDNSService(name string) Option {
	return func(c *config) error {
		if name == "" {
			return errors.New("empty mDNS service name")
		}
		c.mdnsService = name
		return nil
	}
}

// tune sets memberlist for fast failure detection on a LAN. Measured on loopback (2 cores,
// under build load): a node killed without Leave is declared dead after 0.74-0.76 s with
// these settings, against 6.9 s with DefaultLANConfig and 4.3 s with DefaultLocalConfig; a
// graceful Leave is seen in ~100 ms. Probes every 200 ms to one node cost a few packets per
// second per node. A short ProbeTimeout risks suspecting a node whose CPU is saturated by
// compute; suspicion is refuted by the node itself when it answers, and WithConfig can relax
// it for slow links.
func tune(c *memberlist.Config) {
	c.ProbeInterval = 200 * time.Millisecond
	c.ProbeTimeout = 100 * time.Millisecond
	c.SuspicionMult = 2
	c.SuspicionMaxTimeoutMult = 2
	c.GossipInterval = 50 * time.Millisecond
	c.PushPullInterval = 5 * time.Second
	c.TCPTimeout = 2 * time.Second
	// A node that restarts with the same peer ID but a new port may take its name back
	// soon after it was declared dead, instead of being refused as a conflict.
	c.DeadNodeReclaimTime = 2 * time.Second
}

// New starts this node's membership: it binds memberlist's port, announces meta and, with
// WithHost, answers the members protocol and starts mDNS. It joins no one yet: see Join.
// ctx bounds start-up only; Shutdown stops everything.
func New(ctx context.Context, opts ...Option) (*Membership, error) {
	c := config{bindHost: "0.0.0.0", log: slog.Default(), mdns: true, mdnsService: "strata"}
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, fmt.Errorf("discovery: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	encoded, err := c.meta.Encode()
	if err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	name := c.name
	if name == "" && c.meta.PeerID != "" {
		name = c.meta.PeerID.String()
	}
	if name == "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		name = "strata-" + hex.EncodeToString(b[:])
	}

	bg, cancel := context.WithCancel(context.Background())
	m := &Membership{
		log:     c.log.With("component", "discovery"),
		host:    c.host,
		ctx:     bg,
		cancel:  cancel,
		meta:    c.meta,
		encoded: encoded,
		events:  make(chan Event, eventBuffer),
		joining: make(map[string]bool),
	}

	mc := memberlist.DefaultLANConfig()
	tune(mc)
	mc.Name = name
	mc.BindAddr, mc.BindPort = c.bindHost, c.bindPort
	mc.AdvertiseAddr, mc.AdvertisePort = c.advertiseHost, c.advertisePort
	if mc.AdvertiseAddr == "" && net.ParseIP(c.bindHost).IsUnspecified() {
		// memberlist refuses to start on 0.0.0.0 when the machine has no private address
		// (a public-IP-only server, a loopback-only namespace); pick what exists instead.
		mc.AdvertiseAddr = fallbackAdvertise()
	}
	if mc.AdvertisePort == 0 {
		mc.AdvertisePort = mc.BindPort
	}
	mc.SecretKey = c.secretKey
	mc.Logger = log.New(slogWriter{m.log.With("component", "memberlist")}, "", 0)
	mc.Delegate = (*delegate)(m)
	mc.Events = (*events)(m)
	for _, f := range c.tune {
		f(mc)
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("discovery: start memberlist on %s: %w",
			net.JoinHostPort(c.bindHost, strconv.Itoa(c.bindPort)), err)
	}
	m.ml = ml
	if m.host != nil {
		m.host.SetStreamHandler(MembersProtocol, m.serveMembers)
		if c.mdns {
			m.startMDNS(c.mdnsService)
		}
	}
	m.log.Info("membership started", "name", name, "addr", m.LocalAddr(), "encrypted", len(c.secretKey) > 0)
	return m, nil
}

// fallbackAdvertise returns "" when memberlist can find a private address itself, else the
// first global unicast address, else loopback.
func fallbackAdvertise() string {
	if ip, err := sockaddr.GetPrivateIP(); err == nil && ip != "" {
		return ""
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && n.IP.IsGlobalUnicast() {
				return n.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

// Name is this node's memberlist name.
func (m *Membership) Name() string { return m.ml.LocalNode().Name }

// LocalAddr is the host:port other nodes reach this node's memberlist at.
func (m *Membership) LocalAddr() string {
	n := m.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Meta returns the metadata this node announces.
func (m *Membership) Meta() NodeMeta {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.meta
}

// Join contacts existing members and merges their view. An address is a memberlist
// host:port, or a libp2p multiaddr with a /p2p/ peer ID (needs WithHost), which is dialled
// to ask for the node's memberlist address. It returns how many addresses led to a member;
// the error lists every address that failed, and is nil when at least one succeeded.
func (m *Membership) Join(ctx context.Context, addrs []string) (int, error) {
	if len(addrs) == 0 {
		return 0, errors.New("join: no addresses")
	}
	joined := 0
	var errs []error
	for _, a := range addrs {
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("join %s: %w", a, err))
			break
		}
		alts := []string{a}
		if strings.HasPrefix(a, "/") {
			var err error
			if alts, err = m.resolveMultiaddr(ctx, a); err != nil {
				errs = append(errs, fmt.Errorf("join %s: %w", a, err))
				continue
			}
		} else if _, _, err := net.SplitHostPort(a); err != nil {
			errs = append(errs, fmt.Errorf("join %q: neither host:port nor a multiaddr: %w", a, err))
			continue
		}
		// Alternatives are one node's addresses, best first: stop at the first that answers.
		for _, alt := range alts {
			if _, err := m.ml.Join([]string{alt}); err != nil {
				if alt != a {
					err = fmt.Errorf("at %s: %w", alt, err)
				}
				errs = append(errs, fmt.Errorf("join %s: %w", a, err))
				continue
			}
			joined++
			break
		}
	}
	if joined == 0 {
		return 0, errors.Join(errs...)
	}
	if len(errs) > 0 {
		m.log.Warn("some join addresses failed", "joined", joined, "err", errors.Join(errs...))
	}
	return joined, nil
}

// Members returns the live members (alive or suspected), this node included, sorted by
// name. A member whose metadata does not decode is listed with only Name and Addr.
func (m *Membership) Members() []NodeMeta {
	self := m.Name()
	m.mu.Lock()
	out := make([]NodeMeta, 0, len(m.view)+1)
	for name, meta := range m.view {
		if name != self {
			out = append(out, meta)
		}
	}
	me := m.meta
	m.mu.Unlock()
	me.Name, me.Addr = self, m.LocalAddr()
	out = append(out, me)
	slices.SortFunc(out, func(a, b NodeMeta) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (m *Membership) decode(n *memberlist.Node) NodeMeta {
	meta, err := DecodeNodeMeta(n.Meta)
	if err != nil {
		m.log.Debug("undecodable member metadata", "member", n.Name, "err", err)
		meta = NodeMeta{}
	}
	meta.Name = n.Name
	meta.Addr = n.Address()
	return meta
}

// UpdateMeta replaces this node's metadata and gossips it, waiting up to timeout for the
// broadcast to go out. Metadata too large for memberlist is refused with ErrMetaTooLarge
// and the old metadata stays.
func (m *Membership) UpdateMeta(meta NodeMeta, timeout time.Duration) error {
	b, err := meta.Encode()
	if err != nil {
		return fmt.Errorf("update metadata: %w", err)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return errors.New("update metadata: membership shut down")
	}
	m.meta, m.encoded = meta, b
	m.mu.Unlock()
	// Not under m.mu: memberlist calls NodeMeta from inside UpdateNode.
	if err := m.ml.UpdateNode(timeout); err != nil {
		return fmt.Errorf("update metadata: %w", err)
	}
	return nil
}

// Events delivers membership changes in order. If the consumer falls more than 1024 events
// behind, newer events are dropped (and logged); Members is always authoritative. The
// channel is closed by Shutdown.
func (m *Membership) Events() <-chan Event { return m.events }

// Leave tells the swarm this node is going and waits up to timeout for that to spread. The
// node stops gossiping; call Shutdown afterwards.
func (m *Membership) Leave(timeout time.Duration) error {
	if err := m.ml.Leave(timeout); err != nil {
		return fmt.Errorf("leave: %w", err)
	}
	return nil
}

// Shutdown stops the membership without telling anyone: the others see this node fail.
// Call Leave first for a graceful exit.
func (m *Membership) Shutdown() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()

	m.cancel()
	if m.host != nil {
		m.host.RemoveStreamHandler(MembersProtocol)
	}
	if m.mdns != nil {
		_ = m.mdns.Close()
	}
	err := m.ml.Shutdown()
	m.wg.Wait()

	m.mu.Lock()
	close(m.events)
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("shutdown memberlist: %w", err)
	}
	return nil
}

// emit queues an event without ever blocking memberlist.
func (m *Membership) emit(kind EventKind, n *memberlist.Node) {
	e := Event{Kind: kind, Member: m.decode(n)}
	switch kind {
	case EventJoin:
		m.log.Info("member joined", "member", e.Member.Name, "addr", e.Member.Addr)
	case EventLeave:
		// memberlist tells a Leave from a failure only in state it hands no delegate; the
		// state the member last announced says whether it drained first.
		m.log.Info("member gone", "member", e.Member.Name, "addr", e.Member.Addr, "last_state", e.Member.State.String())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.view == nil {
		m.view = make(map[string]NodeMeta)
	}
	if kind == EventLeave {
		delete(m.view, e.Member.Name)
	} else {
		m.view[e.Member.Name] = e.Member
	}
	if m.closed {
		return
	}
	select {
	case m.events <- e:
	default:
		m.dropped++
		if m.dropped == 1 || m.dropped%1000 == 0 {
			m.log.Warn("membership events dropped: consumer too slow", "dropped", m.dropped)
		}
	}
}

// delegate gives memberlist this node's metadata; the rest of memberlist.Delegate is unused.
type delegate Membership

func (d *delegate) NodeMeta(limit int) []byte {
	m := (*Membership)(d)
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.encoded) > limit {
		// Unreachable: Encode checks MaxMetaSize. Better no metadata than memberlist's panic.
		return nil
	}
	return m.encoded
}

func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

// events turns memberlist's callbacks into Events.
type events Membership

func (e *events) NotifyJoin(n *memberlist.Node)   { (*Membership)(e).emit(EventJoin, n) }
func (e *events) NotifyLeave(n *memberlist.Node)  { (*Membership)(e).emit(EventLeave, n) }
func (e *events) NotifyUpdate(n *memberlist.Node) { (*Membership)(e).emit(EventUpdate, n) }

// slogWriter carries memberlist's log lines ("[LEVEL] memberlist: text") into slog.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := slog.LevelInfo
	for _, l := range []struct {
		prefix string
		level  slog.Level
	}{
		{"[DEBUG]", slog.LevelDebug},
		{"[INFO]", slog.LevelInfo},
		{"[WARN]", slog.LevelWarn},
		// memberlist logs every failed probe or push/pull as an error; in a swarm where
		// nodes come and go these are expected, so they are warnings here.
		{"[ERR]", slog.LevelWarn},
	} {
		if rest, ok := strings.CutPrefix(msg, l.prefix); ok {
			level, msg = l.level, strings.TrimSpace(rest)
			break
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	// Expected, not worth a user's attention: a loaded node refuting that it is suspect (it
	// answered late and says it is alive), and the listeners closing at shutdown.
	if strings.HasPrefix(msg, "Refuting a suspect message") || strings.Contains(msg, "use of closed network connection") {
		level = slog.LevelDebug
	}
	w.log.Log(context.Background(), level, msg)
	return len(p), nil
}
