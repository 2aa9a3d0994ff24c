package p2p

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
)

// WeightsProtocol serves a model's manifest and byte ranges of the tensors a node holds, so
// a joining node fetches its slice from its peers instead of the whole file from the hub.
//
// A stream carries requests and answers in turn:
//
//	request: [1 kind][32 model sha256][8 offset][4 length][1 name length][name]
//	answer:  [1 status][4 length][bytes]  (status ok: the bytes asked for; else a message)
//
// Every length is bounded before anything is read into memory. Bytes are not trusted by the
// fetcher: it checks them against the manifest, whose id it learned from the swarm.
const WeightsProtocol protocol.ID = "/strata/weights/1.0.0"

const (
	weightsManifest = 1
	weightsRange    = 2

	weightsOK       = 0
	weightsNotHeld  = 1
	weightsBadReq   = 2
	weightsInternal = 3

	// MaxWeightsChunk is the most bytes one range request may ask for.
	MaxWeightsChunk = 8 << 20
	// maxManifestAnswer bounds a manifest answer (weights.MaxManifestBytes, rounded up).
	maxManifestAnswer = 96 << 20
	maxWeightsMessage = 1 << 10
	weightsIdle       = time.Minute
	weightsIO         = 2 * time.Minute
)

// ErrNotHeld is returned when the peer does not hold what was asked for.
var ErrNotHeld = errors.New("peer does not hold it")

// WeightsSource is what a node serves on the weights protocol.
type WeightsSource interface {
	// Manifest is the encoded manifest of the model, if the node has one.
	Manifest(model [32]byte) ([]byte, bool)
	// Tensor opens the named tensor's bytes, from offset 0, and says its size.
	Tensor(model [32]byte, name string) (io.ReaderAt, int64, bool)
}

// WeightsStats counts the weights protocol's traffic on this host.
type WeightsStats struct {
	ServedBytes   uint64
	ServedChunks  uint64
	ReceivedBytes uint64 // tensor bytes received by this host's clients
}

type weightsServer struct {
	src   WeightsSource
	limit *Limiter
	stats *weightsCounters
	wg    sync.WaitGroup
}

type weightsCounters struct {
	served, chunks, received atomic.Uint64
}

// WeightsOption configures ServeWeights.
type WeightsOption func(*weightsServer)

// WithServeBandwidth caps the bytes per second this host sends on the weights protocol,
// shared by all streams, so serving weights leaves room for pipeline traffic.
func WithServeBandwidth(l *Limiter) WeightsOption {
	return func(s *weightsServer) { s.limit = l }
}

// ServeWeights serves src on the weights protocol. Calling it again replaces the source.
func (h *Host) ServeWeights(src WeightsSource, opts ...WeightsOption) {
	srv := &weightsServer{src: src, stats: h.weightCounters()}
	for _, o := range opts {
		o(srv)
	}
	h.h.SetStreamHandler(WeightsProtocol, func(s network.Stream) {
		srv.wg.Add(1)
		defer srv.wg.Done()
		if err := srv.serve(s); err != nil {
			h.log.Debug("weights stream ended", "peer", shortID(s.Conn().RemotePeer()), "err", err)
			s.Reset()
			return
		}
		s.Close()
	})
}

// WeightsStats reports this host's weights traffic.
func (h *Host) WeightsStats() WeightsStats {
	c := h.weightCounters()
	return WeightsStats{ServedBytes: c.served.Load(), ServedChunks: c.chunks.Load(), ReceivedBytes: c.received.Load()}
}

func (h *Host) weightCounters() *weightsCounters {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.weights == nil {
		h.weights = &weightsCounters{}
	}
	return h.weights
}

type weightsRequest struct {
	kind   byte
	model  [32]byte
	offset uint64
	length uint32
	name   string
}

