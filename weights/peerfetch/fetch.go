// Package peerfetch writes a node's slice of a model from the tensors its peers hold: it
// gets the manifest, checks it against the id the swarm gossips, fetches each tensor of the
// slice in chunks from the peers holding it, resumes from another peer when a stream breaks,
// checks every tensor against the manifest and drops a peer whose bytes do not match.
package peerfetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/progress"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
)

// Conn is one stream to a source. It is used by one goroutine at a time.
type Conn interface {
	Manifest(ctx context.Context, model [32]byte) ([]byte, error)
	ReadRange(ctx context.Context, model [32]byte, name string, off int64, dst []byte) error
	Close() error
	Reset() error
}

// Source is a place the slice's tensors may come from: a peer serving the whole model or a
// slice of it.
type Source struct {
	Name  string
	Open  func(ctx context.Context) (Conn, error)
	Holds func(tensor string) bool // nil: every tensor
	// IsNotHeld recognizes the error a source answers for a tensor it lacks; nil: none.
	IsNotHeld func(error) bool
}

// Request is what to fetch.
type Request struct {
	ModelSHA256 string      // the whole model's sha256 (hex)
	ManifestID  string      // the manifest's id (hex), or at least its first 32 digits, as the swarm gossips it
	Range       shard.Range // the layers of the slice
	Dst         string      // where the slice file goes (written atomically)
}

// Stats is what a fetch did.
type Stats struct {
	ManifestBytes int64            // the manifest's encoding, once
	TensorBytes   int64            // tensor bytes received, every attempt counted
	SliceBytes    int64            // tensor bytes in the slice
	PerSource     map[string]int64 // tensor bytes received from each source
	Dropped       []string         // sources whose bytes failed the check
	Resumed       int              // chunks fetched again from another source after a broken stream
}

// Option configures Fetch.
type Option func(*config)

type config struct {
	chunk    int
	report   func(float32)
	log      *slog.Logger
	manifest []byte
	perSrc   func(source string, n int64)
	header   []byte
}

// WithChunk sets the bytes of one range request (default 4 MiB).
func WithChunk(n int) Option { return func(c *config) { c.chunk = n } }

// WithProgress reports the fraction of the slice's tensor bytes received.
func WithProgress(f func(float32)) Option { return func(c *config) { c.report = f } }

// WithSourceBytes reports each chunk's bytes as it arrives, with the source that sent it
// (a peer's ID, or "hub"), for a live view of who serves a fetch.
func WithSourceBytes(f func(source string, n int64)) Option { return func(c *config) { c.perSrc = f } }

// WithHeader gives FetchFromHub the model's GGUF header (bytes before the first tensor),
// cached from an earlier read, so it reads only tensor ranges.
func WithHeader(hdr []byte) Option { return func(c *config) { c.header = hdr } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.log = l } }

// WithManifest uses an encoded manifest the caller already has (it is still checked
// against the request's id) instead of asking the sources.
func WithManifest(b []byte) Option { return func(c *config) { c.manifest = b } }

// maxFailures is how many broken streams or failed opens in a row make a source dead for
// this fetch.
const maxFailures = 3

type source struct {
	Source
	mu      sync.Mutex
	active  int
	fails   int
	dead    bool
	corrupt bool
	notHeld map[string]bool
	idle    []Conn
	bytes   atomic.Int64
}

type fetcher struct {
	cfg     config
	req     Request
	model   [32]byte
	mu      sync.Mutex
	srcs    []*source
	dropped []string
	resumed atomic.Int64
	bytes   atomic.Int64
	done    *progress.Counter
	cancel  context.CancelFunc // stops the other tensors' fetches once one fails
}

