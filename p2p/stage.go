package p2p

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// StageProtocol is the libp2p protocol of the stage chain. One stream carries one session
// between two neighbours of its route, for the session's whole life:
//
//	entry --open(rest of route)--> S1 --open(rest)--> S2 ... --> Sn
//	entry <------opened----------- S1 <---opened----- S2 ... <-- Sn
//	entry --forward(tokens)------> S1 --forward(acts)> S2 ... --> Sn (samples)
//	entry <------result----------- S1 <---result----- S2 ... <-- Sn
//
// A stage answers every forward with exactly one result or error, so a stream has at most
// one step in flight. close tears the chain down from the tail (each stage closes its stream
// after the one downstream has); cancel, a reset or a dead connection abort it at once.
const StageProtocol protocol.ID = "/strata/stage/1.0.0"

// Executor runs one slice of a model: shard.Stage, or anything with its contract.
type Executor interface {
	Info() shard.StageInfo
	OpenSession(id uint64) error
	CloseSession(id uint64) error
	Forward(ctx context.Context, step shard.Step) (shard.Output, error)
}

// StageOption configures ServeStage. The options of the first ServeStage call on a host
// apply to every stage it serves.
type StageOption func(*stageConfig)

type stageConfig struct {
	maxSessionsPerPeer int
	maxInflightPerPeer int64
	maxInflightTotal   int64
	openTimeout        time.Duration
	idleTimeout        time.Duration
	frameTimeout       time.Duration
	closeTimeout       time.Duration
	maxHeader          int
	maxPayload         int
}

// WithMaxSessionsPerPeer caps the sessions one peer may have open on this node (default 64).
func WithMaxSessionsPerPeer(n int) StageOption {
	return func(c *stageConfig) { c.maxSessionsPerPeer = n }
}

// WithMaxInflightBytes caps the bytes one peer's frames may hold on this node at once, over
// all its sessions (default 256 MiB): a frame's payload, its decoded activations and what
// the stage encodes from them. A frame over it is refused with CodeBusy, its payload unread.
func WithMaxInflightBytes(n int64) StageOption {
	return func(c *stageConfig) { c.maxInflightPerPeer = n }
}

// WithMaxInflightTotal caps the same bytes over all peers (default 1 GiB), so that peers
// opening sessions from many identities cannot add up to more than that. Keep it a few times
// the per-peer cap: one peer can fill its own share, and a node whose total cap it alone
// could fill would refuse every other peer's frames meanwhile.
func WithMaxInflightTotal(n int64) StageOption {
	return func(c *stageConfig) { c.maxInflightTotal = n }
}

// WithStageTimeouts sets how long a stage waits for an open to complete downstream (default
// 30 s), for the next frame of an idle session before closing it (default 10 min), and for
// the rest of a frame once it started (default 30 s). Zero keeps a default.
func WithStageTimeouts(open, idle, frame time.Duration) StageOption {
	return func(c *stageConfig) {
		if open > 0 {
			c.openTimeout = open
		}
		if idle > 0 {
			c.idleTimeout = idle
		}
		if frame > 0 {
			c.frameTimeout = frame
		}
	}
}

// WithStageFrameLimits bounds frame headers and payloads (defaults DefaultMaxHeader and
// DefaultMaxPayload).
func WithStageFrameLimits(maxHeader, maxPayload int) StageOption {
	return func(c *stageConfig) { c.maxHeader, c.maxPayload = maxHeader, maxPayload }
}

func (c stageConfig) frameOptions() []FrameOption {
	return []FrameOption{WithMaxHeader(c.maxHeader), WithMaxPayload(c.maxPayload), WithFrameTimeout(c.frameTimeout)}
}

// Observer is told about a host's stage traffic, for metrics. It is called from stream
// goroutines, many at once, on the hot path: its methods must be quick and safe for
// concurrent use.
type Observer interface {
	// HopStep: a step sent to next (the first stage, from an entry's route; the next stage,
	// from a stage) was answered with a result d after it was sent. d includes every stage
	// after next, so the difference between consecutive hops is one hop's own share.
	HopStep(next peer.ID, d time.Duration)
	// WireBytes: stage protocol bytes read (in) and written (out) on libp2p streams; hops to
	// the host's own stage go through memory and are not counted.
	WireBytes(in, out int)
}

// WithObserver reports the host's stage traffic to o.
func WithObserver(o Observer) Option { return func(c *hostConfig) { c.observer = o } }

