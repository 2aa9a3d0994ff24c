package peerfetch

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	hub "github.com/strata-llm/strata/fetch"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
)

func quiet() *slog.Logger {
	if os.Getenv("STRATA_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func newHost(t *testing.T) *p2p.Host {
	t.Helper()
	h, err := p2p.New(context.Background(), p2p.WithListen("/ip4/127.0.0.1/tcp/0"), p2p.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

type model struct {
	path, sha, id string
	key           [32]byte
	manifest      []byte
}

func tinyModel(t *testing.T) model {
	t.Helper()
	path := testkit.TinyModel(t)
	sha, err := shard.FileSHA256(path, "")
	if err != nil {
		t.Fatal(err)
	}
	m, err := weights.Build(path, sha)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	md := model{path: path, sha: sha, id: weights.ID(enc), manifest: enc}
	hex.Decode(md.key[:], []byte(sha))
	return md
}

// holder starts a host serving the whole model file, through wrap if not nil.
func holder(t *testing.T, md model, wrap func(p2p.WeightsSource) p2p.WeightsSource) *p2p.Host {
	t.Helper()
	h := newHost(t)
	hd := NewHoldings()
	t.Cleanup(func() { hd.Close() })
	if _, err := hd.AddManifest(md.manifest); err != nil {
		t.Fatal(err)
	}
	if err := hd.AddFile(md.key, md.path); err != nil {
		t.Fatal(err)
	}
	var src p2p.WeightsSource = hd
	if wrap != nil {
		src = wrap(hd)
	}
	h.ServeWeights(src)
	return h
}

func want(t *testing.T, md model, r shard.Range) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "want.gguf")
	if err := shard.WriteSlice(context.Background(), md.path, md.sha, r, p, nil); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fetch(t *testing.T, fetcher *p2p.Host, md model, r shard.Range, holders []*p2p.Host, opts ...Option) (string, Stats, error) {
	t.Helper()
	var srcs []Source
	for _, h := range holders {
		srcs = append(srcs, PeerSource(fetcher, h.AddrInfo(), nil, nil))
	}
	dst := filepath.Join(t.TempDir(), "slice.gguf")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute) // hang guard
	defer cancel()
	opts = append([]Option{WithChunk(16 << 10), WithLogger(quiet())}, opts...)
	st, err := Fetch(ctx, Request{ModelSHA256: md.sha, ManifestID: md.id, Range: r, Dst: dst}, srcs, opts...)
	return dst, st, err
}

func sameAsWriteSlice(t *testing.T, md model, r shard.Range, path string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want(t, md, r)) {
		t.Fatalf("fetched slice %s differs from WriteSlice's", r)
	}
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.SliceOf != md.sha {
		t.Fatalf("slice of %q, want %q", info.SliceOf, md.sha)
	}
}

func TestFetchSliceFromTwoHolders(t *testing.T) {
	md := tinyModel(t)
	a := holder(t, md, nil)
	b := holder(t, md, nil)
	f := newHost(t)
	for _, r := range []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: 6}} {
		before := f.WeightsStats().ReceivedBytes
		var last float32
		dst, st, err := fetch(t, f, md, r, []*p2p.Host{a, b}, WithProgress(func(x float32) { last = x }))
		if err != nil {
			t.Fatal(err)
		}
		sameAsWriteSlice(t, md, r, dst)
		recv := int64(f.WeightsStats().ReceivedBytes - before)
		t.Logf("%s: slice %d tensor bytes, received %d (%.3fx) + manifest %d; per source %v", r, st.SliceBytes, recv,
			float64(recv)/float64(st.SliceBytes), st.ManifestBytes, st.PerSource)
		if recv != st.TensorBytes || float64(recv) > 1.05*float64(st.SliceBytes) {
			t.Fatalf("received %d tensor bytes (fetcher counted %d) for a slice of %d", recv, st.TensorBytes, st.SliceBytes)
		}
		if len(st.Dropped) != 0 || last != 1 {
			t.Fatalf("dropped %v, progress %v", st.Dropped, last)
		}
		// Which holder serves which tensor is a race: under load one may serve them all.
		// Spreading is measured, not asserted.
		if r.Start == 2 && (st.PerSource[a.ID().String()] == 0 || st.PerSource[b.ID().String()] == 0) {
			t.Logf("one holder served the whole slice: %v", st.PerSource)
		}
	}
}

// corrupting flips a byte of every tensor it serves.
type corrupting struct{ p2p.WeightsSource }