// Fetch writes the slice file of req.Range at req.Dst from the sources. A slice is written
// only when every one of its tensors matched the manifest.
func Fetch(ctx context.Context, req Request, sources []Source, opts ...Option) (Stats, error) {
	cfg := config{chunk: 4 << 20, log: slog.Default()}
	for _, o := range opts {
		o(&cfg)
	}
	var st Stats
	if cfg.chunk <= 0 || cfg.chunk > 8<<20 {
		return st, fmt.Errorf("fetch slice: chunk of %d bytes", cfg.chunk)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	f := &fetcher{cfg: cfg, req: req, cancel: cancel}
	b, err := hex.DecodeString(req.ModelSHA256)
	if err != nil || len(b) != 32 {
		return st, fmt.Errorf("fetch slice: model sha256 %q is not 64 hex digits", req.ModelSHA256)
	}
	copy(f.model[:], b)
	if len(req.ManifestID) < 32 {
		return st, fmt.Errorf("fetch slice: manifest id %q: want at least 32 hex digits to check the manifest against", req.ManifestID)
	}
	for _, s := range sources {
		f.srcs = append(f.srcs, &source{Source: s, notHeld: map[string]bool{}})
	}
	defer f.closeIdle()

	enc, m, err := f.manifest(ctx)
	if err != nil {
		f.mu.Lock()
		st.Dropped = slices.Clone(f.dropped)
		f.mu.Unlock()
		return st, err
	}
	st.ManifestBytes = int64(len(enc))
	meta, err := m.Parse()
	if err != nil {
		return st, fmt.Errorf("fetch slice: manifest %s: %w", short(req.ManifestID), err)
	}
	info, err := shard.ModelInfoOf(meta, m.FileSize)
	if err != nil {
		return st, fmt.Errorf("fetch slice: %w", err)
	}
	if err := req.Range.Validate(info.Layers); err != nil {
		return st, fmt.Errorf("fetch slice: %w", err)
	}
	for _, t := range shard.SliceTensors(meta, info, req.Range) {
		st.SliceBytes += int64(t.Size())
	}
	f.done = &progress.Counter{Total: st.SliceBytes, Report: cfg.report}
	cfg.log.Info("fetching slice from peers", "model", short(req.ModelSHA256), "layers", req.Range.String(),
		"bytes", st.SliceBytes, "sources", len(sources))
	err = shard.WriteSliceFrom(ctx, meta, m.FileSize, req.ModelSHA256, req.Range, req.Dst, func(t *fsggml.Tensor) io.WriterTo {
		mt, _ := m.Tensor(t.Name) // Parse checked that the header and the manifest agree
		return &tensorWriter{ctx: ctx, f: f, t: mt}
	})
	st.TensorBytes = f.bytes.Load()
	st.Resumed = int(f.resumed.Load())
	st.PerSource = map[string]int64{}
	for _, s := range f.srcs {
		st.PerSource[s.Name] += s.bytes.Load()
	}
	f.mu.Lock()
	st.Dropped = slices.Clone(f.dropped)
	f.mu.Unlock()
	if err != nil {
		return st, fmt.Errorf("fetch slice %s of %s: %w", req.Range, short(req.ModelSHA256), err)
	}
	cfg.log.Info("fetched slice", "layers", req.Range.String(), "bytes", st.TensorBytes, "slice_bytes", st.SliceBytes,
		"dropped", st.Dropped, "resumed_chunks", st.Resumed)
	return st, nil
}

// manifest gets the manifest from the first source whose answer has the gossiped id.
// check decodes an encoded manifest that must have the requested id and model.
func (f *fetcher) check(b []byte) (*weights.Manifest, error) {
	if len(f.req.ManifestID) < 32 {
		return nil, fmt.Errorf("manifest id %q: want at least 32 hex digits", f.req.ManifestID)
	}
	if id := weights.ID(b); !strings.HasPrefix(id, f.req.ManifestID) {
		return nil, fmt.Errorf("manifest id %s, want %s", short(id), short(f.req.ManifestID))
	}
	m, err := weights.Decode(b)
	if err != nil {
		return nil, err
	}
	if m.ModelSHA256 != f.req.ModelSHA256 {
		return nil, fmt.Errorf("manifest of model %s, want %s", short(m.ModelSHA256), short(f.req.ModelSHA256))
	}
	return m, nil
}

func defaultLogger() *slog.Logger { return slog.Default() }

func (f *fetcher) manifest(ctx context.Context) ([]byte, *weights.Manifest, error) {
	check := f.check
	if f.cfg.manifest != nil {
		m, err := check(f.cfg.manifest)
		if err != nil {
			return nil, nil, fmt.Errorf("fetch slice: %w", err)
		}
		return f.cfg.manifest, m, nil
	}
	var errs []error
	for _, s := range f.srcs {
		c, err := s.Open(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Name, err))
			continue
		}
		b, err := c.Manifest(ctx, f.model)
		if err != nil {
			c.Reset()
			errs = append(errs, fmt.Errorf("%s: %w", s.Name, err))
			continue
		}
		s.put(c)
		m, err := check(b)
		if err != nil {
			f.drop(s, err)
			errs = append(errs, fmt.Errorf("%s: %w", s.Name, err))
			continue
		}
		return b, m, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	return nil, nil, fmt.Errorf("fetch slice: no source answered manifest %s: %w", short(f.req.ManifestID), errors.Join(errs...))
}

