package discovery

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/vmihailenco/msgpack/v5"
)

var quiet = slog.New(slog.DiscardHandler)

func newPeerID(t *testing.T) peer.ID {
	t.Helper()
	priv, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func testMeta(t *testing.T, start, end int) NodeMeta {
	t.Helper()
	return NodeMeta{
		PeerID:      newPeerID(t),
		Addrs:       []ma.Multiaddr{ma.StringCast("/ip4/192.168.1.20/tcp/4001"), ma.StringCast("/ip4/192.168.1.20/udp/4001/quic-v1")},
		ModelSHA256: sha256.Sum256([]byte("model")),
		LayerStart:  start,
		LayerEnd:    end,
		State:       StateServing,
		MemoryBytes: 12 << 30,
		FreeRAM:     20 << 30,
		MsPerLayer:  1.25,
		APIAddr:     "192.168.1.20:8080",
	}
}

// newMember starts a membership on loopback that is shut down when the test ends.
func newMember(t *testing.T, opts ...Option) *Membership {
	t.Helper()
	opts = append([]Option{WithBindAddr("127.0.0.1", 0), WithLogger(quiet)}, opts...)
	m, err := New(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Shutdown() })
	return m
}

func newHost(t *testing.T, listen string) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings(listen))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// waitFor polls cond until it holds and returns how long that took. limit is what an idle
// machine needs: past it the wait is logged, and only ten times that (30 s at least) fails,
// as a hang guard, since gossip and probes slow down with a loaded machine.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	guard := max(10*limit, 30*time.Second)
	for !cond() {
		if time.Since(start) > guard {
			t.Fatalf("%s: not after %v", what, guard)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if took := time.Since(start); took > limit {
		t.Logf("%s took %v, over the %v an idle machine needs", what, took, limit)
	}
	return time.Since(start)
}

func memberNames(m *Membership) []string {
	var names []string
	for _, n := range m.Members() {
		names = append(names, n.Name)
	}
	return names
}

func find(m *Membership, name string) (NodeMeta, bool) {
	for _, n := range m.Members() {
		if n.Name == name {
			return n, true
		}
	}
	return NodeMeta{}, false
}

func TestMetaRoundTrip(t *testing.T) {
	meta := testMeta(t, 4, 12)
	meta.Chain, meta.FreeGPU, meta.Sessions = 1, 8<<30, 3
	copy(meta.ManifestID[:], "manifest id 16 b")
	meta.ModelName = "llama3.3:70b-instruct-q4_K_M"
	for i := range 4 { // six addresses in all, as a dual-stack TCP+QUIC node has
		meta.Addrs = append(meta.Addrs, ma.StringCast(fmt.Sprintf("/ip6/fe80::%d/tcp/4001", i+1)))
	}
	b, err := meta.Encode()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("metadata with 6 addresses and a %d-byte model name encodes to %d bytes (memberlist limit %d)", len(meta.ModelName), len(b), MaxMetaSize)
	if len(b) > 340 {
		t.Errorf("metadata of %d bytes leaves little room under %d", len(b), MaxMetaSize)
	}
	got, err := DecodeNodeMeta(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, meta) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, meta)
	}
	empty, err := NodeMeta{}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeNodeMeta(empty); err != nil || !reflect.DeepEqual(got, NodeMeta{}) {
		t.Fatalf("empty metadata round trip: %+v %v", got, err)
	}
}

func TestMetaBadInput(t *testing.T) {
	big := testMeta(t, 0, 1)
	big.APIAddr = strings.Repeat("x", 600)
	if _, err := big.Encode(); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("600-byte API address: err = %v, want ErrMetaTooLarge", err)
	}
	many := testMeta(t, 0, 1)
	for i := range 40 {
		many.Addrs = append(many.Addrs, ma.StringCast(fmt.Sprintf("/ip6/2001:db8::%x/udp/4001/quic-v1", i+1)))
	}
	if _, err := many.Encode(); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("42 addresses: err = %v, want ErrMetaTooLarge", err)
	}
	if _, err := (NodeMeta{LayerStart: 5, LayerEnd: 2}).Encode(); err == nil {
		t.Fatal("reversed range encoded")
	}
	for name, b := range map[string][]byte{
		"garbage":    []byte{0xc1, 0xff, 0x00},
		"short hash": mustMarshal(t, wireMeta{Model: []byte{1, 2, 3}}),
		"bad peer":   mustMarshal(t, wireMeta{Peer: []byte{0xff, 0xff}}),
		"bad addr":   mustMarshal(t, wireMeta{Addrs: [][]byte{{0xff, 0xff, 0xff}}}),
	} {
		if _, err := DecodeNodeMeta(b); err == nil {
			t.Errorf("%s decoded without error", name)
		}
	}
}