// countedStream reports the bytes that cross a stage stream. Embedding keeps the stream's
// deadlines, which the frame reader and writer rely on.
type countedStream struct {
	network.Stream
	obs Observer
}

func (s countedStream) Read(b []byte) (int, error) {
	n, err := s.Stream.Read(b)
	if n > 0 {
		s.obs.WireBytes(n, 0)
	}
	return n, err
}

func (s countedStream) Write(b []byte) (int, error) {
	n, err := s.Stream.Write(b)
	if n > 0 {
		s.obs.WireBytes(0, n)
	}
	return n, err
}

func (h *Host) counted(s network.Stream) stream {
	if h.cfg.observer == nil {
		return s
	}
	return countedStream{Stream: s, obs: h.cfg.observer}
}

func (h *Host) observeHop(next peer.ID, since time.Time) {
	if h.cfg.observer != nil {
		h.cfg.observer.HopStep(next, time.Since(since))
	}
}

// StageStats counts a host's stage traffic.
type StageStats struct {
	Sessions int               // open now
	Inflight int64             // bytes frames hold on this node now (WithMaxInflightTotal)
	Opened   uint64            // sessions opened since start
	Steps    uint64            // forwards completed
	Rejected map[string]uint64 // refusals by ErrorCode name, plus "reset" for streams that died
}

type stageKey struct {
	model string
	r     shard.Range
}

type stageServer struct {
	h   *Host
	cfg stageConfig
	log *slog.Logger

	mu       sync.Mutex
	execs    map[stageKey]Executor
	peers    map[peer.ID]*peerLoad
	sessions map[*stageSession]struct{}
	inflight int64 // over all peers
	closed   bool
	wg       sync.WaitGroup

	bytes  bufPool[byte]
	floats bufPool[float32]

	nextLocal atomic.Uint64
	opened    atomic.Uint64
	steps     atomic.Uint64
	rejected  [codeEnd]atomic.Uint64
	resets    atomic.Uint64
}