// FetchManifest gets the model's manifest from the first source whose answer has the id
// (or id prefix of at least 32 hex digits), and decodes it. A source answering another is
// reported in dropped.
func FetchManifest(ctx context.Context, modelSHA256, id string, sources []Source, log *slog.Logger) (enc []byte, m *weights.Manifest, dropped []string, err error) {
	if len(id) < 32 {
		return nil, nil, nil, fmt.Errorf("fetch manifest: id %q: want at least 32 hex digits", id)
	}
	if log == nil {
		log = slog.Default()
	}
	f := &fetcher{cfg: config{log: log}, req: Request{ModelSHA256: modelSHA256, ManifestID: id}}
	if b, err := hex.DecodeString(modelSHA256); err != nil || len(b) != 32 {
		return nil, nil, nil, fmt.Errorf("fetch manifest: model sha256 %q is not 64 hex digits", modelSHA256)
	} else {
		copy(f.model[:], b)
	}
	for _, s := range sources {
		f.srcs = append(f.srcs, &source{Source: s, notHeld: map[string]bool{}})
	}
	defer f.closeIdle()
	enc, m, err = f.manifest(ctx)
	return enc, m, f.dropped, err
}

// drop stops using s for this model: its bytes failed a check.
func (f *fetcher) drop(s *source, why error) {
	s.mu.Lock()
	already := s.corrupt
	s.corrupt = true
	s.mu.Unlock()
	if already {
		return
	}
	f.mu.Lock()
	f.dropped = append(f.dropped, s.Name)
	f.mu.Unlock()
	f.cfg.log.Warn("dropping weights source: its bytes fail the manifest's check", "source", s.Name, "model", short(f.req.ModelSHA256), "err", why)
}

// acquire picks the least busy usable source of the tensor, preferring those not in avoid,
// and a conn to it.
func (f *fetcher) acquire(ctx context.Context, name string, avoid []*source) (*source, Conn, error) {
	for {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		var best *source
		bestAvoided := true
		for _, s := range f.srcs {
			s.mu.Lock()
			ok := !s.dead && !s.corrupt && !s.notHeld[name] && (s.Holds == nil || s.Holds(name))
			active := s.active
			s.mu.Unlock()
			if !ok {
				continue
			}
			avoided := slices.Contains(avoid, s)
			if best == nil || (bestAvoided && !avoided) || (avoided == bestAvoided && active < best.active) {
				best, bestAvoided = s, avoided
			}
		}
		if best == nil {
			return nil, nil, fmt.Errorf("no source left for tensor %q", name)
		}
		best.mu.Lock()
		best.active++
		var c Conn
		if n := len(best.idle); n > 0 {
			c, best.idle = best.idle[n-1], best.idle[:n-1]
		}
		best.mu.Unlock()
		if c != nil {
			return best, c, nil
		}
		c, err := best.Open(ctx)
		if err == nil {
			return best, c, nil
		}
		f.failed(best, nil, name, err)
	}
}

// release hands a conn back after a success.
func (s *source) release(c Conn) {
	s.mu.Lock()
	s.active--
	s.fails = 0
	s.mu.Unlock()
	s.put(c)
}

func (s *source) put(c Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead || s.corrupt || len(s.idle) >= 8 {
		c.Close()
		return
	}
	s.idle = append(s.idle, c)
}