func (srv *weightsServer) serve(s network.Stream) error {
	var fixed [1 + 32 + 8 + 4 + 1]byte
	var buf []byte
	defer func() {
		if buf != nil {
			s.Scope().ReleaseMemory(len(buf))
		}
	}()
	for {
		_ = s.SetReadDeadline(time.Now().Add(weightsIdle))
		if _, err := io.ReadFull(s, fixed[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return fmt.Errorf("read weights request: %w", err)
		}
		req := weightsRequest{kind: fixed[0]}
		copy(req.model[:], fixed[1:33])
		req.offset = binary.BigEndian.Uint64(fixed[33:41])
		req.length = binary.BigEndian.Uint32(fixed[41:45])
		name := make([]byte, fixed[45])
		if _, err := io.ReadFull(s, name); err != nil {
			return fmt.Errorf("read weights request: %w", err)
		}
		req.name = string(name)
		_ = s.SetWriteDeadline(time.Now().Add(weightsIO))
		switch req.kind {
		case weightsManifest:
			b, ok := srv.src.Manifest(req.model)
			if !ok {
				if err := writeWeightsAnswer(s, weightsNotHeld, []byte("no manifest for this model")); err != nil {
					return err
				}
				continue
			}
			if err := writeWeightsAnswer(s, weightsOK, b); err != nil {
				return err
			}
		case weightsRange:
			if req.length == 0 || req.length > MaxWeightsChunk {
				_ = writeWeightsAnswer(s, weightsBadReq, fmt.Appendf(nil, "range of %d bytes, limit %d", req.length, MaxWeightsChunk))
				return errors.New("bad range request")
			}
			ra, size, ok := srv.src.Tensor(req.model, req.name)
			if !ok {
				if err := writeWeightsAnswer(s, weightsNotHeld, fmt.Appendf(nil, "tensor %q not held", req.name)); err != nil {
					return err
				}
				continue
			}
			if req.offset > uint64(size) || uint64(req.length) > uint64(size)-req.offset {
				_ = writeWeightsAnswer(s, weightsBadReq, fmt.Appendf(nil, "range [%d,+%d) outside tensor %q of %d bytes", req.offset, req.length, req.name, size))
				return errors.New("bad range request")
			}
			if cap(buf) < int(req.length) {
				if buf != nil {
					s.Scope().ReleaseMemory(len(buf))
					buf = nil
				}
				if err := s.Scope().ReserveMemory(int(req.length), network.ReservationPriorityMedium); err != nil {
					_ = writeWeightsAnswer(s, weightsInternal, []byte("busy: out of memory for weights"))
					return fmt.Errorf("reserve weights buffer: %w", err)
				}
				buf = make([]byte, req.length)
			}
			chunk := buf[:req.length]
			if _, err := ra.ReadAt(chunk, int64(req.offset)); err != nil && !(err == io.EOF) {
				_ = writeWeightsAnswer(s, weightsInternal, []byte("read failed"))
				return fmt.Errorf("read tensor %q: %w", req.name, err)
			}
			if err := srv.limit.Wait(context.Background(), len(chunk)); err != nil {
				return err
			}
			if err := writeWeightsAnswer(s, weightsOK, chunk); err != nil {
				return err
			}
			srv.stats.served.Add(uint64(len(chunk)))
			srv.stats.chunks.Add(1)
		default:
			_ = writeWeightsAnswer(s, weightsBadReq, fmt.Appendf(nil, "unknown request kind %d", req.kind))
			return fmt.Errorf("unknown weights request kind %d", req.kind)
		}
	}
}

func writeWeightsAnswer(w io.Writer, status byte, b []byte) error {
	var hdr [5]byte
	hdr[0] = status
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(b)))
	if _, err := w.Write(hdr[:]); err != nil {
		return fmt.Errorf("write weights answer: %w", err)
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write weights answer: %w", err)
	}
	return nil
}

// WeightsConn is one stream to a peer on the weights protocol. It is not safe for
// concurrent use: a fetcher opens one per worker.
type WeightsConn struct {
	peer  peer.ID
	s     network.Stream
	limit *Limiter
	stats *weightsCounters
}

// OpenWeights opens a weights stream to p. limit, if not nil, caps the bytes per second
// received (shared by every conn given the same limiter).
func (h *Host) OpenWeights(ctx context.Context, p peer.AddrInfo, limit *Limiter) (*WeightsConn, error) {
	if err := h.Connect(ctx, p); err != nil {
		return nil, err
	}
	s, err := h.h.NewStream(ctx, p.ID, WeightsProtocol)
	if err != nil {
		return nil, fmt.Errorf("open weights stream to %s: %w", shortID(p.ID), err)
	}
	return &WeightsConn{peer: p.ID, s: s, limit: limit, stats: h.weightCounters()}, nil
}

// Peer is the peer the conn talks to.
func (c *WeightsConn) Peer() peer.ID { return c.peer }

// Close ends the stream.
func (c *WeightsConn) Close() error { return c.s.Close() }