// ServeStage makes this host serve exec's layers on the stage protocol. A host can serve
// several stages (different models or ranges); a session picks one by model digest and range.
func (h *Host) ServeStage(exec Executor, opts ...StageOption) error {
	info := exec.Info()
	if info.Range.Empty() || info.Range.End > info.Layers || info.Hidden <= 0 || (info.Last() && info.Vocab <= 0) {
		return fmt.Errorf("serve stage: bad stage info %+v", info)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stage == nil {
		cfg := stageConfig{
			maxSessionsPerPeer: 64,
			maxInflightPerPeer: 256 << 20,
			maxInflightTotal:   1 << 30,
			openTimeout:        30 * time.Second,
			idleTimeout:        10 * time.Minute,
			frameTimeout:       DefaultFrameTimeout,
			closeTimeout:       10 * time.Second,
			maxHeader:          DefaultMaxHeader,
			maxPayload:         DefaultMaxPayload,
		}
		for _, o := range opts {
			o(&cfg)
		}
		srv := &stageServer{
			h: h, cfg: cfg, log: h.log,
			execs:    map[stageKey]Executor{},
			peers:    map[peer.ID]*peerLoad{},
			sessions: map[*stageSession]struct{}{},
			bytes:    bufPool[byte]{elem: 1},
			floats:   bufPool[float32]{elem: 4},
		}
		// Executor session ids are the server's own, never the entry's: two entries may pick
		// the same id, and a stream can only ever reach the session it opened.
		var seed [8]byte
		_, _ = rand.Read(seed[:])
		srv.nextLocal.Store(binary.LittleEndian.Uint64(seed[:]) >> 2)
		h.stage = srv
		h.h.SetStreamHandler(StageProtocol, func(s network.Stream) {
			srv.serve(h.counted(s), s.Conn().RemotePeer())
		})
	}
	key := stageKey{info.ModelSHA256, info.Range}
	srv := h.stage
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if _, dup := srv.execs[key]; dup {
		return fmt.Errorf("serve stage: layers %s of model %q are already served", info.Range, info.ModelSHA256)
	}
	srv.execs[key] = exec
	h.log.Info("serving stage", "model", short(info.ModelSHA256), "layers", info.Range.String(), "of", info.Layers)
	if info.MaxBatch > 0 {
		// A full batch in f32 asking for logits is the largest frame a session may send.
		payload := 0
		if !info.First() {
			payload = 4 * info.MaxBatch * info.Hidden
		}
		if need := frameCost(info, quant.CodecF32, info.MaxBatch, payload, true); need > min(srv.cfg.maxInflightPerPeer, srv.cfg.maxInflightTotal) {
			h.log.Warn("a full batch needs more memory than the in-flight caps allow: such steps will be refused as busy",
				"layers", info.Range.String(), "need", need, "per_peer", srv.cfg.maxInflightPerPeer, "total", srv.cfg.maxInflightTotal)
		}
	}
	return nil
}

// StopStage stops serving a stage and aborts its sessions. It reports whether it was served.
func (h *Host) StopStage(model string, r shard.Range) bool {
	h.mu.Lock()
	srv := h.stage
	h.mu.Unlock()
	if srv == nil {
		return false
	}
	key := stageKey{model, r}
	srv.mu.Lock()
	exec, ok := srv.execs[key]
	delete(srv.execs, key)
	var victims []*stageSession
	for ss := range srv.sessions {
		if ok && ss.exec == exec {
			victims = append(victims, ss)
		}
	}
	srv.mu.Unlock()
	for _, ss := range victims {
		ss.cancel(errStopping)
	}
	return ok
}

// Stats returns the stage counters (zero if the host serves no stage).
func (h *Host) Stats() StageStats {
	h.mu.Lock()
	srv := h.stage
	h.mu.Unlock()
	st := StageStats{Rejected: map[string]uint64{}}
	if srv == nil {
		return st
	}
	srv.mu.Lock()
	st.Sessions = len(srv.sessions)
	st.Inflight = srv.inflight
	srv.mu.Unlock()
	st.Opened = srv.opened.Load()
	st.Steps = srv.steps.Load()
	for c := ErrorCode(1); c < codeEnd; c++ {
		if n := srv.rejected[c].Load(); n > 0 {
			st.Rejected[c.String()] = n
		}
	}
	if n := srv.resets.Load(); n > 0 {
		st.Rejected["reset"] = n
	}
	return st
}

var (
	errStopping  = errors.New("stage stopped")
	errCancelled = errors.New("cancelled by upstream")
	errBusyPeer  = errors.New("too many bytes in flight from this peer")
	errBusyHost  = errors.New("too many bytes in flight on this node")
)

// stop refuses new sessions and aborts the open ones; the host then closes its connections
// and waits for srv.wg.
func (srv *stageServer) stop() {
	srv.mu.Lock()
	srv.closed = true
	victims := make([]*stageSession, 0, len(srv.sessions))
	for ss := range srv.sessions {
		victims = append(victims, ss)
	}
	srv.mu.Unlock()
	srv.h.h.RemoveStreamHandler(StageProtocol)
	for _, ss := range victims {
		ss.cancel(errStopping)
	}
}

func (srv *stageServer) lookup(model string, r shard.Range) (Executor, bool) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	e, ok := srv.execs[stageKey{model, r}]
	return e, ok
}

// stream is what a session needs of a libp2p stream; in-process hops use a pipe.
type stream interface {
	io.ReadWriteCloser
	CloseWrite() error
	CloseRead() error
	Reset() error
}

// stageSession is one session on one stage: the stream from upstream, the executor's
// session, and the stream to the next hop.
type stageSession struct {
	srv    *stageServer
	st     stream
	remote peer.ID
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelCauseFunc

	r *Reader
	w *Writer

	exec   Executor
	info   shard.StageInfo
	id     uint64 // the entry's id, in every frame of the session
	local  uint64 // the executor's id
	codec  quant.Codec
	maxCtx int
	next   *hop
	tag    string

	sampler  sample.Sampler
	bias     []sample.Bias
	acts     scratch[float32] // decoded activations
	out      scratch[byte]    // encoded activations or logits
	reply    Header
	graceful bool // closed by a close frame or upstream's half-close
	ended    bool // the stream was already closed after a final error frame
}

// hop is a stream to the next stage.
type hop struct {
	peer peer.ID
	st   stream
	r    *Reader
	w    *Writer
	fwd  Header // steps sent down; its Positions and Recent alias the upstream frame's
	hdr  Header // answers read back
	ans  scratch[byte]
}

// slot is a frame read ahead of the worker.
type slot struct {
	h        Header
	payload  []byte
	buf      scratch[byte] // payload's memory
	err      error
	refused  refusal // what check found wrong with the header; the payload was skipped
	cost     int64   // bytes the frame needs (frameCost)
	reserved int64   // of them, what it holds against the in-flight caps
}