// failed records a broken stream (or open) of s; c, if not nil, is reset.
func (f *fetcher) failed(s *source, c Conn, name string, err error) {
	if c != nil {
		c.Reset()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active--
	f.cfg.log.Debug("weights source failed", "source", s.Name, "tensor", name, "err", err)
	if s.IsNotHeld != nil && s.IsNotHeld(err) {
		s.notHeld[name] = true
		return
	}
	s.fails++
	if s.fails >= maxFailures && !s.dead {
		s.dead = true
		for _, ic := range s.idle {
			ic.Reset()
		}
		s.idle = nil
		f.cfg.log.Warn("weights source failed, fetching from the others", "source", s.Name, "err", err)
	}
}

func (f *fetcher) closeIdle() {
	for _, s := range f.srcs {
		s.mu.Lock()
		for _, c := range s.idle {
			c.Close()
		}
		s.idle = nil
		s.mu.Unlock()
	}
}

// tensorWriter fetches one tensor into its place in the slice file.
type tensorWriter struct {
	ctx context.Context
	f   *fetcher
	t   weights.Tensor
}

// attempt is one pass over a tensor: who served each chunk and what it hashed to, so that
// once some pass verifies, the sources of a failed mixed pass can be judged chunk by chunk.
type attempt struct {
	srcs []*source
	sums [][32]byte
}

func (tw *tensorWriter) WriteTo(w io.Writer) (int64, error) {
	n, err := tw.writeTo(w)
	if err != nil {
		tw.f.cancel()
	}
	return n, err
}

func (tw *tensorWriter) writeTo(w io.Writer) (int64, error) {
	wa, ok := w.(io.WriterAt)
	if !ok {
		return 0, errors.New("slice writer cannot write at offsets")
	}
	f, t, ctx := tw.f, tw.t, tw.ctx
	chunk := int64(f.cfg.chunk)
	nchunks := int((t.Size + chunk - 1) / chunk)
	buf := make([]byte, min(chunk, t.Size))
	var failed []attempt
	var avoid []*source
	for try := 0; try < 2*len(f.srcs)+2; try++ {
		at := attempt{srcs: make([]*source, nchunks), sums: make([][32]byte, nchunks)}
		h := sha256.New()
		var (
			cur *source
			c   Conn
		)
		for i := 0; i < nchunks; {
			if cur == nil {
				var err error
				if cur, c, err = f.acquire(ctx, t.Name, avoid); err != nil {
					return 0, err
				}
				if i > 0 {
					f.resumed.Add(1)
				}
			}
			off := int64(i) * chunk
			b := buf[:min(chunk, t.Size-off)]
			if err := c.ReadRange(ctx, f.model, t.Name, off, b); err != nil {
				f.failed(cur, c, t.Name, err)
				cur, c = nil, nil
				if err := ctx.Err(); err != nil {
					return 0, err
				}
				continue // resume this chunk from another source, or this one again
			}
			f.bytes.Add(int64(len(b)))
			cur.bytes.Add(int64(len(b)))
			f.done.Add(int64(len(b)))
			if f.cfg.perSrc != nil {
				f.cfg.perSrc(cur.Name, int64(len(b)))
			}
			h.Write(b)
			at.srcs[i], at.sums[i] = cur, sha256.Sum256(b)
			if _, err := wa.WriteAt(b, off); err != nil {
				cur.release(c)
				return 0, fmt.Errorf("write %s: %w", t.Name, err)
			}
			i++
		}
		if cur != nil {
			cur.release(c)
		}
		if [32]byte(h.Sum(nil)) == t.SHA256 {
			for _, a := range failed {
				for i, s := range a.srcs {
					if a.sums[i] != at.sums[i] {
						f.drop(s, fmt.Errorf("chunk %d of %s differs from the verified bytes", i, t.Name))
					}
				}
			}
			return t.Size, nil
		}
		var used []*source
		for _, s := range at.srcs {
			if !slices.Contains(used, s) {
				used = append(used, s)
			}
		}
		if len(used) == 1 {
			f.drop(used[0], fmt.Errorf("tensor %s does not match the manifest's sha256", t.Name))
		} else {
			// Several sources served this pass: refetch, preferring others, and judge them
			// chunk by chunk once a pass verifies.
			failed = append(failed, at)
			f.cfg.log.Warn("tensor from several sources fails its check; fetching it again", "tensor", t.Name)
		}
		avoid = used
	}
	return 0, fmt.Errorf("tensor %s: no source served bytes matching the manifest", t.Name)
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}