func mustMarshal(t *testing.T, w wireMeta) []byte {
	t.Helper()
	b, err := msgpack.Marshal(&w)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOversizedMetaIsAnError checks that metadata memberlist would panic on is refused
// with an error at start and on update, leaving the old metadata in place.
func TestOversizedMetaIsAnError(t *testing.T) {
	big := testMeta(t, 0, 1)
	big.APIAddr = strings.Repeat("x", 600)
	if _, err := New(context.Background(), WithBindAddr("127.0.0.1", 0), WithLogger(quiet), WithMeta(big)); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("New with big metadata: err = %v", err)
	}
	a, b := newMember(t), newMember(t)
	if _, err := b.Join(context.Background(), []string{a.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
	old := testMeta(t, 0, 4)
	if err := a.UpdateMeta(old, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := a.UpdateMeta(big, time.Second); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("UpdateMeta with big metadata: err = %v", err)
	}
	if got := a.Meta(); !reflect.DeepEqual(got, old) {
		t.Fatalf("metadata changed after a refused update: %+v", got)
	}
}

// TestThreeMembers joins three nodes, checks each sees the others' metadata, that an update
// spreads, and that a node stopped without Leave (as by kill -9) is declared gone quickly.
func TestThreeMembers(t *testing.T) {
	ctx := context.Background()
	metas := []NodeMeta{testMeta(t, 0, 10), testMeta(t, 10, 20), testMeta(t, 20, 32)}
	var ms []*Membership
	for _, meta := range metas {
		ms = append(ms, newMember(t, WithMeta(meta)))
	}
	a, b, c := ms[0], ms[1], ms[2]
	if a.Name() != metas[0].PeerID.String() {
		t.Fatalf("default name %q, want the peer ID", a.Name())
	}
	if n, err := b.Join(ctx, []string{a.LocalAddr()}); err != nil || n != 1 {
		t.Fatalf("b joins a: %d %v", n, err)
	}
	if n, err := c.Join(ctx, []string{b.LocalAddr()}); err != nil || n != 1 {
		t.Fatalf("c joins b: %d %v", n, err)
	}
	took := waitFor(t, 5*time.Second, "all see three members", func() bool {
		return len(a.Members()) == 3 && len(b.Members()) == 3 && len(c.Members()) == 3
	})
	t.Logf("three members converged in %v", took)
	for _, m := range ms {
		for i, want := range metas {
			got, ok := find(m, ms[i].Name())
			if !ok {
				t.Fatalf("%s does not list %s", m.Name(), ms[i].Name())
			}
			if got.Addr != ms[i].LocalAddr() {
				t.Errorf("%s lists %s at %s, want %s", m.Name(), got.Name, got.Addr, ms[i].LocalAddr())
			}
			got.Name, got.Addr = "", ""
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s sees %s as %+v, want %+v", m.Name(), ms[i].Name(), got, want)
			}
		}
	}
	// a saw itself start and the other two join.
	joined := map[string]bool{}
	for len(joined) < 3 {
		select {
		case e := <-a.Events():
			if e.Kind == EventJoin {
				joined[e.Member.Name] = true
			}
		case <-time.After(30 * time.Second): // a hang guard: the state above already holds
			t.Fatalf("a's join events: %v", joined)
		}
	}

	// An update spreads.
	upd := metas[0]
	upd.LayerStart, upd.LayerEnd, upd.State, upd.Sessions = 0, 12, StateDraining, 7
	start := time.Now()
	if err := a.UpdateMeta(upd, time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "update reaches b and c", func() bool {
		gb, _ := find(b, a.Name())
		gc, _ := find(c, a.Name())
		return gb.LayerEnd == 12 && gc.LayerEnd == 12 && gb.State == StateDraining && gc.Sessions == 7
	})
	t.Logf("metadata update seen by both others in %v", time.Since(start))
	sawUpdate := false
	for !sawUpdate {
		select {
		case e := <-b.Events():
			sawUpdate = e.Kind == EventUpdate && e.Member.Name == a.Name() && e.Member.LayerEnd == 12
		case <-time.After(30 * time.Second): // a hang guard: the state above already holds
			t.Fatal("b got no update event for a")
		}
	}

	// c stops without Leave, as a killed process would.
	start = time.Now()
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	gone := func(m *Membership) bool { _, ok := find(m, c.Name()); return !ok }
	took = waitFor(t, 5*time.Second, "a and b drop the crashed node", func() bool { return gone(a) && gone(b) })
	t.Logf("node stopped without Leave declared gone by both others in %v", took)
	for {
		select {
		case e := <-a.Events():
			if e.Kind == EventLeave && e.Member.Name == c.Name() {
				if e.Member.LayerStart != 20 {
					t.Errorf("leave event carries %+v, want c's last metadata", e.Member)
				}
				return
			}
		case <-time.After(30 * time.Second): // a hang guard: the state above already holds
			t.Fatal("a got no leave event for c")
		}
	}
}

func TestGracefulLeave(t *testing.T) {
	a, b := newMember(t), newMember(t)
	if _, err := b.Join(context.Background(), []string{a.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "a sees b", func() bool { return len(a.Members()) == 2 })
	start := time.Now()
	if err := b.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, 3*time.Second, "a drops b", func() bool { return len(a.Members()) == 1 })
	t.Logf("graceful leave seen after %v (Leave returned after %v)", time.Since(start), time.Since(start)-took)
	if err := b.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-b.Events(); ok {
		for range b.Events() {
		}
	}
	if err := b.Shutdown(); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
}

func TestJoinThroughLibp2p(t *testing.T) {
	ctx := context.Background()
	ha, hb := newHost(t, "/ip4/127.0.0.1/tcp/0"), newHost(t, "/ip4/127.0.0.1/tcp/0")
	a := newMember(t, WithHost(ha), WithoutMDNS(), WithMeta(NodeMeta{PeerID: ha.ID()}))
	b := newMember(t, WithHost(hb), WithoutMDNS(), WithMeta(NodeMeta{PeerID: hb.ID()}))
	target := ha.Addrs()[0].String() + "/p2p/" + ha.ID().String()
	start := time.Now()
	n, err := b.Join(ctx, []string{target})
	if err != nil || n != 1 {
		t.Fatalf("join %s: %d %v", target, n, err)
	}
	t.Logf("join through %s took %v", target, time.Since(start))
	waitFor(t, 3*time.Second, "both see two members", func() bool {
		return len(a.Members()) == 2 && len(b.Members()) == 2
	})
	if got, _ := find(b, a.Name()); got.PeerID != ha.ID() {
		t.Fatalf("b sees a with peer ID %s", got.PeerID)
	}

	// Bad addresses fail with an error naming them; a good one beside them still joins.
	plain := newMember(t)
	for _, bad := range []string{
		"/ip4/127.0.0.1/tcp/1",         // no peer ID
		"/not/a/multiaddr",             // unparsable
		"localhost",                    // no port
		"127.0.0.1:1/p2p",              // not host:port
		target[:len(target)-3] + "abc", // corrupted peer ID
	} {
		if _, err := b.Join(ctx, []string{bad}); err == nil {
			t.Errorf("join %q succeeded", bad)
		}
	}
	if _, err := plain.Join(ctx, []string{target}); err == nil || !strings.Contains(err.Error(), "WithHost") {
		t.Errorf("join by multiaddr without a host: %v", err)
	}
	if n, err := plain.Join(ctx, []string{"/ip4/127.0.0.1/tcp/1", a.LocalAddr()}); err != nil || n != 1 {
		t.Errorf("join with one bad and one good address: %d %v", n, err)
	}
	if _, err := plain.Join(ctx, nil); err == nil {
		t.Error("join with no addresses succeeded")
	}
}

func TestSecretKey(t *testing.T) {
	ctx := context.Background()
	k1, err := DeriveSecretKey([]byte("swarm one"))
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := DeriveSecretKey([]byte("swarm two"))
	if bytes.Equal(k1, k2) || len(k1) != 32 {
		t.Fatalf("derived keys %x %x", k1, k2)
	}
	if _, err := DeriveSecretKey(nil); err == nil {
		t.Fatal("derived a key from nothing")
	}
	if _, err := New(ctx, WithSecretKey([]byte("short"))); err == nil {
		t.Fatal("5-byte key accepted")
	}
	a := newMember(t, WithSecretKey(k1))
	same := newMember(t, WithSecretKey(k1))
	other := newMember(t, WithSecretKey(k2))
	none := newMember(t)
	if _, err := same.Join(ctx, []string{a.LocalAddr()}); err != nil {
		t.Fatalf("same key: %v", err)
	}
	for name, m := range map[string]*Membership{"other key": other, "no key": none} {
		start := time.Now()
		if _, err := m.Join(ctx, []string{a.LocalAddr()}); err == nil {
			t.Errorf("%s joined an encrypted swarm", name)
		} else {
			t.Logf("%s refused after %v: %v", name, time.Since(start), err)
		}
	}
	waitFor(t, 3*time.Second, "a sees only the node with its key", func() bool { return len(a.Members()) == 2 })
	time.Sleep(300 * time.Millisecond)
	if names := memberNames(a); len(names) != 2 {
		t.Fatalf("a lists %v", names)
	}
}

// TestMDNS starts two hosts on the machine's interfaces and waits for them to find each
// other. It skips where multicast cannot work.
func TestMDNS(t *testing.T) {
	if !hasMulticastInterface() {
		t.Skip("no up, non-loopback interface with multicast: mDNS cannot work here")
	}
	ha, hb := newHost(t, "/ip4/0.0.0.0/tcp/0"), newHost(t, "/ip4/0.0.0.0/tcp/0")
	service := fmt.Sprintf("strata-test-%d", time.Now().UnixNano())
	a := newMember(t, WithHost(ha), WithMDNSService(service), WithMeta(NodeMeta{PeerID: ha.ID()}))
	b := newMember(t, WithHost(hb), WithMDNSService(service), WithMeta(NodeMeta{PeerID: hb.ID()}))
	for _, m := range []*Membership{a, b} {
		if m.mdnsErr != nil {
			t.Skipf("mDNS did not start: %v", m.mdnsErr)
		}
	}
	took := waitFor(t, 10*time.Second, "mDNS peers join", func() bool {
		return len(a.Members()) == 2 && len(b.Members()) == 2
	})
	t.Logf("two nodes found each other by mDNS and joined in %v", took)
}

func hasMulticastInterface() bool {
	ifs, err := net.Interfaces()
	if err != nil {
		return false
	}
	for _, i := range ifs {
		if i.Flags&net.FlagUp != 0 && i.Flags&net.FlagMulticast != 0 && i.Flags&net.FlagLoopback == 0 {
			return true
		}
	}
	return false
}

// TestMDNSFailureIsNotFatal starts mDNS on a host with no addresses to announce, which
// fails like a loopback-only network namespace does; the membership must run anyway.
func TestMDNSFailureIsNotFatal(t *testing.T) {
	h, err := libp2p.New(libp2p.NoListenAddrs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	m := newMember(t, WithHost(h))
	if m.mdnsErr == nil || m.mdns != nil {
		t.Fatalf("mDNS without addresses: err=%v running=%v", m.mdnsErr, m.mdns != nil)
	}
	t.Logf("mDNS failed as expected (%v); membership runs", m.mdnsErr)
	other := newMember(t)
	if _, err := other.Join(context.Background(), []string{m.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "join without mDNS", func() bool { return len(m.Members()) == 2 })

	// In a loopback-only network namespace this is where mDNS reports "no supported
	// interface"; elsewhere it starts. Either way the node runs.
	lo := newMember(t, WithHost(newHost(t, "/ip4/127.0.0.1/tcp/0")))
	t.Logf("mDNS on a loopback host: err=%v", lo.mdnsErr)
	if len(lo.Members()) != 1 {
		t.Fatal("membership not running")
	}
}

// TestDefaultBind starts on 0.0.0.0, which needs an address to advertise even on machines
// without a private one.
func TestDefaultBind(t *testing.T) {
	m, err := New(context.Background(), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Shutdown()
	host, _, err := net.SplitHostPort(m.LocalAddr())
	if err != nil || net.ParseIP(host).IsUnspecified() {
		t.Fatalf("advertised %q", m.LocalAddr())
	}
	t.Logf("bound to 0.0.0.0, advertising %s", m.LocalAddr())
	other := newMember(t)
	if _, err := other.Join(context.Background(), []string{m.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
}

// TestKilledProcessDetected runs a member in a child process, kills it with SIGKILL and
// times how long the parent takes to declare it gone.
func TestKilledProcessDetected(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns a process")
	}
	a := newMember(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperMember$")
	cmd.Env = append(os.Environ(), "STRATA_DISCOVERY_HELPER_JOIN="+a.LocalAddr())
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitFor(t, 10*time.Second, "child joins", func() bool { return len(a.Members()) == 2 })
	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "killed child declared gone", func() bool { return len(a.Members()) == 1 })
	t.Logf("member killed with SIGKILL declared gone after %v", time.Since(start))
}

// TestHelperMember is the child of TestKilledProcessDetected; it does nothing on its own.
func TestHelperMember(t *testing.T) {
	addr := os.Getenv("STRATA_DISCOVERY_HELPER_JOIN")
	if addr == "" {
		t.Skip("helper process for TestKilledProcessDetected")
	}
	m, err := New(context.Background(), WithBindAddr("127.0.0.1", 0), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Join(context.Background(), []string{addr}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Minute) // until killed
}

// recorder is a slog.Handler that keeps records.
type recorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec)
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

func TestMemberlistLogsGoToSlog(t *testing.T) {
	rec := &recorder{}
	a := newMember(t, WithLogger(slog.New(rec)))
	if _, err := a.Join(context.Background(), []string{"127.0.0.1:1"}); err == nil {
		t.Fatal("joined a closed port")
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var levels []string
	for _, r := range rec.recs {
		if strings.HasPrefix(r.Message, "[") || strings.HasPrefix(r.Message, "memberlist:") {
			t.Errorf("memberlist prefix left in %q", r.Message)
		}
		levels = append(levels, r.Level.String()+" "+r.Message)
	}
	if len(levels) == 0 {
		t.Fatal("no log records from memberlist")
	}
	t.Logf("records: %q", levels)
}

func TestOptionsValidate(t *testing.T) {
	for name, o := range map[string]Option{
		"bind host":      WithBindAddr("not-an-ip", 0),
		"bind port":      WithBindAddr("127.0.0.1", 70000),
		"advertise":      WithAdvertiseAddr("x", 0),
		"name":           WithName(""),
		"logger":         WithLogger(nil),
		"config":         WithConfig(nil),
		"host":           WithHost(nil),
		"mdns service":   WithMDNSService(""),
		"secret key len": WithSecretKey(make([]byte, 7)),
	} {
		if _, err := New(context.Background(), o); err == nil {
			t.Errorf("%s: bad option accepted", name)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := New(ctx); err == nil {
		t.Error("New with a cancelled context succeeded")
	}
	// WithConfig reaches memberlist.
	var seen *memberlist.Config
	m := newMember(t, WithName("tuned"), WithConfig(func(c *memberlist.Config) { seen = c }))
	if seen == nil || seen.ProbeInterval != 200*time.Millisecond || m.Name() != "tuned" {
		t.Fatalf("config hook saw %+v, name %q", seen, m.Name())
	}
}

// TestRestartSameName restarts a crashed node under the same name (its peer ID) on a new
// port, as a node restarted by its supervisor would, and checks the swarm takes it back.
// The old incarnation must first be declared dead (~0.8 s) and DeadNodeReclaimTime (2 s)
// pass; the new one is then accepted at its next push/pull (every 5 s): ~7 s measured.
func TestRestartSameName(t *testing.T) {
	if testing.Short() {
		t.Skip("takes ~7 s")
	}
	a := newMember(t)
	b := newMember(t, WithName("node-b"), WithMeta(NodeMeta{LayerEnd: 1}))
	if _, err := b.Join(context.Background(), []string{a.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "a sees b", func() bool { return len(a.Members()) == 2 })
	old := b.LocalAddr()
	_ = b.Shutdown()
	b2 := newMember(t, WithName("node-b"), WithMeta(NodeMeta{LayerEnd: 2}))
	joined := false
	took := waitFor(t, 10*time.Second, "a takes the restarted b back", func() bool {
		if !joined {
			_, err := b2.Join(context.Background(), []string{a.LocalAddr()})
			joined = err == nil
		}
		got, ok := find(a, "node-b")
		return joined && ok && got.Addr == b2.LocalAddr() && got.LayerEnd == 2
	})
	t.Logf("restarted node (old %s, new %s) back in the swarm after %v", old, b2.LocalAddr(), took)
}
