package peerfetch

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/internal/progress"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
)

// RangeReader reads byte ranges of a remote whole model file (fetch.Remote).
type RangeReader interface {
	ReadRange(ctx context.Context, off int64, p []byte) error
	Size() int64
}

// HubSource names the hub as a source of bytes (WithSourceBytes).
const HubSource = "hub"

// HubStats is what FetchFromHub did.
type HubStats struct {
	HeaderBytes int64 // bytes read to parse the GGUF header
	TensorBytes int64 // tensor bytes read
	SliceBytes  int64 // tensor bytes in the slice
	Verified    bool  // every tensor matched a manifest
}

// FetchFromHub writes the slice of r from a remote whole file, reading its GGUF header and
// then only the slice's tensor ranges. modelSHA256 names the model the slice is cut from. A
// slice read in ranges cannot be checked against the whole file's sha256: with a manifest
// (WithManifest, checked against req.ManifestID) each tensor is checked against it;
// without, the slice is unverified, which the log says.
func FetchFromHub(ctx context.Context, req Request, src RangeReader, opts ...Option) (HubStats, error) {
	cfg := config{chunk: 4 << 20}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.log == nil {
		cfg.log = defaultLogger()
	}
	var st HubStats
	size := src.Size()
	if size <= 0 {
		return st, errors.New("fetch slice from hub: remote file of unknown size")
	}
	var man *weights.Manifest
	if cfg.manifest != nil {
		f := &fetcher{cfg: cfg, req: req}
		m, err := f.check(cfg.manifest)
		if err != nil {
			return st, fmt.Errorf("fetch slice from hub: %w", err)
		}
		man = m
	}
	var meta *fsggml.GGML
	var err error
	if cfg.header != nil {
		meta, err = weights.ParseHeader(cfg.header, size)
	} else {
		meta, _, st.HeaderBytes, err = RemoteHeader(ctx, src)
	}
	if err != nil {
		return st, fmt.Errorf("fetch slice from hub: %w", err)
	}
	info, err := shard.ModelInfoOf(meta, size)
	if err != nil {
		return st, fmt.Errorf("fetch slice from hub: %w", err)
	}
	if err := req.Range.Validate(info.Layers); err != nil {
		return st, fmt.Errorf("fetch slice from hub: %w", err)
	}
	for _, t := range shard.SliceTensors(meta, info, req.Range) {
		st.SliceBytes += int64(t.Size())
	}
	if man == nil {
		cfg.log.Warn("slice fetched from the hub alone: its tensors cannot be checked against the file's sha256, only the whole file could; it is checked once a peer has the model's manifest",
			"layers", req.Range.String(), "model", short(req.ModelSHA256))
	}
	base := int64(meta.Tensors().Offset)
	done := &progress.Counter{Total: st.SliceBytes, Report: cfg.report}
	var tensorBytes atomic.Int64
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	err = shard.WriteSliceFrom(ctx, meta, size, req.ModelSHA256, req.Range, req.Dst, func(t *fsggml.Tensor) io.WriterTo {
		return writerFunc(func(w io.Writer) (int64, error) {
			wa, ok := w.(io.WriterAt)
			if !ok {
				return 0, errors.New("slice writer cannot write at offsets")
			}
			n := int64(t.Size())
			h := sha256.New()
			buf := make([]byte, min(int64(cfg.chunk), n))
			for off := int64(0); off < n; {
				b := buf[:min(int64(len(buf)), n-off)]
				if err := src.ReadRange(ctx, base+int64(t.Offset)+off, b); err != nil {
					cancel()
					return off, fmt.Errorf("tensor %s: %w", t.Name, err)
				}
				tensorBytes.Add(int64(len(b)))
				done.Add(int64(len(b)))
				if cfg.perSrc != nil {
					cfg.perSrc(HubSource, int64(len(b)))
				}
				h.Write(b)
				if _, err := wa.WriteAt(b, off); err != nil {
					cancel()
					return off, err
				}
				off += int64(len(b))
			}
			if man != nil {
				mt, ok := man.Tensor(t.Name)
				if !ok || mt.Offset != base+int64(t.Offset) || mt.Size != n || [32]byte(h.Sum(nil)) != mt.SHA256 {
					cancel()
					return n, fmt.Errorf("tensor %s from the hub does not match the manifest", t.Name)
				}
			}
			return n, nil
		})
	})
	st.TensorBytes = tensorBytes.Load()
	st.Verified = err == nil && man != nil
	if err != nil {
		return st, fmt.Errorf("fetch slice %s from hub: %w", req.Range, err)
	}
	cfg.log.Info("fetched slice from the hub", "layers", req.Range.String(), "bytes", st.TensorBytes, "slice_bytes", st.SliceBytes,
		"header_bytes", st.HeaderBytes, "verified", st.Verified)
	return st, nil
}

// RemoteHeader reads and decodes the GGUF header of a remote file, in 256 KiB ranges, and
// returns its bytes (those before the first tensor) and how many bytes it read.
func RemoteHeader(ctx context.Context, src RangeReader) (meta *fsggml.GGML, hdr []byte, read int64, err error) {
	br := &blockReader{ctx: ctx, src: src, size: src.Size(), block: 256 << 10}
	meta, err = gguf.Decode(io.NewSectionReader(br, 0, src.Size()))
	if err != nil {
		return nil, nil, br.read.Load(), fmt.Errorf("header: %w", err)
	}
	hdr = make([]byte, meta.Tensors().Offset)
	if _, err := br.ReadAt(hdr, 0); err != nil {
		return nil, nil, br.read.Load(), fmt.Errorf("header: %w", err)
	}
	return meta, hdr, br.read.Load(), nil
}

type writerFunc func(io.Writer) (int64, error)

func (f writerFunc) WriteTo(w io.Writer) (int64, error) { return f(w) }

// blockReader is an io.ReaderAt over a RangeReader that reads whole blocks and keeps them,
// so the GGUF decoder's many small reads of the header cost a few requests.
type blockReader struct {
	ctx   context.Context
	src   RangeReader
	size  int64
	block int64
	read  atomic.Int64

	mu     sync.Mutex
	blocks map[int64][]byte
}

func (b *blockReader) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.blocks == nil {
		b.blocks = map[int64][]byte{}
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= b.size {
			return n, io.EOF
		}
		i := pos / b.block
		blk, ok := b.blocks[i]
		if !ok {
			start := i * b.block
			blk = make([]byte, min(b.block, b.size-start))
			if err := b.src.ReadRange(b.ctx, start, blk); err != nil {
				return n, err
			}
			b.read.Add(int64(len(blk)))
			b.blocks[i] = blk
		}
		n += copy(p[n:], blk[pos-i*b.block:])
	}
	return n, nil
}