// refusal is why a frame is answered with an error instead of being run.
type refusal struct {
	code ErrorCode
	msg  string
}

func (srv *stageServer) serve(st stream, remote peer.ID) {
	srv.wg.Add(1)
	defer srv.wg.Done()
	ctx, cancel := context.WithCancelCause(context.Background())
	ss := &stageSession{
		srv: srv, st: st, remote: remote, ctx: ctx, cancel: cancel,
		log: srv.log.With("from", shortID(remote)),
		r:   NewReader(st, append(srv.cfg.frameOptions(), WithIdleTimeout(srv.cfg.openTimeout))...),
		w:   NewWriter(st, srv.cfg.frameOptions()...),
	}
	defer cancel(nil)
	if !ss.open() {
		return
	}
	defer ss.finish()
	ss.r.cfg.idleTimeout = srv.cfg.idleTimeout
	ss.loop()
}

// reject answers a frame with an error and counts it.
func (ss *stageSession) reject(step uint64, code ErrorCode, format string, args ...any) error {
	ss.srv.rejected[code].Add(1)
	msg := fmt.Sprintf(format, args...)
	ss.log.Debug("refused frame", "code", code.String(), "msg", msg)
	h := &ss.reply
	*h = Header{Kind: KindError, Session: ss.id, Step: step, Code: code, Message: msg, Shape: h.Shape[:0]}
	return ss.w.WriteFrame(h, nil)
}

// fatal sends an error frame and ends the stream. It closes instead of resetting, because a
// reset can overtake the frame (yamux drops unread data on a reset) and the peer would never
// learn why.
func (ss *stageSession) fatal(step uint64, code ErrorCode, format string, args ...any) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ss.reject(step, code, format, args...)
	}()
	select {
	case <-done:
		ss.st.Close()
	case <-time.After(time.Second): // the peer is not reading
		ss.st.Reset()
	}
	ss.ended = true
}

// open reads and serves the open frame. It returns false when no session was opened (the
// stream is then closed or reset).
func (ss *stageSession) open() bool {
	h := &ss.reply
	if err := ss.r.ReadHeader(h); err != nil {
		ss.readFailed(0, err)
		return false
	}
	if h.Kind != KindOpen {
		code := CodeBadRequest
		if h.Kind >= kindEnd {
			code = CodeUnknownKind
		}
		ss.fatal(h.Step, code, "first frame of a stream must be open, got %s", h.Kind)
		return false
	}
	if h.PayloadLen > 0 {
		if err := ss.r.DiscardPayload(); err != nil {
			ss.readFailed(0, err)
			return false
		}
	}
	ss.id = h.Session
	ss.codec = h.Codec
	ss.maxCtx = h.MaxContext
	if !ss.codec.Valid() {
		ss.fatal(0, CodeBadCodec, "unknown activation codec %d", uint8(h.Codec))
		return false
	}
	exec, ok := ss.srv.lookup(h.Model, h.Range)
	if !ok {
		ss.fatal(0, CodeNoStage, "this node does not serve layers %s of model %s", h.Range, short(h.Model))
		return false
	}
	ss.exec, ss.info = exec, exec.Info()
	if ss.maxCtx > ss.info.MaxContext && ss.info.MaxContext > 0 {
		ss.fatal(0, CodeContextFull, "session wants %d tokens of context, this stage holds %d", ss.maxCtx, ss.info.MaxContext)
		return false
	}
	hops, err := parseHops(h.NextHops, h.NextRanges)
	if err != nil {
		ss.fatal(0, CodeBadRequest, "next hops: %v", err)
		return false
	}
	switch {
	case ss.info.Last() && len(hops) > 0:
		ss.fatal(0, CodeBadRequest, "route continues after the last layer (%d more hops)", len(hops))
		return false
	case !ss.info.Last() && len(hops) == 0:
		ss.fatal(0, CodeBadRequest, "route ends at layer %d of %d", ss.info.Range.End, ss.info.Layers)
		return false
	case len(hops) > 0 && hops[0].Range.Start != ss.info.Range.End:
		ss.fatal(0, CodeBadRequest, "next hop starts at layer %d, this stage ends at %d", hops[0].Range.Start, ss.info.Range.End)
		return false
	}
	if err := ss.srv.admit(ss); err != nil {
		code := CodeTooManySessions
		if errors.Is(err, errStopping) {
			code = CodeClosing
		}
		ss.fatal(0, code, "%v", err)
		return false
	}
	ss.local = ss.srv.nextLocal.Add(1)
	if err := ss.exec.OpenSession(ss.local); err != nil {
		ss.srv.leave(ss)
		ss.fatal(0, execCode(err), "open session: %v", err)
		return false
	}
	ss.log = ss.log.With("session", ss.id, "layers", ss.info.Range.String())
	maxCtx := ss.info.MaxContext
	if len(hops) > 0 {
		down, err := ss.openNext(hops, h.Model)
		if err != nil {
			ss.exec.CloseSession(ss.local)
			ss.srv.leave(ss)
			var se *StageError
			if errors.As(err, &se) { // relay the refusal from downstream as it is
				if se.Code < codeEnd {
					ss.srv.rejected[se.Code].Add(1)
				}
				ss.relayError(se)
			} else {
				// The next hop is at fault, not this stage: name it, or the entry would avoid
				// this healthy stage and route every new session around it.
				ss.srv.rejected[CodeUnreachable].Add(1)
				ss.relayError(&StageError{Peer: hops[0].Peer.ID, Code: CodeUnreachable,
					Message: fmt.Sprintf("next hop %s: %v", shortID(hops[0].Peer.ID), err)})
			}
			return false
		}
		if down > 0 && (maxCtx == 0 || down < maxCtx) {
			maxCtx = down
		}
	}
	ss.tag = fmt.Sprintf("strata/stage/%d", ss.local)
	if ss.remote != ss.srv.h.ID() {
		ss.srv.h.Protect(ss.remote, ss.tag)
	}
	ss.srv.opened.Add(1)
	*h = Header{Kind: KindOpened, Session: ss.id, Range: ss.info.Range, MaxContext: maxCtx, Codec: ss.codec}
	if err := ss.w.WriteFrame(h, nil); err != nil {
		ss.log.Debug("write opened", "err", err)
		ss.cancel(err)
		ss.finish()
		return false
	}
	ss.log.Debug("session opened", "codec", ss.codec.String())
	return true
}