func (c corrupting) Tensor(model [32]byte, name string) (io.ReaderAt, int64, bool) {
	ra, n, ok := c.WeightsSource.Tensor(model, name)
	return flip{ra}, n, ok
}

type flip struct{ io.ReaderAt }

func (f flip) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.ReaderAt.ReadAt(p, off)
	if n > 0 {
		p[0] ^= 0x40
	}
	return n, err
}

func TestFetchDropsCorruptPeer(t *testing.T) {
	md := tinyModel(t)
	bad := holder(t, md, func(s p2p.WeightsSource) p2p.WeightsSource { return corrupting{s} })
	good := holder(t, md, nil)
	f := newHost(t)
	r := shard.Range{Start: 1, End: 4}
	dst, st, err := fetch(t, f, md, r, []*p2p.Host{bad, good})
	if err != nil {
		t.Fatal(err)
	}
	sameAsWriteSlice(t, md, r, dst)
	if !slices.Equal(st.Dropped, []string{bad.ID().String()}) {
		t.Fatalf("dropped %v, want the corrupting peer %s", st.Dropped, bad.ID())
	}
	t.Logf("received %d tensor bytes for a slice of %d; per source %v", st.TensorBytes, st.SliceBytes, st.PerSource)

	// With only corrupt sources nothing is written, not even a temporary file.
	dst, st, err = fetch(t, f, md, r, []*p2p.Host{bad})
	if err == nil {
		t.Fatal("a fetch from a corrupting peer alone succeeded")
	}
	if _, serr := os.Stat(dst); !errors.Is(serr, os.ErrNotExist) {
		t.Fatalf("slice file left after a failed fetch: %v", serr)
	}
	if left, _ := os.ReadDir(filepath.Dir(dst)); len(left) != 0 {
		t.Fatalf("files left after a failed fetch: %v", left)
	}
	if len(st.Dropped) != 1 {
		t.Fatalf("dropped %v", st.Dropped)
	}
}

// dying serves left bytes, then closes its host in the middle of a tensor.
type dying struct {
	p2p.WeightsSource
	h     func() *p2p.Host
	left  *atomic.Int64
	once  *sync.Once
	ended chan struct{}
}

func (d dying) Tensor(model [32]byte, name string) (io.ReaderAt, int64, bool) {
	ra, n, ok := d.WeightsSource.Tensor(model, name)
	return dyingReader{ra, d}, n, ok
}

type dyingReader struct {
	io.ReaderAt
	d dying
}

func (r dyingReader) ReadAt(p []byte, off int64) (int, error) {
	if off > 0 && r.d.left.Add(-int64(len(p))) < 0 { // mid-tensor
		r.d.once.Do(func() {
			go func() { r.d.h().Close(); close(r.d.ended) }()
		})
		return 0, errors.New("source dying")
	}
	return r.ReaderAt.ReadAt(p, off)
}

func TestFetchResumesFromAnotherHolder(t *testing.T) {
	md := tinyModel(t)
	var h *p2p.Host
	left := &atomic.Int64{}
	left.Store(64 << 10)
	d := dying{h: func() *p2p.Host { return h }, left: left, once: &sync.Once{}, ended: make(chan struct{})}
	h = holder(t, md, func(s p2p.WeightsSource) p2p.WeightsSource { d.WeightsSource = s; return d })
	good := holder(t, md, nil)
	f := newHost(t)
	r := shard.Range{Start: 0, End: 6}
	dst, st, err := fetch(t, f, md, r, []*p2p.Host{h, good})
	if err != nil {
		t.Fatal(err)
	}
	<-d.ended
	sameAsWriteSlice(t, md, r, dst)
	t.Logf("received %d tensor bytes for a slice of %d, %d chunks resumed; per source %v", st.TensorBytes, st.SliceBytes, st.Resumed, st.PerSource)
	if st.PerSource[h.ID().String()] == 0 || st.Resumed == 0 {
		t.Fatalf("the dying holder served %d bytes, %d chunks resumed: the test did not kill a transfer", st.PerSource[h.ID().String()], st.Resumed)
	}
	if len(st.Dropped) != 0 {
		t.Fatalf("a source that died is not corrupt: dropped %v", st.Dropped)
	}
}

func TestFetchRefusesWrongManifest(t *testing.T) {
	md := tinyModel(t)
	a := holder(t, md, nil)
	f := newHost(t)
	wrong := md
	wrong.id = weights.ID([]byte("another manifest"))
	_, st, err := fetch(t, f, wrong, shard.Range{Start: 0, End: 2}, []*p2p.Host{a})
	if err == nil || len(st.Dropped) != 1 {
		t.Fatalf("fetch with a manifest id no peer has: err %v, dropped %v", err, st.Dropped)
	}
}

