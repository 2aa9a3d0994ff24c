package peerfetch

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/weights"
)

// PeerSource is a peer serving the weights protocol. holds, if not nil, says which tensors
// it has (a peer serving a slice); limit, if not nil, caps the bytes received from it and
// every other source sharing the limiter.
func PeerSource(h *p2p.Host, ai peer.AddrInfo, limit *p2p.Limiter, holds func(string) bool) Source {
	return Source{
		Name:      ai.ID.String(),
		Holds:     holds,
		IsNotHeld: func(err error) bool { return errors.Is(err, p2p.ErrNotHeld) },
		Open: func(ctx context.Context) (Conn, error) {
			return h.OpenWeights(ctx, ai, limit)
		},
	}
}

// Holdings is what a node serves on the weights protocol: manifests it built or verified,
// and the tensors of its whole model files and slice files. Safe for concurrent use.
type Holdings struct {
	mu     sync.RWMutex
	models map[[32]byte]*held
}

type held struct {
	manifest []byte
	files    map[string]*os.File
	tensors  map[string]place
}

type place struct {
	f         *os.File
	off, size int64
}

// NewHoldings returns empty holdings.
func NewHoldings() *Holdings { return &Holdings{models: map[[32]byte]*held{}} }

func (h *Holdings) model(m [32]byte) *held {
	hd := h.models[m]
	if hd == nil {
		hd = &held{files: map[string]*os.File{}, tensors: map[string]place{}}
		h.models[m] = hd
	}
	return hd
}

// AddManifest serves an encoded manifest of its model. It is decoded (not trusted) first.
func (h *Holdings) AddManifest(enc []byte) (*weights.Manifest, error) {
	m, err := weights.Decode(enc)
	if err != nil {
		return nil, err
	}
	var key [32]byte
	hex.Decode(key[:], []byte(m.ModelSHA256)) // Decode checked it is 64 hex digits
	h.mu.Lock()
	h.model(key).manifest = enc
	h.mu.Unlock()
	return m, nil
}

// AddFile serves the tensors of a GGUF file of the model: the whole model or a slice of
// it. Serving never checks the bytes; fetchers check them against the manifest.
func (h *Holdings) AddFile(model [32]byte, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("serve weights: %w", err)
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		f.Close()
		return fmt.Errorf("serve weights of %s: %w", path, err)
	}
	base := int64(meta.Tensors().Offset)
	h.mu.Lock()
	defer h.mu.Unlock()
	hd := h.model(model)
	if old := hd.files[path]; old != nil {
		old.Close()
	}
	hd.files[path] = f
	for _, t := range meta.Tensors().Items() {
		hd.tensors[t.Name] = place{f: f, off: base + int64(t.Offset), size: int64(t.Size())}
	}
	return nil
}

// RemoveFile stops serving a file added with AddFile (a slice that failed a check).
func (h *Holdings) RemoveFile(model [32]byte, path string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	hd := h.models[model]
	if hd == nil || hd.files[path] == nil {
		return
	}
	f := hd.files[path]
	for name, p := range hd.tensors {
		if p.f == f {
			delete(hd.tensors, name)
		}
	}
	delete(hd.files, path)
	f.Close()
}

// Close closes every file.
func (h *Holdings) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, hd := range h.models {
		for _, f := range hd.files {
			f.Close()
		}
	}
	h.models = map[[32]byte]*held{}
	return nil
}

// Manifest implements p2p.WeightsSource.
func (h *Holdings) Manifest(model [32]byte) ([]byte, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	hd := h.models[model]
	if hd == nil || hd.manifest == nil {
		return nil, false
	}
	return hd.manifest, true
}

// Tensor implements p2p.WeightsSource.
func (h *Holdings) Tensor(model [32]byte, name string) (io.ReaderAt, int64, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	hd := h.models[model]
	if hd == nil {
		return nil, 0, false
	}
	p, ok := hd.tensors[name]
	if !ok {
		return nil, 0, false
	}
	return io.NewSectionReader(p.f, p.off, p.size), p.size, true
}