func (ss *stageSession) relayError(se *StageError) {
	h := &ss.reply
	*h = Header{Kind: KindError, Session: ss.id, Code: se.Code, Message: se.Message, Origin: string(se.Peer)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ss.w.WriteFrame(h, nil)
	}()
	select {
	case <-done:
		ss.st.Close()
	case <-time.After(time.Second):
		ss.st.Reset()
	}
	ss.ended = true
}

// openNext opens the session on the rest of the route and returns its max context.
func (ss *stageSession) openNext(hops []Hop, model string) (int, error) {
	ctx, cancel := context.WithTimeout(ss.ctx, ss.srv.cfg.openTimeout)
	defer cancel()
	nx, err := ss.srv.h.dialStage(ctx, hops[0].Peer, ss.srv.cfg.frameOptions())
	if err != nil {
		return 0, err
	}
	opened, err := nx.open(ctx, &Header{
		Kind: KindOpen, Session: ss.id, Model: model, Range: hops[0].Range,
		MaxContext: ss.maxCtx, Codec: ss.codec,
	}, hops[1:])
	if err != nil {
		nx.st.Reset()
		return 0, err
	}
	ss.next = nx
	if nx.peer != ss.srv.h.ID() {
		ss.srv.h.Protect(nx.peer, fmt.Sprintf("strata/stage/%d", ss.local))
	}
	return opened.MaxContext, nil
}

func (ss *stageSession) readFailed(step uint64, err error) {
	switch {
	case errors.Is(err, io.EOF):
		ss.st.Close()
	case errors.Is(err, ErrFrameTooLarge):
		ss.fatal(step, CodeTooLarge, "%v", err)
	case errors.Is(err, ErrMalformed):
		ss.fatal(step, CodeBadRequest, "%v", err)
	case errors.Is(err, ErrStalled):
		ss.fatal(step, CodeStalled, "%v", err)
	default:
		ss.srv.resets.Add(1)
		ss.st.Reset()
	}
}

func (ss *stageSession) loop() {
	var slots [2]slot
	free := make(chan *slot, len(slots))
	for i := range slots {
		free <- &slots[i]
	}
	frames := make(chan *slot)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		ss.readLoop(free, frames)
	}()
	defer func() {
		ss.cancel(nil)    // stops the reader once it is blocked on us,
		ss.st.CloseRead() // or in a read; unlike a reset it keeps what we wrote
		<-readerDone
		for i := range slots {
			ss.done(&slots[i])
		}
	}()
	for {
		var sl *slot
		select {
		case sl = <-frames:
		case <-ss.ctx.Done():
			return
		}
		stop := ss.handle(sl)
		ss.done(sl)
		free <- sl
		if stop {
			return
		}
	}
}