func TestFetchManifest(t *testing.T) {
	md := tinyModel(t)
	a := holder(t, md, nil)
	f := newHost(t)
	enc, m, dropped, err := FetchManifest(context.Background(), md.sha, md.id[:32], []Source{PeerSource(f, a.AddrInfo(), nil, nil)}, quiet())
	if err != nil || !bytes.Equal(enc, md.manifest) || m.ModelSHA256 != md.sha || len(dropped) != 0 {
		t.Fatalf("FetchManifest: %v, dropped %v", err, dropped)
	}
}

// The hub server answers Range requests: a slice is read from the GGUF header and its own
// tensor ranges only, and equals WriteSlice's; with the manifest its tensors are checked.
func TestFetchSliceFromHub(t *testing.T) {
	md := tinyModel(t)
	name := "owner/repo/resolve/main/tiny.gguf"
	url, served := testkit.ServeHubCounted(t, map[string]string{name: md.path})
	f := hub.New(t.TempDir(), hub.WithHFEndpoint(url), hub.WithLogger(quiet()))
	for _, withManifest := range []bool{false, true} {
		ctx := context.Background()
		before := served.Load()
		rm, err := f.OpenRemote(ctx, "hf://owner/repo/tiny.gguf")
		if err != nil {
			t.Fatal(err)
		}
		if rm.SHA256() != md.sha {
			t.Fatalf("hub digest %q, want %q", rm.SHA256(), md.sha)
		}
		r := shard.Range{Start: 2, End: 4}
		dst := filepath.Join(t.TempDir(), "slice.gguf")
		opts := []Option{WithLogger(quiet()), WithChunk(64 << 10)}
		if withManifest {
			opts = append(opts, WithManifest(md.manifest))
		}
		st, err := FetchFromHub(ctx, Request{ModelSHA256: rm.SHA256(), ManifestID: md.id, Range: r, Dst: dst}, rm, opts...)
		if err != nil {
			t.Fatal(err)
		}
		sameAsWriteSlice(t, md, r, dst)
		got := served.Load() - before
		t.Logf("hub served %d bytes: header %d + tensors %d for a slice of %d tensor bytes (whole file %d, verified %v)",
			got, st.HeaderBytes, st.TensorBytes, st.SliceBytes, rm.Size(), st.Verified)
		if got != 1+st.HeaderBytes+st.TensorBytes || st.TensorBytes != st.SliceBytes || st.Verified != withManifest {
			t.Fatalf("hub served %d bytes; fetch counted %+v", got, st)
		}
		if st.HeaderBytes > int64(len(mustDecode(t, md.manifest).Header))+256<<10 {
			t.Fatalf("read %d bytes for a header of %d", st.HeaderBytes, len(mustDecode(t, md.manifest).Header))
		}
	}
}

func mustDecode(t *testing.T, enc []byte) *weights.Manifest {
	m, err := weights.Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Peers that serve slices, not the whole file: a fetch of layers split between them takes
// each tensor from the one holding it (the other answers that it lacks it).
func TestFetchFromSliceHolders(t *testing.T) {
	md := tinyModel(t)
	sliceHolder := func(r shard.Range) *p2p.Host {
		p := filepath.Join(t.TempDir(), "slice.gguf")
		if err := shard.WriteSlice(context.Background(), md.path, md.sha, r, p, nil); err != nil {
			t.Fatal(err)
		}
		h := newHost(t)
		hd := NewHoldings()
		t.Cleanup(func() { hd.Close() })
		if _, err := hd.AddManifest(md.manifest); err != nil {
			t.Fatal(err)
		}
		if err := hd.AddFile(md.key, p); err != nil {
			t.Fatal(err)
		}
		h.ServeWeights(hd)
		return h
	}
	a, b := sliceHolder(shard.Range{Start: 0, End: 4}), sliceHolder(shard.Range{Start: 4, End: 6})
	f := newHost(t)
	r := shard.Range{Start: 2, End: 6}
	dst, st, err := fetch(t, f, md, r, []*p2p.Host{a, b})
	if err != nil {
		t.Fatal(err)
	}
	sameAsWriteSlice(t, md, r, dst)
	t.Logf("received %d tensor bytes for a slice of %d; per source %v", st.TensorBytes, st.SliceBytes, st.PerSource)
	if st.TensorBytes != st.SliceBytes || len(st.Dropped) != 0 {
		t.Fatalf("received %d bytes for a slice of %d, dropped %v", st.TensorBytes, st.SliceBytes, st.Dropped)
	}
}