// Reset aborts the stream.
func (c *WeightsConn) Reset() error { return c.s.Reset() }

// Manifest asks for the model's encoded manifest. The caller checks it against its id.
func (c *WeightsConn) Manifest(ctx context.Context, model [32]byte) ([]byte, error) {
	return c.roundTrip(ctx, weightsRequest{kind: weightsManifest, model: model}, nil, maxManifestAnswer)
}

// ReadRange fills dst with the tensor's bytes from offset off.
func (c *WeightsConn) ReadRange(ctx context.Context, model [32]byte, name string, off int64, dst []byte) error {
	if len(dst) == 0 || len(dst) > MaxWeightsChunk || len(name) > 255 || off < 0 {
		return fmt.Errorf("weights range request: %d bytes of %q at %d out of bounds", len(dst), name, off)
	}
	_, err := c.roundTrip(ctx, weightsRequest{kind: weightsRange, model: model, offset: uint64(off), length: uint32(len(dst)), name: name}, dst, len(dst))
	return err
}

// roundTrip sends req and reads the answer into dst (or a new buffer when dst is nil).
func (c *WeightsConn) roundTrip(ctx context.Context, req weightsRequest, dst []byte, limit int) ([]byte, error) {
	stop := context.AfterFunc(ctx, func() { c.s.Reset() })
	defer stop()
	b := make([]byte, 0, 46+len(req.name))
	b = append(b, req.kind)
	b = append(b, req.model[:]...)
	b = binary.BigEndian.AppendUint64(b, req.offset)
	b = binary.BigEndian.AppendUint32(b, req.length)
	b = append(b, byte(len(req.name)))
	b = append(b, req.name...)
	_ = c.s.SetDeadline(time.Now().Add(weightsIO))
	if _, err := c.s.Write(b); err != nil {
		return nil, ctxOr(ctx, fmt.Errorf("weights request to %s: %w", shortID(c.peer), err))
	}
	var hdr [5]byte
	if _, err := io.ReadFull(c.s, hdr[:]); err != nil {
		return nil, ctxOr(ctx, fmt.Errorf("weights answer from %s: %w", shortID(c.peer), noEOF(err)))
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if hdr[0] != weightsOK {
		if n > maxWeightsMessage {
			return nil, fmt.Errorf("weights answer from %s: error message of %d bytes", shortID(c.peer), n)
		}
		msg := make([]byte, n)
		if _, err := io.ReadFull(c.s, msg); err != nil {
			return nil, ctxOr(ctx, fmt.Errorf("weights answer from %s: %w", shortID(c.peer), noEOF(err)))
		}
		if hdr[0] == weightsNotHeld {
			return nil, fmt.Errorf("%s: %w: %s", shortID(c.peer), ErrNotHeld, msg)
		}
		return nil, fmt.Errorf("weights request refused by %s: %s", shortID(c.peer), msg)
	}
	if n > limit || (dst != nil && n != len(dst)) {
		return nil, fmt.Errorf("weights answer from %s: %d bytes, asked for %d (limit %d)", shortID(c.peer), n, len(dst), limit)
	}
	if dst == nil {
		dst = make([]byte, n)
	}
	// Read in pieces so the bandwidth cap paces the stream rather than its bursts.
	for got := 0; got < n; {
		k := min(n-got, 256<<10)
		if err := c.limit.Wait(ctx, k); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c.s, dst[got:got+k]); err != nil {
			return nil, ctxOr(ctx, fmt.Errorf("weights answer from %s: %w", shortID(c.peer), noEOF(err)))
		}
		got += k
		if req.kind == weightsRange {
			c.stats.received.Add(uint64(k))
		}
	}
	return dst, nil
}

// addWeightsLimits gives the weights protocol its own resource-manager budget: a few
// streams per peer (a fetcher runs one per worker) and a chunk buffer each.
func addWeightsLimits(limits *rcmgr.ScalingLimitConfig) {
	limits.AddProtocolLimit(WeightsProtocol,
		rcmgr.BaseLimit{StreamsInbound: 256, StreamsOutbound: 256, Streams: 512, Memory: 64 * MaxWeightsChunk},
		rcmgr.BaseLimitIncrease{})
	limits.AddProtocolPeerLimit(WeightsProtocol,
		rcmgr.BaseLimit{StreamsInbound: 32, StreamsOutbound: 32, Streams: 64, Memory: 16 * MaxWeightsChunk},
		rcmgr.BaseLimitIncrease{})
}