// done gives back what a frame held: its reservation and any buffer lent to it. Between
// frames a session keeps only buffers up to keepBytes, so idle sessions pin little however
// large their last step was.
func (ss *stageSession) done(sl *slot) {
	ss.srv.release(ss.remote, sl.reserved)
	sl.reserved = 0
	sl.payload = nil
	sl.buf.put(&ss.srv.bytes)
	ss.acts.put(&ss.srv.floats)
	ss.out.put(&ss.srv.bytes)
	if ss.next != nil {
		ss.next.ans.put(&ss.srv.bytes)
	}
}

// readLoop reads frames while the worker runs the previous one, so that a cancel, a reset
// or a dead connection interrupt a long step instead of waiting for it.
func (ss *stageSession) readLoop(free <-chan *slot, frames chan<- *slot) {
	send := func(sl *slot) bool {
		select {
		case frames <- sl:
			return true
		case <-ss.ctx.Done():
			return false
		}
	}
	for {
		var sl *slot
		select {
		case sl = <-free:
		case <-ss.ctx.Done():
			return
		}
		sl.err, sl.refused = nil, refusal{}
		if err := ss.r.ReadHeader(&sl.h); err != nil {
			sl.err = err
			ss.deliverFailure(sl, frames)
			return
		}
		if sl.h.Kind == KindCancel {
			ss.cancel(errCancelled)
			return
		}
		// Whatever the stage will refuse, or cannot afford now, it refuses from the header
		// and skips the payload without buffering it: a frame costs memory only once it
		// is known to be one the session will run.
		skip := sl.h.Kind != KindForward // only forwards carry a payload the stage uses
		if !skip {
			sl.refused = ss.check(&sl.h)
			skip = sl.refused.code != 0
		}
		if !skip {
			sl.cost = ss.frameCost(&sl.h)
			if err := ss.srv.reserve(ss.remote, sl.cost); err != nil {
				sl.err, skip = err, true
			} else {
				sl.reserved = sl.cost
			}
		}
		if skip {
			if err := ss.r.DiscardPayload(); err != nil {
				sl.err = err
				ss.deliverFailure(sl, frames)
				return
			}
			if !send(sl) {
				return
			}
			continue
		}
		var err error
		sl.payload, err = ss.r.ReadPayload(sl.buf.get(&ss.srv.bytes, int(sl.h.PayloadLen))[:0])
		if err != nil {
			sl.err = err
			if !errors.Is(err, ErrChecksum) {
				ss.deliverFailure(sl, frames)
				return
			}
			if !send(sl) {
				return
			}
			continue
		}
		if !send(sl) {
			return
		}
	}
}

// deliverFailure hands the worker a stream failure to answer. If the worker is busy with a
// step it will not be free soon, so the failure (a reset, a dead connection) aborts the step.
// A clean half-close lets the step finish.
func (ss *stageSession) deliverFailure(sl *slot, frames chan<- *slot) {
	select {
	case frames <- sl:
		return
	case <-ss.ctx.Done():
		return
	case <-time.After(50 * time.Millisecond):
	}
	if !errors.Is(sl.err, io.EOF) {
		ss.cancel(fmt.Errorf("upstream stream failed: %w", sl.err))
	}
	select {
	case frames <- sl:
	case <-ss.ctx.Done():
	}
}

