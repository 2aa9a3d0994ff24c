package peerfetch

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	hub "github.com/strata-llm/strata/fetch"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
)

// A --slices-only node's restart: the header read from the hub is cached and equals the
// manifest's; a slice read with the cached header costs the hub only its tensor bytes; the
// cached header, the slice's record and the slice's check against a manifest need no
// network at all; and every kind of damage or lie is caught.
func TestHubCacheOfflineAndChecks(t *testing.T) {
	md := tinyModel(t)
	man := mustDecode(t, md.manifest)
	url, served := testkit.ServeHubCounted(t, map[string]string{"owner/repo/resolve/main/tiny.gguf": md.path})
	ref := "hf://owner/repo/tiny.gguf"
	ctx := context.Background()
	rm, err := hub.New(t.TempDir(), hub.WithHFEndpoint(url), hub.WithLogger(quiet())).OpenRemote(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	_, hdr, read, err := RemoteHeader(ctx, rm)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hdr, man.Header) {
		t.Fatalf("header read from the hub (%d bytes) differs from the manifest's (%d)", len(hdr), len(man.Header))
	}
	cache := HubHeaderPath(t.TempDir(), ref)
	if err := (&HubHeader{Ref: ref, ModelSHA256: rm.SHA256(), Size: rm.Size(), Header: hdr}).Save(cache); err != nil {
		t.Fatal(err)
	}

	// A slice read with the cached header: the hub serves its tensors and nothing else.
	r := shard.Range{Start: 1, End: 3}
	slice := filepath.Join(t.TempDir(), "slice.gguf")
	before := served.Load()
	st, err := FetchFromHub(ctx, Request{ModelSHA256: md.sha, ManifestID: md.id, Range: r, Dst: slice}, rm,
		WithHeader(hdr), WithLogger(quiet()), WithChunk(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	sameAsWriteSlice(t, md, r, slice)
	if got := served.Load() - before; got != st.TensorBytes || st.HeaderBytes != 0 || st.TensorBytes != st.SliceBytes || st.Verified {
		t.Fatalf("hub served %d bytes for a slice of %d tensor bytes with the header cached: %+v", got, st.SliceBytes, st)
	}
	t.Logf("header read once (%d bytes from the hub, %d kept); the slice cost the hub %d bytes", read, len(hdr), st.TensorBytes)
	if err := WriteRecord(slice, Record{ModelSHA256: md.sha, From: "hub"}); err != nil {
		t.Fatal(err)
	}

	// The restart: no network is touched.
	before = served.Load()
	hh, err := LoadHubHeader(cache, ref)
	if err != nil {
		t.Fatal(err)
	}
	if hh.ModelSHA256 != md.sha || hh.Size != man.FileSize || !bytes.Equal(hh.Header, man.Header) {
		t.Fatalf("cached header: %+v", hh)
	}
	if _, err := weights.ParseHeader(hh.Header, hh.Size); err != nil {
		t.Fatal(err)
	}
	rec, err := CheckRecord(slice, md.sha)
	if err != nil || rec.Verified || rec.From != "hub" {
		t.Fatalf("record %+v, %v", rec, err)
	}
	if err := VerifySlice(slice, man); err != nil { // the manifest turned up: the hub's bytes hold
		t.Fatal(err)
	}
	if got := served.Load() - before; got != 0 {
		t.Fatalf("the offline checks cost the hub %d bytes", got)
	}
	if _, err := LoadHubHeader(cache, "hf://owner/repo/other.gguf"); err == nil {
		t.Fatal("a cached header answered for another reference")
	}

	// Damage and lies.
	b, err := os.ReadFile(slice)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-3] ^= 0x40 // inside the last tensor
	if err := os.WriteFile(slice, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckRecord(slice, md.sha); err == nil || !strings.Contains(err.Error(), "changed") {
		t.Fatalf("a changed slice passed its record: %v", err)
	}
	if err := WriteRecord(slice, Record{ModelSHA256: md.sha, From: "hub"}); err != nil { // a lying hub: bytes and record agree
		t.Fatal(err)
	}
	if _, err := CheckRecord(slice, md.sha); err != nil {
		t.Fatal(err)
	}
	if err := VerifySlice(slice, man); err == nil || !strings.Contains(err.Error(), "does not match the manifest") {
		t.Fatalf("a lying hub's slice passed the manifest: %v", err)
	}
	other := filepath.Join(t.TempDir(), "other.gguf")
	if err := shard.WriteSlice(ctx, md.path, strings.Repeat("ab", 32), r, other, nil); err != nil {
		t.Fatal(err)
	}
	if err := VerifySlice(other, man); err == nil || !strings.Contains(err.Error(), "cut from model") {
		t.Fatalf("a slice naming another model passed: %v", err)
	}
	if err := RemoveSlice(slice); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckRecord(slice, md.sha); err == nil {
		t.Fatal("a removed slice checks out")
	}
	hb, _ := os.ReadFile(cache + ".gguf-header")
	hb[10] ^= 1
	if err := os.WriteFile(cache+".gguf-header", hb, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadHubHeader(cache, ref); err == nil || !strings.Contains(err.Error(), "digest") {
		t.Fatalf("a damaged cached header loaded: %v", err)
	}
}

// A slice fetched from peers verifies against the manifest as written, and serving stops
// once RemoveFile drops it.
func TestVerifyPeerSliceAndRemoveFile(t *testing.T) {
	md := tinyModel(t)
	r := shard.Range{Start: 0, End: 2} // a first stage: it carries the placeholder output tensor
	h := holder(t, md, nil)
	dst, _, err := fetch(t, newHost(t), md, r, []*p2p.Host{h})
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifySlice(dst, mustDecode(t, md.manifest)); err != nil {
		t.Fatal(err)
	}
	hd := NewHoldings()
	defer hd.Close()
	if err := hd.AddFile(md.key, dst); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := hd.Tensor(md.key, "blk.0.attn_q.weight"); !ok {
		t.Fatal("a served slice's tensor is not held")
	}
	hd.RemoveFile(md.key, dst)
	if _, _, ok := hd.Tensor(md.key, "blk.0.attn_q.weight"); ok {
		t.Fatal("a removed slice's tensor is still served")
	}
}
