package weights

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
)

// writeModel writes a small GGUF with a few tensors of distinct bytes.
func writeModel(tb testing.TB) (path, sum string) {
	tb.Helper()
	path = filepath.Join(tb.TempDir(), "m.gguf")
	kv := fsggml.KV{"general.architecture": "llama", "llama.block_count": uint32(2), "general.name": "seed"}
	var ts []*fsggml.Tensor
	for i, name := range []string{"blk.0.attn_norm.weight", "blk.1.attn_norm.weight", "token_embd.weight"} {
		b := bytes.Repeat([]byte{byte(i + 1)}, 16*(i+1))
		ts = append(ts, &fsggml.Tensor{Name: name, Kind: uint32(fsggml.TensorTypeF32), Shape: []uint64{uint64(4 * (i + 1))}, WriterTo: bytes.NewReader(b)})
	}
	if err := gguf.WriteAtomic(path, kv, ts); err != nil {
		tb.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	s := sha256.Sum256(b)
	return path, hex.EncodeToString(s[:])
}

func TestManifestRoundTrip(t *testing.T) {
	path, sum := writeModel(t)
	m, err := Build(path, sum)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Tensors) != 3 {
		t.Fatalf("%d tensors, want 3", len(m.Tensors))
	}
	whole, _ := os.ReadFile(path)
	for _, tt := range m.Tensors {
		if got := sha256.Sum256(whole[tt.Offset : tt.Offset+tt.Size]); got != tt.SHA256 {
			t.Fatalf("%s: digest differs from the file's bytes", tt.Name)
		}
	}
	enc, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	d, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := d.Encode()
	if !bytes.Equal(enc, again) || ID(enc) != ID(again) {
		t.Fatal("decode and encode changed the manifest")
	}
	meta, err := d.Parse()
	if err != nil {
		t.Fatal(err)
	}
	if meta.KV().String("general.name") != "seed" {
		t.Fatalf("header parsed to %v", meta.KV())
	}
}

func TestManifestRejects(t *testing.T) {
	path, sum := writeModel(t)
	m, err := Build(path, sum)
	if err != nil {
		t.Fatal(err)
	}
	mutate := map[string]func(*Manifest){
		"overlap":     func(m *Manifest) { m.Tensors[1].Offset = m.Tensors[0].Offset },
		"past end":    func(m *Manifest) { m.Tensors[2].Size = m.FileSize },
		"dup name":    func(m *Manifest) { m.Tensors[1].Name = m.Tensors[0].Name },
		"bad sha":     func(m *Manifest) { m.ModelSHA256 = "xyz" },
		"upper hex":   func(m *Manifest) { m.ModelSHA256 = "ABCDEF" + m.ModelSHA256[6:] },
		"big header":  func(m *Manifest) { m.Header = make([]byte, m.FileSize+1) },
		"no tensors":  func(m *Manifest) { m.Tensors = nil },
		"in header":   func(m *Manifest) { m.Tensors[0].Offset = 1 },
		"empty named": func(m *Manifest) { m.Tensors[0].Name = "" },
	}
	for name, f := range mutate {
		c := *m
		c.Tensors = append([]Tensor(nil), m.Tensors...)
		f(&c)
		enc, err := c.Encode()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Decode(enc); !errors.Is(err, ErrBadManifest) {
			t.Errorf("%s: Decode = %v, want ErrBadManifest", name, err)
		}
	}
	// A manifest whose table names the right tensors at other places than its header.
	c := *m
	c.Tensors = append([]Tensor(nil), m.Tensors...)
	c.Tensors[2].Size--
	enc, _ := c.Encode()
	d, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Parse(); !errors.Is(err, ErrBadManifest) {
		t.Errorf("Parse of a table that disagrees with the header = %v", err)
	}
	enc, _ = m.Encode()
	for _, b := range [][]byte{enc[:len(enc)-1], append(enc, 0), {0xdd, 0xff, 0xff, 0xff, 0xff}, {}} {
		if _, err := Decode(b); !errors.Is(err, ErrBadManifest) {
			t.Errorf("Decode(%d bytes) = %v, want ErrBadManifest", len(b), err)
		}
	}
}