// handle serves one frame and reports whether the session is over.
func (ss *stageSession) handle(sl *slot) bool {
	h := &sl.h
	if sl.err != nil {
		switch {
		case errors.Is(sl.err, errBusyPeer):
			return ss.reject(h.Step, CodeBusy, "frame needing %d bytes refused: %v (limit %d)", sl.cost, sl.err, ss.srv.cfg.maxInflightPerPeer) != nil
		case errors.Is(sl.err, errBusyHost):
			return ss.reject(h.Step, CodeBusy, "frame needing %d bytes refused: %v (limit %d)", sl.cost, sl.err, ss.srv.cfg.maxInflightTotal) != nil
		case errors.Is(sl.err, ErrChecksum):
			return ss.reject(h.Step, CodeChecksum, "%v", sl.err) != nil
		case errors.Is(sl.err, io.EOF):
			ss.graceful = true // upstream half-closed without a close frame: same thing
		default:
			ss.readFailed(h.Step, sl.err)
		}
		return true
	}
	if sl.refused.code != 0 {
		return ss.reject(h.Step, sl.refused.code, "%s", sl.refused.msg) != nil
	}
	if h.Kind == 0 || h.Kind >= kindEnd {
		return ss.reject(h.Step, CodeUnknownKind, "unknown frame kind %d", uint8(h.Kind)) != nil
	}
	if h.Session != ss.id {
		return ss.reject(h.Step, CodeUnknownSession, "session %d is not the one this stream opened", h.Session) != nil
	}
	switch h.Kind {
	case KindForward:
		return ss.forward(h, sl.payload)
	case KindClose:
		ss.graceful = true
		return true
	case KindPing:
		ss.reply = Header{Kind: KindPong, Session: ss.id, Step: h.Step}
		return ss.w.WriteFrame(&ss.reply, nil) != nil
	default:
		return ss.reject(h.Step, CodeBadRequest, "unexpected %s frame in an open session", h.Kind) != nil
	}
}

func (ss *stageSession) result(h *Header, logits []float32) bool {
	if len(logits) != ss.info.Vocab {
		return ss.reject(h.Step, CodeInternal, "executor returned %d logits, vocabulary is %d", len(logits), ss.info.Vocab) != nil
	}
	n := len(h.Positions)
	ss.bias = ss.bias[:0]
	for i, id := range h.BiasTokens {
		ss.bias = append(ss.bias, sample.Bias{Token: id, Value: h.BiasValues[i]})
	}
	ch := ss.sampler.Choose(logits, h.Sampling, sample.Step{Recent: h.Recent, Position: h.Positions[n-1], Bias: ss.bias, TopLogprobs: h.TopN})
	tok, lp := ch.Token, ch.Logprob
	if tok < 0 {
		return ss.reject(h.Step, CodeExec, "no usable logit to sample from (all NaN or -Inf)") != nil
	}
	ss.srv.steps.Add(1)
	r := &ss.reply
	*r = Header{Kind: KindResult, Session: ss.id, Step: h.Step, Token: tok, Logprob: lp, Shape: r.Shape[:0],
		TopIDs: r.TopIDs[:0], TopProbs: r.TopProbs[:0]}
	for _, t := range ch.Top {
		r.TopIDs = append(r.TopIDs, t.Token)
		r.TopProbs = append(r.TopProbs, t.Logprob)
	}
	var payload []byte
	if h.WantLogits {
		r.Codec = quant.CodecF32
		r.Shape = append(r.Shape, len(logits))
		payload, _ = quant.CodecF32.Append(ss.out.get(&ss.srv.bytes, 4*len(logits))[:0], logits)
	}
	if err := ss.w.WriteFrame(r, payload); err != nil {
		ss.log.Debug("write result", "err", err)
		return true
	}
	return false
}

// embedding answers an Embed step with the pooled hidden state as the payload.
func (ss *stageSession) embedding(h *Header, out shard.Output) bool {
	if len(out.Embedding) != ss.info.Hidden {
		return ss.reject(h.Step, CodeInternal, "executor returned an embedding of %d values, hidden size is %d", len(out.Embedding), ss.info.Hidden) != nil
	}
	ss.srv.steps.Add(1)
	r := &ss.reply
	*r = Header{Kind: KindResult, Session: ss.id, Step: h.Step, Codec: quant.CodecF32, Shape: append(r.Shape[:0], len(out.Embedding)),
		Pooling: uint8(out.Pooling)}
	payload, _ := quant.CodecF32.Append(ss.out.get(&ss.srv.bytes, 4*len(out.Embedding))[:0], out.Embedding)
	if err := ss.w.WriteFrame(r, payload); err != nil {
		ss.log.Debug("write embedding", "err", err)
		return true
	}
	return false
}

