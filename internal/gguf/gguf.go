// Package gguf holds the small pieces of GGUF file handling that shard, quant and the model
// synthesizer share on top of the engine's fs/ggml.
package gguf

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	fsggml "github.com/ollama/ollama/fs/ggml"
)

// WriteAtomic writes a GGUF through a temporary file and renames it into place, so a crash
// never leaves a half-written file where a cache lookup would find it.
func WriteAtomic(dst string, kv fsggml.KV, ts []*fsggml.Tensor) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".tmp-"+filepath.Base(dst)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	defer os.Remove(tmp.Name())
	if err := fsggml.WriteGGUF(tmp, kv, ts); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", dst, err)
	}
	// Synced before the rename, and the directory after it: otherwise a power loss can leave
	// the new name pointing at a file whose data never reached the disk (a truncated slice
	// that a cache lookup would take as whole).
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: sync: %w", dst, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return SyncDir(filepath.Dir(dst))
}

// SyncDir makes a rename or create in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Decode reads a GGUF's metadata and tensor table from the start of r. fs/ggml's decoder
// trusts the lengths it reads: a 2^63-byte key makes it panic and an 80 GB one runs the
// process out of memory. So lengths are checked against the file's size first and panics
// become errors: every reader of a file Strata did not write goes through this.
func Decode(r io.ReadSeeker) (meta *fsggml.GGML, err error) {
	if err := checkLengths(r); err != nil {
		return nil, err
	}
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("read GGUF: %w", err)
	}
	defer func() {
		if p := recover(); p != nil {
			meta, err = nil, fmt.Errorf("corrupt GGUF: %v", p)
		}
	}()
	meta, err = fsggml.Decode(r, -1)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("truncated GGUF: %w", err)
		}
		return nil, fmt.Errorf("not a valid GGUF: %w", err)
	}
	return meta, nil
}
