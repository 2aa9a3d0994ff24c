package discovery

import (
	"math"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/vmihailenco/msgpack/v5"
)

func seedMeta(f *testing.F) NodeMeta {
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		f.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		f.Fatal(err)
	}
	return NodeMeta{
		PeerID: id, Addrs: []ma.Multiaddr{ma.StringCast("/ip4/192.168.1.10/tcp/4001")},
		ModelSHA256: [32]byte{1, 2, 3}, ManifestID: [16]byte{4, 5}, LayerStart: 10, LayerEnd: 40, Chain: 1, State: StateServing,
		MemoryBytes: 12 << 30, FreeRAM: 3 << 30, MsPerLayer: 1.5, Sessions: 3, APIAddr: "192.168.1.10:8080", ModelName: "qwen2.5:7b",
		Host: [8]byte{9, 8, 7}, SharedOffer: true,
	}
}

// TestDecodeRefusesLies: metadata no honest node sends (Encode refuses to make it, a lying
// peer can still gossip it) is an error, not a member with a negative range or a NaN speed.
func TestDecodeRefusesLies(t *testing.T) {
	good := wireMeta{Start: 0, End: 4, Chain: -1, Ms: 1}
	for name, bad := range map[string]func(*wireMeta){
		"negative start":   func(w *wireMeta) { w.Start = -1 },
		"end before start": func(w *wireMeta) { w.Start, w.End = 5, 2 },
		"huge range":       func(w *wireMeta) { w.End = 1 << 40 },
		"next range":       func(w *wireMeta) { w.NextS, w.NextE = 3, 1 },
		"unknown state":    func(w *wireMeta) { w.State = 9 },
		"NaN speed":        func(w *wireMeta) { w.Ms = float32(math.NaN()) },
		"negative memory":  func(w *wireMeta) { w.Mem = -1 },
		"long model name":  func(w *wireMeta) { w.MName = strings.Repeat("x", MaxModelName+1) },
		"short host id":    func(w *wireMeta) { w.Host = []byte{1, 2, 3} },
	} {
		w := good
		bad(&w)
		b, err := msgpack.Marshal(&w)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := DecodeNodeMeta(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
	b, _ := msgpack.Marshal(&good)
	if _, err := DecodeNodeMeta(b); err != nil {
		t.Fatalf("honest metadata refused: %v", err)
	}
}

// FuzzDecodeNodeMeta: gossip from any peer reaches this decoder; it must never panic, and
// what it accepts must encode again.
func FuzzDecodeNodeMeta(f *testing.F) {
	m := seedMeta(f)
	b, err := m.Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{})
	f.Add([]byte{0x80})
	f.Add([]byte{0xde, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := DecodeNodeMeta(b)
		if err != nil {
			return
		}
		if _, err := n.Encode(); err != nil && len(b) <= MaxMetaSize {
			t.Fatalf("decoded %+v but cannot encode it: %v", n, err)
		}
	})
}
