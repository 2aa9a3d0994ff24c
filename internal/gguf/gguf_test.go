package gguf

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"
)

// FuzzDecode: every GGUF Strata did not write goes through Decode; no input may panic it.
func FuzzDecode(f *testing.F) {
	path := filepath.Join(f.TempDir(), "seed.gguf")
	kv := fsggml.KV{"general.architecture": "llama", "llama.block_count": uint32(1), "general.name": "seed"}
	ts := []*fsggml.Tensor{{Name: "blk.0.attn_norm.weight", Kind: uint32(fsggml.TensorTypeF32), Shape: []uint64{4}, WriterTo: bytes.NewReader(make([]byte, 16))}}
	if err := WriteAtomic(path, kv, ts); err != nil {
		f.Fatal(err)
	}
	seed, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Add([]byte("GGUF"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		meta, err := Decode(bytes.NewReader(b))
		if err == nil && meta == nil {
			t.Fatal("no error and no metadata")
		}
	})
}
