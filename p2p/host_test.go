package p2p

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

func quietLogger() *slog.Logger {
	if testing.Verbose() && os.Getenv("STRATA_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func newTestHost(t testing.TB, opts ...Option) *Host {
	t.Helper()
	opts = append([]Option{WithListen("/ip4/127.0.0.1/tcp/0"), WithLogger(quietLogger())}, opts...)
	h, err := New(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func TestIdentityPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "identity.key")
	h1, err := New(context.Background(), WithListen("/ip4/127.0.0.1/tcp/0"), WithIdentityFile(path), WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	id := h1.ID()
	h1.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity file mode %v, want 0600", fi.Mode().Perm())
	}
	h2 := newTestHost(t, WithIdentityFile(path))
	if h2.ID() != id {
		t.Fatalf("peer ID changed across restarts: %s -> %s", id, h2.ID())
	}
	other := newTestHost(t, WithIdentityFile(filepath.Join(t.TempDir(), "other.key")))
	if other.ID() == id {
		t.Fatal("two identity files gave the same peer ID")
	}
	// A corrupt key file is an error, not a silent new identity.
	bad := filepath.Join(t.TempDir(), "bad.key")
	os.WriteFile(bad, []byte("garbage"), 0o600)
	if _, err := New(context.Background(), WithIdentityFile(bad)); err == nil {
		t.Fatal("corrupt identity file accepted")
	}
}

func TestAddrsAreFull(t *testing.T) {
	h := newTestHost(t)
	addrs := h.Addrs()
	if len(addrs) == 0 {
		t.Fatal("no addresses")
	}
	for _, a := range addrs {
		ai, err := peer.AddrInfoFromP2pAddr(a)
		if err != nil || ai.ID != h.ID() || !strings.HasPrefix(a.String(), "/ip4/127.0.0.1/tcp/") {
			t.Fatalf("address %s: %v", a, err)
		}
	}
	// The default listens on TCP and QUIC.
	d, err := New(context.Background(), WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var tcp, quic bool
	for _, a := range d.Addrs() {
		tcp = tcp || strings.Contains(a.String(), "/tcp/")
		quic = quic || strings.Contains(a.String(), "/quic-v1")
	}
	if !tcp || !quic {
		t.Fatalf("default addresses %v: want TCP and QUIC", d.Addrs())
	}
}

func TestSwarmKey(t *testing.T) {
	dir := t.TempDir()
	keyA, keyB := filepath.Join(dir, "a.key"), filepath.Join(dir, "b.key")
	if err := GenerateSwarmKey(keyA); err != nil {
		t.Fatal(err)
	}
	if err := GenerateSwarmKey(keyB); err != nil {
		t.Fatal(err)
	}
	if err := GenerateSwarmKey(keyA); err == nil {
		t.Fatal("GenerateSwarmKey overwrote an existing key")
	}
	b, _ := os.ReadFile(keyA)
	if !strings.HasPrefix(string(b), "/key/swarm/psk/1.0.0/\n/base16/\n") || len(strings.TrimSpace(string(b))) != 21+1+8+1+64 {
		t.Fatalf("swarm key file format: %q", b)
	}
	if fi, _ := os.Stat(keyA); fi.Mode().Perm() != 0o600 {
		t.Fatalf("swarm key mode %v", fi.Mode().Perm())
	}

	a1 := newTestHost(t, WithSwarmKey(keyA))
	a2 := newTestHost(t, WithSwarmKey(keyA))
	if !a1.Private() {
		t.Fatal("host with a swarm key is not private")
	}
	ctx := context.Background()
	if err := a2.Connect(ctx, a1.AddrInfo()); err != nil {
		t.Fatalf("same swarm key: %v", err)
	}

	refused := func(name string, from *Host, to *Host) {
		t.Helper()
		start := time.Now()
		err := from.Connect(ctx, to.AddrInfo())
		took := time.Since(start)
		if err == nil {
			t.Fatalf("%s: connected", name)
		}
		// A hang guard: the 2 s dial timeout ends a handshake that hangs; without it libp2p
		// would wait out its own 15 s.
		if took > 12*time.Second {
			t.Fatalf("%s: refusal took %v", name, took)
		}
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "swarm key") {
			t.Fatalf("%s: unclear error: %v", name, err)
		}
		t.Logf("%s: refused in %v: %v", name, took.Round(time.Millisecond), err)
	}
	b1 := newTestHost(t, WithSwarmKey(keyB), WithDialTimeout(2*time.Second))
	refused("different key", b1, a1)
	open := newTestHost(t, WithDialTimeout(2*time.Second))
	refused("no key dialling a private swarm", open, a1)
	keyed := newTestHost(t, WithSwarmKey(keyA), WithDialTimeout(2*time.Second))
	refused("private node dialling a public one", keyed, open)

	if _, err := New(ctx, WithSwarmKey(keyA), WithListen("/ip4/127.0.0.1/udp/0/quic-v1")); err == nil || !strings.Contains(err.Error(), "QUIC") {
		t.Fatalf("QUIC listen address with a swarm key: %v", err)
	}
	if _, err := New(ctx, WithSwarmKey(filepath.Join(dir, "missing.key"))); err == nil {
		t.Fatal("missing swarm key file accepted")
	}
}

// TestQUIC: without a swarm key a host speaks QUIC too, and streams run over it.
func TestQUIC(t *testing.T) {
	a := newTestHost(t, WithListen("/ip4/127.0.0.1/udp/0/quic-v1"))
	b := newTestHost(t, WithListen("/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"))
	const proto = "/strata/test-echo/1.0.0"
	a.Libp2p().SetStreamHandler(proto, func(s network.Stream) {
		defer s.Close()
		io.Copy(s, s)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Connect(ctx, a.AddrInfo()); err != nil {
		t.Fatal(err)
	}
	conns := b.Libp2p().Network().ConnsToPeer(a.ID())
	if len(conns) == 0 || !isQUIC(conns[0].RemoteMultiaddr()) {
		t.Fatalf("connections %v: want one over QUIC", conns)
	}
	s, err := b.Libp2p().NewStream(ctx, a.ID(), proto)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("activations over quic")
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != string(msg) {
		t.Fatalf("echo %q, %v", got, err)
	}
}