// relay sends the step's activations downstream and passes the answer back upstream.
func (ss *stageSession) relay(h *Header, acts []byte) bool {
	nx := ss.next
	fwd := &nx.fwd
	*fwd = Header{
		Kind: KindForward, Session: ss.id, Step: h.Step, Positions: h.Positions, Codec: ss.codec,
		Shape: append(fwd.Shape[:0], len(h.Positions), ss.info.Hidden), Sampling: h.Sampling,
		Recent: h.Recent, WantLogits: h.WantLogits, BiasTokens: h.BiasTokens, BiasValues: h.BiasValues, TopN: h.TopN,
		Embed: h.Embed,
	}
	// An abort while waiting downstream resets the next stream, which ends the wait.
	stop := context.AfterFunc(ss.ctx, func() { nx.st.Reset() })
	defer stop()
	sent := time.Now()
	if err := nx.w.WriteFrame(fwd, acts); err != nil {
		return ss.downstreamFailed(h.Step, err)
	}
	rep := &nx.hdr
	if err := nx.r.ReadHeader(rep); err != nil {
		return ss.downstreamFailed(h.Step, err)
	}
	if rep.Kind != KindResult && rep.Kind != KindError || rep.Step != h.Step {
		return ss.downstreamFailed(h.Step, fmt.Errorf("answered step %d with %s for step %d", h.Step, rep.Kind, rep.Step))
	}
	// The only payload an answer may carry is the logits asked for, at the size frameCost
	// reserved for them: anything else would be memory the next hop makes this stage hold
	// outside the frame's reservation. (So a stage that does not know the vocabulary
	// relays no logits.)
	if n := int(rep.PayloadLen); n > 0 {
		logits := h.WantLogits && n == 4*ss.info.Vocab
		embedding := h.Embed && n == 4*ss.info.Hidden
		if rep.Kind != KindResult || !(logits || embedding) {
			return ss.downstreamFailed(h.Step, fmt.Errorf("answered step %d with a %s carrying %d payload bytes (logits asked: %v, vocabulary %d)",
				h.Step, rep.Kind, n, h.WantLogits, ss.info.Vocab))
		}
	}
	payload, err := nx.r.ReadPayload(nx.ans.get(&ss.srv.bytes, int(rep.PayloadLen))[:0])
	if err != nil {
		if errors.Is(err, ErrChecksum) {
			return ss.reject(h.Step, CodeChecksum, "from the next hop: %v", err) != nil
		}
		return ss.downstreamFailed(h.Step, err)
	}
	if rep.Kind == KindResult {
		ss.srv.steps.Add(1)
		ss.srv.h.observeHop(nx.peer, sent)
	} else if rep.Origin == "" {
		rep.Origin = string(nx.peer) // an error names the stage it came from
	}
	rep.Session = ss.id
	if err := ss.w.WriteFrame(rep, payload); err != nil {
		ss.log.Debug("relay answer upstream", "err", err)
		return true
	}
	return false
}

func (ss *stageSession) downstreamFailed(step uint64, err error) bool {
	if ss.ctx.Err() != nil {
		return true
	}
	ss.log.Warn("next hop failed", "next", shortID(ss.next.peer), "err", err)
	ss.srv.rejected[CodeUnreachable].Add(1)
	r := &ss.reply
	*r = Header{Kind: KindError, Session: ss.id, Step: step, Code: CodeUnreachable,
		Message: fmt.Sprintf("next hop %s: %v", shortID(ss.next.peer), err), Origin: string(ss.next.peer)}
	if ss.w.WriteFrame(r, nil) == nil {
		ss.st.Close()
		ss.ended = true
	}
	return true
}

// finish closes the session here and downstream. After a close frame (or upstream's clean
// half-close) it closes the next hop first and waits for it, so that when the entry sees
// its stream end, the whole chain is closed; otherwise it aborts everything at once.
func (ss *stageSession) finish() {
	cause := context.Cause(ss.ctx)
	ss.cancel(nil)
	if nx := ss.next; nx != nil {
		if ss.graceful && !errors.Is(cause, errStopping) {
			closeHop(nx, ss.id, ss.srv.cfg.closeTimeout)
		} else {
			abortHop(nx, ss.id)
		}
		if nx.peer != ss.srv.h.ID() {
			ss.srv.h.Unprotect(nx.peer, ss.tag)
		}
	}
	if err := ss.exec.CloseSession(ss.local); err != nil {
		ss.log.Warn("close session", "err", err)
	}
	if ss.remote != ss.srv.h.ID() {
		ss.srv.h.Unprotect(ss.remote, ss.tag)
	}
	ss.srv.leave(ss)
	switch {
	case ss.ended: // an error frame said goodbye
	case ss.graceful:
		ss.st.Close()
	default:
		ss.st.Reset()
	}
	ss.log.Debug("session closed", "graceful", ss.graceful, "cause", cause)
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	if s == "" {
		return `""`
	}
	return strings.TrimSpace(s)
}
