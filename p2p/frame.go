package p2p

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// A frame on a stage stream is
//
//	[4-byte big-endian header length][msgpack header][payload]
//
// The header is a msgpack map with short string keys (see Header); the payload is raw bytes
// (activations in the header's codec, or f32 logits) whose length and CRC-32C the header
// carries. Tensors never go through msgpack arrays: encoding a million floats element by
// element is 25-70x slower than copying their bytes.

// Kind is what a frame asks for or answers.
type Kind uint8

const (
	KindOpen    Kind = 1 + iota // entry or previous stage -> stage: start a session, carrying the rest of the route
	KindOpened                  // the session is open on this stage and everything after it
	KindForward                 // run a step: tokens (first stage) or activations in the payload
	KindResult                  // the sampled token (and logits if asked), back along the chain
	KindError                   // a step or an open failed; Code and Message say why
	KindClose                   // end the session here and downstream; answered by closing the stream
	KindCancel                  // abort the session now; no answer
	KindPing                    // liveness probe on an idle session
	KindPong                    // answer to a ping
	kindEnd
)

var kindNames = [...]string{"", "open", "opened", "forward", "result", "error", "close", "cancel", "ping", "pong"}

func (k Kind) String() string {
	if k > 0 && k < kindEnd {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Header is a frame's metadata. Each kind uses some fields; zero fields are not sent. A
// Header is reused across frames: ReadHeader resets every field but keeps slice capacity,
// so the hot path does not allocate.
type Header struct {
	Kind       Kind        // "k"
	Session    uint64      // "s": the session id chosen by the entry node
	Step       uint64      // "i": the step's sequence number in the session, echoed in the reply
	Positions  []int32     // "p": the step's absolute positions
	Tokens     []int32     // "t": token ids, to a first stage
	Codec      quant.Codec // "c": the payload's encoding; on open, the session's activation codec
	Shape      []int       // "sh": the payload's tensor shape, e.g. [tokens, hidden] or [vocab]
	PayloadLen uint32      // "n": set by Writer
	Checksum   uint32      // "x": CRC-32C (Castagnoli) of the payload, set by Writer

	// open
	Model      string        // "m": the whole model's sha256 (hex)
	Range      shard.Range   // "r": the layers this stage must serve
	MaxContext int           // "mc": tokens the session may reach
	NextHops   []string      // "h": full multiaddrs (with /p2p/ID) of the rest of the route, in order; consecutive addrs of one peer are one hop
	NextRanges []shard.Range // "hr": the layers of each next hop, one per hop

	// forward
	Sampling   sample.Params // "sp"
	Recent     []int32       // "rt": recent tokens, for the penalties
	WantLogits bool          // "wl"
	BiasTokens []int32       // "bi": logit_bias token ids, paired with BiasValues
	BiasValues []float32     // "bv"
	TopN       int           // "tl": how many top logprobs the result should carry (<= sample.MaxTopLogprobs)
	// Embed ("eb") asks the last stage for the final norm's hidden state pooled over the
	// step, as the result's payload (f32, shape [hidden]) with its Pooling, instead of a
	// token. A stage from before embeddings skips the key and samples a token: the entry
	// sees a result with no payload and says so.
	Embed bool

	// result
	Token    int32     // "tk"
	Logprob  float32   // "lp"
	TopIDs   []int32   // "ti": the TopN most likely tokens, best first
	TopProbs []float32 // "tv": their log-probabilities
	Pooling  uint8     // "pl": how an Embed result's payload was pooled (shard.Pooling)

	// error
	Code    ErrorCode // "ec"
	Message string    // "em"
	Origin  string    // "o": the peer ID of the stage that raised the error, kept as it is relayed
}

func (h *Header) reset() {
	*h = Header{
		Positions:  keep(h.Positions),
		Tokens:     keep(h.Tokens),
		Shape:      keep(h.Shape),
		Recent:     keep(h.Recent),
		BiasTokens: keep(h.BiasTokens),
		BiasValues: keep(h.BiasValues),
		TopIDs:     keep(h.TopIDs),
		TopProbs:   keep(h.TopProbs),
		NextHops:   keep(h.NextHops),
		NextRanges: keep(h.NextRanges),
	}
}

// keepElems bounds the capacity a reused Header keeps in each slice: far more than a step
// needs (positions of a full batch, recent tokens), but a peer that once sent a header of
// hundreds of thousands of positions does not make every later frame hold their memory.
const keepElems = 4096

func keep[T any](s []T) []T {
	if cap(s) > keepElems {
		return nil
	}
	return s[:0]
}

// keepHeaderBytes is the largest header buffer a Reader keeps between frames, for the same
// reason.
const keepHeaderBytes = 16 << 10

// Frame errors. A reader returns them wrapped with details; the stage protocol maps them to
// error codes and counters.
var (
	ErrFrameTooLarge = errors.New("frame too large")
	ErrMalformed     = errors.New("malformed frame")
	ErrChecksum      = errors.New("payload checksum mismatch")
	ErrStalled       = errors.New("stream stalled")
)

// Frame limits and timeouts, overridable with FrameOptions.
const (
	DefaultMaxHeader    = 256 << 10
	DefaultMaxPayload   = 64 << 20
	DefaultFrameTimeout = 30 * time.Second
)

// FrameOption configures a Reader or Writer.
type FrameOption func(*frameConfig)

type frameConfig struct {
	maxHeader    int
	maxPayload   int
	idleTimeout  time.Duration
	frameTimeout time.Duration
}

func newFrameConfig(opts []FrameOption) frameConfig {
	c := frameConfig{maxHeader: DefaultMaxHeader, maxPayload: DefaultMaxPayload, frameTimeout: DefaultFrameTimeout}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// WithMaxHeader bounds a frame's msgpack header (default 256 KiB).
func WithMaxHeader(n int) FrameOption { return func(c *frameConfig) { c.maxHeader = n } }

// WithMaxPayload bounds a frame's payload (default 64 MiB: 512 tokens of an 8192-wide model
// in f32 take 16 MiB).
func WithMaxPayload(n int) FrameOption { return func(c *frameConfig) { c.maxPayload = n } }

// WithIdleTimeout bounds the wait for the first byte of the next frame (default: none, a
// session may sit idle between requests). Readers only.
func WithIdleTimeout(d time.Duration) FrameOption { return func(c *frameConfig) { c.idleTimeout = d } }

// WithFrameTimeout bounds the time from a frame's first byte to its last, and a whole frame
// write: a peer that stops mid-frame is cut off after it (default 30 s).
func WithFrameTimeout(d time.Duration) FrameOption {
	return func(c *frameConfig) { c.frameTimeout = d }
}

type readDeadliner interface{ SetReadDeadline(time.Time) error }
type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum is the CRC-32C of b, as frames carry it.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Writer writes frames to a stream, reusing one buffer for headers (and small payloads).
// It is not safe for concurrent use.
type Writer struct {
	w   io.Writer
	cfg frameConfig
	buf bytes.Buffer
	enc *msgpack.Encoder
}

// NewWriter returns a Writer on w. If w has SetWriteDeadline (libp2p streams do), every
// frame must be written within the frame timeout.
func NewWriter(w io.Writer, opts ...FrameOption) *Writer {
	fw := &Writer{w: w, cfg: newFrameConfig(opts)}
	fw.enc = msgpack.NewEncoder(&fw.buf)
	return fw
}

// smallPayload is copied after the header to make one write; larger payloads are written
// straight from the caller's buffer.
const smallPayload = 32 << 10

// WriteFrame sets h.PayloadLen and h.Checksum from payload and writes the frame.
func (w *Writer) WriteFrame(h *Header, payload []byte) error {
	if len(payload) > w.cfg.maxPayload {
		return fmt.Errorf("%w: payload of %d bytes, limit %d", ErrFrameTooLarge, len(payload), w.cfg.maxPayload)
	}
	h.PayloadLen = uint32(len(payload))
	h.Checksum = 0
	if len(payload) > 0 {
		h.Checksum = Checksum(payload)
	}
	w.buf.Reset()
	w.buf.Write([]byte{0, 0, 0, 0})
	if err := h.encode(w.enc); err != nil {
		return fmt.Errorf("encode %s header: %w", h.Kind, err)
	}
	n := w.buf.Len() - 4
	if n > w.cfg.maxHeader {
		return fmt.Errorf("%w: %s header of %d bytes, limit %d", ErrFrameTooLarge, h.Kind, n, w.cfg.maxHeader)
	}
	b := w.buf.Bytes()
	binary.BigEndian.PutUint32(b, uint32(n))
	if len(payload) <= smallPayload {
		w.buf.Write(payload)
		payload = nil
		b = w.buf.Bytes()
	}
	if d, ok := w.w.(writeDeadliner); ok && w.cfg.frameTimeout > 0 {
		_ = d.SetWriteDeadline(time.Now().Add(w.cfg.frameTimeout))
	}
	if _, err := w.w.Write(b); err != nil {
		return fmt.Errorf("write %s frame: %w", h.Kind, stallErr(err))
	}
	if len(payload) > 0 {
		if _, err := w.w.Write(payload); err != nil {
			return fmt.Errorf("write %s payload: %w", h.Kind, stallErr(err))
		}
	}
	return nil
}

// Reader reads frames from a stream. It reuses its buffers: the payload returned by
// ReadFrame is valid until the next call. It is not safe for concurrent use.
type Reader struct {
	r       *bufio.Reader
	dl      readDeadliner
	cfg     frameConfig
	hdr     []byte
	payload []byte
	br      bytes.Reader
	dec     *msgpack.Decoder
	pending int    // payload bytes of the current frame not read yet
	sum     uint32 // the current frame's checksum
	key     [16]byte
	pre     [4]byte
}

// NewReader returns a Reader on r. If r has SetReadDeadline (libp2p streams do), the idle
// and frame timeouts apply.
func NewReader(r io.Reader, opts ...FrameOption) *Reader {
	fr := &Reader{r: bufio.NewReaderSize(r, 64<<10), cfg: newFrameConfig(opts)}
	fr.dl, _ = r.(readDeadliner)
	fr.dec = msgpack.NewDecoder(&fr.br)
	return fr
}

// ReadFrame reads one frame into h and returns its payload, checked against the header's
// length and checksum.
func (r *Reader) ReadFrame(h *Header) ([]byte, error) {
	if err := r.ReadHeader(h); err != nil {
		return nil, err
	}
	var err error
	r.payload, err = r.ReadPayload(r.payload[:0])
	return r.payload, err
}

// ReadHeader reads the next frame's header into h, leaving its payload (h.PayloadLen bytes)
// to ReadPayload or DiscardPayload. A payload left unread is discarded first.
func (r *Reader) ReadHeader(h *Header) error {
	if r.pending > 0 {
		if err := r.DiscardPayload(); err != nil {
			return err
		}
	}
	h.reset()
	r.setDeadline(r.cfg.idleTimeout)
	pre := r.pre[:]
	if _, err := io.ReadFull(r.r, pre[:1]); err != nil {
		return stallErr(err) // io.EOF here is a clean end of stream
	}
	r.setDeadline(r.cfg.frameTimeout)
	if _, err := io.ReadFull(r.r, pre[1:]); err != nil {
		return fmt.Errorf("read frame length: %w", noEOF(stallErr(err)))
	}
	n := binary.BigEndian.Uint32(pre)
	if n == 0 {
		return fmt.Errorf("%w: empty header", ErrMalformed)
	}
	if uint64(n) > uint64(r.cfg.maxHeader) {
		return fmt.Errorf("%w: header of %d bytes, limit %d", ErrFrameTooLarge, n, r.cfg.maxHeader)
	}
	if cap(r.hdr) < int(n) {
		r.hdr = make([]byte, n)
	}
	r.hdr = r.hdr[:n]
	if _, err := io.ReadFull(r.r, r.hdr); err != nil {
		return fmt.Errorf("read %d-byte header: %w", n, noEOF(stallErr(err)))
	}
	err := r.decodeHeader(h)
	if cap(r.hdr) > keepHeaderBytes {
		r.hdr = nil // decoding copied out everything it keeps
		r.br.Reset(nil)
	}
	if err != nil {
		return err
	}
	if uint64(h.PayloadLen) > uint64(r.cfg.maxPayload) {
		return fmt.Errorf("%w: %s payload of %d bytes, limit %d", ErrFrameTooLarge, h.Kind, h.PayloadLen, r.cfg.maxPayload)
	}
	r.pending = int(h.PayloadLen)
	r.sum = h.Checksum
	return nil
}

// ReadPayload reads the current frame's payload into dst[:0] (grown if needed) and checks
// its CRC. On ErrChecksum the stream is still in step: the next frame can be read.
func (r *Reader) ReadPayload(dst []byte) ([]byte, error) {
	n := r.pending
	if cap(dst) < n {
		dst = make([]byte, n)
	}
	dst = dst[:n]
	r.pending = 0
	if n == 0 {
		if r.sum != 0 {
			return dst, fmt.Errorf("%w: empty payload with checksum %#x", ErrChecksum, r.sum)
		}
		return dst, nil
	}
	if _, err := io.ReadFull(r.r, dst); err != nil {
		return dst[:0], fmt.Errorf("read %d-byte payload: %w", n, noEOF(stallErr(err)))
	}
	if got := Checksum(dst); got != r.sum {
		return dst, fmt.Errorf("%w: header says %#x, payload has %#x", ErrChecksum, r.sum, got)
	}
	return dst, nil
}

// DiscardPayload skips the current frame's payload without buffering it.
func (r *Reader) DiscardPayload() error {
	n := r.pending
	r.pending = 0
	if _, err := r.r.Discard(n); err != nil {
		return fmt.Errorf("discard %d-byte payload: %w", n, noEOF(stallErr(err)))
	}
	return nil
}

func (r *Reader) setDeadline(d time.Duration) {
	if r.dl == nil {
		return
	}
	var t time.Time
	if d > 0 {
		t = time.Now().Add(d)
	}
	_ = r.dl.SetReadDeadline(t)
}

func stallErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: %w", ErrStalled, err)
	}
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		return fmt.Errorf("%w: %w", ErrStalled, err)
	}
	return err
}

// noEOF turns an EOF inside a frame into ErrUnexpectedEOF: only an EOF between frames is clean.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// The header codec is written by hand on top of msgpack's Encoder and Decoder instead of
// reflection-based Marshal: msgpack v5.4.1 allocates a decoded array at the length its
// header claims, so a 10-byte frame could ask for gigabytes; here every length is checked
// against the bytes left before anything is allocated. It also decodes map keys into a fixed
// buffer, so a forward frame decodes without allocating.

func (h *Header) encode(e *msgpack.Encoder) error {
	n := 0
	count := func(nonzero bool) {
		if nonzero {
			n++
		}
	}
	count(h.Kind != 0)
	count(h.Session != 0)
	count(h.Step != 0)
	count(len(h.Positions) > 0)
	count(len(h.Tokens) > 0)
	count(h.Codec != 0)
	count(len(h.Shape) > 0)
	count(h.PayloadLen != 0)
	count(h.Checksum != 0)
	count(h.Model != "")
	count(h.Range != shard.Range{})
	count(h.MaxContext != 0)
	count(len(h.NextHops) > 0)
	count(len(h.NextRanges) > 0)
	count(h.Sampling != sample.Params{})
	count(len(h.Recent) > 0)
	count(h.WantLogits)
	count(h.Embed)
	count(h.Pooling != 0)
	count(len(h.BiasTokens) > 0)
	count(len(h.BiasValues) > 0)
	count(h.TopN != 0)
	count(h.Token != 0)
	count(h.Logprob != 0)
	count(len(h.TopIDs) > 0)
	count(len(h.TopProbs) > 0)
	count(h.Code != 0)
	count(h.Message != "")
	count(h.Origin != "")
	if err := e.EncodeMapLen(n); err != nil {
		return err
	}
	var err error
	put := func(key string, f func() error) {
		if err == nil {
			if err = e.EncodeString(key); err == nil {
				err = f()
			}
		}
	}
	putUint := func(key string, v uint64) { put(key, func() error { return e.EncodeUint(v) }) }
	putInt := func(key string, v int64) { put(key, func() error { return e.EncodeInt(v) }) }
	putInt32s := func(key string, v []int32) {
		put(key, func() error {
			if err := e.EncodeArrayLen(len(v)); err != nil {
				return err
			}
			for _, x := range v {
				if err := e.EncodeInt(int64(x)); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if h.Kind != 0 {
		putUint("k", uint64(h.Kind))
	}
	if h.Session != 0 {
		putUint("s", h.Session)
	}
	if h.Step != 0 {
		putUint("i", h.Step)
	}
	if len(h.Positions) > 0 {
		putInt32s("p", h.Positions)
	}
	if len(h.Tokens) > 0 {
		putInt32s("t", h.Tokens)
	}
	if h.Codec != 0 {
		putUint("c", uint64(h.Codec))
	}
	if len(h.Shape) > 0 {
		put("sh", func() error {
			if err := e.EncodeArrayLen(len(h.Shape)); err != nil {
				return err
			}
			for _, x := range h.Shape {
				if err := e.EncodeInt(int64(x)); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if h.PayloadLen != 0 {
		putUint("n", uint64(h.PayloadLen))
	}
	if h.Checksum != 0 {
		putUint("x", uint64(h.Checksum))
	}
	if h.Model != "" {
		put("m", func() error { return e.EncodeString(h.Model) })
	}
	if h.Range != (shard.Range{}) {
		put("r", func() error { return encodeRange(e, h.Range) })
	}
	if h.MaxContext != 0 {
		putInt("mc", int64(h.MaxContext))
	}
	if len(h.NextHops) > 0 {
		put("h", func() error {
			if err := e.EncodeArrayLen(len(h.NextHops)); err != nil {
				return err
			}
			for _, s := range h.NextHops {
				if err := e.EncodeString(s); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if len(h.NextRanges) > 0 {
		put("hr", func() error {
			if err := e.EncodeArrayLen(len(h.NextRanges)); err != nil {
				return err
			}
			for _, r := range h.NextRanges {
				if err := encodeRange(e, r); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if h.Sampling != (sample.Params{}) {
		// Params has no slices, so reflection cannot over-allocate on decode, and fields
		// added to it later travel without touching this file.
		put("sp", func() error { return e.Encode(&h.Sampling) })
	}
	if len(h.Recent) > 0 {
		putInt32s("rt", h.Recent)
	}
	if h.WantLogits {
		put("wl", func() error { return e.EncodeBool(true) })
	}
	if h.Embed {
		put("eb", func() error { return e.EncodeBool(true) })
	}
	if h.Pooling != 0 {
		putUint("pl", uint64(h.Pooling))
	}
	putFloat32s := func(key string, v []float32) {
		put(key, func() error {
			if err := e.EncodeArrayLen(len(v)); err != nil {
				return err
			}
			for _, x := range v {
				if err := e.EncodeFloat32(x); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if len(h.BiasTokens) > 0 {
		putInt32s("bi", h.BiasTokens)
	}
	if len(h.BiasValues) > 0 {
		putFloat32s("bv", h.BiasValues)
	}
	if h.TopN != 0 {
		putInt("tl", int64(h.TopN))
	}
	if h.Token != 0 {
		putInt("tk", int64(h.Token))
	}
	if h.Logprob != 0 {
		put("lp", func() error { return e.EncodeFloat32(h.Logprob) })
	}
	if len(h.TopIDs) > 0 {
		putInt32s("ti", h.TopIDs)
	}
	if len(h.TopProbs) > 0 {
		putFloat32s("tv", h.TopProbs)
	}
	if h.Code != 0 {
		putUint("ec", uint64(h.Code))
	}
	if h.Message != "" {
		put("em", func() error { return e.EncodeString(h.Message) })
	}
	if h.Origin != "" {
		put("o", func() error { return e.EncodeString(h.Origin) })
	}
	return err
}

func encodeRange(e *msgpack.Encoder, r shard.Range) error {
	if err := e.EncodeMapLen(2); err != nil {
		return err
	}
	if err := e.EncodeString("s"); err != nil {
		return err
	}
	if err := e.EncodeInt(int64(r.Start)); err != nil {
		return err
	}
	if err := e.EncodeString("e"); err != nil {
		return err
	}
	return e.EncodeInt(int64(r.End))
}

// headerDecoder reads one header with every length bounded by the bytes left.
type headerDecoder struct {
	d   *msgpack.Decoder
	br  *bytes.Reader
	key *[16]byte
}

func (r *Reader) decodeHeader(h *Header) error {
	r.br.Reset(r.hdr)
	r.dec.Reset(&r.br)
	hd := headerDecoder{d: r.dec, br: &r.br, key: &r.key}
	if err := hd.header(h); err != nil {
		return fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if r.br.Len() != 0 {
		return fmt.Errorf("%w: %d bytes after the header map", ErrMalformed, r.br.Len())
	}
	if h.Kind == 0 {
		return fmt.Errorf("%w: header has no kind", ErrMalformed)
	}
	if len(h.BiasTokens) != len(h.BiasValues) || len(h.BiasTokens) > sample.MaxBias {
		return fmt.Errorf("%w: %d logit bias ids with %d values (at most %d)", ErrMalformed, len(h.BiasTokens), len(h.BiasValues), sample.MaxBias)
	}
	if len(h.TopIDs) != len(h.TopProbs) || len(h.TopIDs) > sample.MaxTopLogprobs {
		return fmt.Errorf("%w: %d top ids with %d logprobs (at most %d)", ErrMalformed, len(h.TopIDs), len(h.TopProbs), sample.MaxTopLogprobs)
	}
	return nil
}

// DecodeHeader decodes a msgpack header from b, as a Reader would (for tests and tools).
func DecodeHeader(b []byte, h *Header) error {
	r := Reader{hdr: b}
	r.dec = msgpack.NewDecoder(&r.br)
	h.reset()
	return r.decodeHeader(h)
}

func (hd headerDecoder) header(h *Header) error {
	n, err := hd.mapLen()
	if err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		key, err := hd.readKey()
		if err != nil {
			return err
		}
		if err := hd.field(h, key); err != nil {
			return fmt.Errorf("field %q: %w", key, err)
		}
	}
	return nil
}

func (hd headerDecoder) field(h *Header, key []byte) error {
	var err error
	switch string(key) {
	case "k":
		h.Kind, err = narrowUint[Kind](hd, math.MaxUint8)
	case "s":
		h.Session, err = hd.uint(math.MaxUint64)
	case "i":
		h.Step, err = hd.uint(math.MaxUint64)
	case "p":
		h.Positions, err = hd.int32s(h.Positions)
	case "t":
		h.Tokens, err = hd.int32s(h.Tokens)
	case "c":
		h.Codec, err = narrowUint[quant.Codec](hd, math.MaxUint8)
	case "sh":
		h.Shape, err = arrayOf(hd, h.Shape, func() (int, error) {
			v, err := hd.int(0, math.MaxInt32)
			return int(v), err
		})
	case "n":
		h.PayloadLen, err = narrowUint[uint32](hd, math.MaxUint32)
	case "x":
		h.Checksum, err = narrowUint[uint32](hd, math.MaxUint32)
	case "m":
		h.Model, err = hd.string()
	case "r":
		h.Range, err = hd.rng()
	case "mc":
		var v int64
		v, err = hd.int(0, math.MaxInt32)
		h.MaxContext = int(v)
	case "h":
		h.NextHops, err = arrayOf(hd, h.NextHops, hd.string)
	case "hr":
		h.NextRanges, err = arrayOf(hd, h.NextRanges, hd.rng)
	case "sp":
		err = hd.d.Decode(&h.Sampling)
	case "rt":
		h.Recent, err = hd.int32s(h.Recent)
	case "wl":
		h.WantLogits, err = hd.d.DecodeBool()
	case "eb":
		h.Embed, err = hd.d.DecodeBool()
	case "pl":
		h.Pooling, err = narrowUint[uint8](hd, math.MaxUint8)
	case "tk":
		var v int64
		v, err = hd.int(math.MinInt32, math.MaxInt32)
		h.Token = int32(v)
	case "lp":
		h.Logprob, err = hd.d.DecodeFloat32()
	case "bi":
		h.BiasTokens, err = hd.int32s(h.BiasTokens)
	case "bv":
		h.BiasValues, err = hd.float32s(h.BiasValues)
	case "tl":
		var v int64
		v, err = hd.int(0, sample.MaxTopLogprobs)
		h.TopN = int(v)
	case "ti":
		h.TopIDs, err = hd.int32s(h.TopIDs)
	case "tv":
		h.TopProbs, err = hd.float32s(h.TopProbs)
	case "ec":
		h.Code, err = narrowUint[ErrorCode](hd, math.MaxUint16)
	case "em":
		h.Message, err = hd.string()
	case "o":
		h.Origin, err = hd.string()
	default:
		err = hd.d.Skip() // a field from a newer peer
	}
	return err
}

func (hd headerDecoder) left() int { return hd.br.Len() }

// narrowUint reads an unsigned integer of at most limit, which T must hold.
func narrowUint[T ~uint8 | ~uint16 | ~uint32](hd headerDecoder, limit uint64) (T, error) {
	v, err := hd.uint(limit)
	return T(v), err
}

// arrayOf appends an array's elements, each read by one, to dst.
func arrayOf[T any](hd headerDecoder, dst []T, one func() (T, error)) ([]T, error) {
	n, err := hd.arrayLen()
	if err != nil {
		return dst, err
	}
	for range n {
		v, err := one()
		if err != nil {
			return dst, err
		}
		dst = append(dst, v)
	}
	return dst, nil
}

func (hd headerDecoder) mapLen() (int, error) {
	n, err := hd.d.DecodeMapLen()
	if err != nil {
		return 0, err
	}
	if n < 0 || 2*n > hd.left() { // a key and a value take a byte each at least
		return 0, fmt.Errorf("map of %d entries in %d bytes", n, hd.left())
	}
	return n, nil
}

func (hd headerDecoder) arrayLen() (int, error) {
	n, err := hd.d.DecodeArrayLen()
	if err != nil {
		return 0, err
	}
	if n < 0 || n > hd.left() {
		return 0, fmt.Errorf("array of %d elements in %d bytes", n, hd.left())
	}
	return n, nil
}

func (hd headerDecoder) readKey() ([]byte, error) {
	n, err := hd.d.DecodeBytesLen()
	if err != nil {
		return nil, err
	}
	if n < 0 || n > len(hd.key) || n > hd.left() {
		return nil, fmt.Errorf("map key of %d bytes", n)
	}
	k := hd.key[:n]
	if err := hd.d.ReadFull(k); err != nil {
		return nil, err
	}
	return k, nil
}

func (hd headerDecoder) string() (string, error) {
	c, err := hd.d.PeekCode()
	if err != nil {
		return "", err
	}
	if !msgpcode.IsString(c) {
		return "", fmt.Errorf("want a string, got code %#x", c)
	}
	n, err := hd.d.DecodeBytesLen()
	if err != nil {
		return "", err
	}
	if n < 0 || n > hd.left() {
		return "", fmt.Errorf("string of %d bytes in %d", n, hd.left())
	}
	b := make([]byte, n)
	if err := hd.d.ReadFull(b); err != nil {
		return "", err
	}
	return string(b), nil
}

func (hd headerDecoder) uint(limit uint64) (uint64, error) {
	c, err := hd.d.PeekCode()
	if err != nil {
		return 0, err
	}
	if !isInt(c) {
		return 0, fmt.Errorf("want an integer, got code %#x", c)
	}
	if isNegInt(c) {
		v, err := hd.d.DecodeInt64()
		if err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("negative value %d", v)
	}
	v, err := hd.d.DecodeUint64()
	if err != nil {
		return 0, err
	}
	if v > limit {
		return 0, fmt.Errorf("value %d over %d", v, limit)
	}
	return v, nil
}

func (hd headerDecoder) int(lo, hi int64) (int64, error) {
	c, err := hd.d.PeekCode()
	if err != nil {
		return 0, err
	}
	if !isInt(c) {
		return 0, fmt.Errorf("want an integer, got code %#x", c)
	}
	if c == msgpcode.Uint64 {
		v, err := hd.d.DecodeUint64()
		if err != nil {
			return 0, err
		}
		if v > uint64(hi) {
			return 0, fmt.Errorf("value %d outside [%d,%d]", v, lo, hi)
		}
		return int64(v), nil
	}
	v, err := hd.d.DecodeInt64()
	if err != nil {
		return 0, err
	}
	if v < lo || v > hi {
		return 0, fmt.Errorf("value %d outside [%d,%d]", v, lo, hi)
	}
	return v, nil
}

func (hd headerDecoder) int32s(dst []int32) ([]int32, error) {
	n, err := hd.arrayLen()
	if err != nil {
		return dst, err
	}
	for j := 0; j < n; j++ {
		v, err := hd.int(math.MinInt32, math.MaxInt32)
		if err != nil {
			return dst, err
		}
		dst = append(dst, int32(v))
	}
	return dst, nil
}

func (hd headerDecoder) float32s(dst []float32) ([]float32, error) {
	n, err := hd.arrayLen()
	if err != nil {
		return dst, err
	}
	for j := 0; j < n; j++ {
		v, err := hd.d.DecodeFloat32()
		if err != nil {
			return dst, err
		}
		dst = append(dst, v)
	}
	return dst, nil
}

func (hd headerDecoder) rng() (shard.Range, error) {
	var r shard.Range
	n, err := hd.mapLen()
	if err != nil {
		return r, err
	}
	for j := 0; j < n; j++ {
		key, err := hd.readKey()
		if err != nil {
			return r, err
		}
		switch string(key) {
		case "s":
			var v int64
			v, err = hd.int(0, math.MaxInt32)
			r.Start = int(v)
		case "e":
			var v int64
			v, err = hd.int(0, math.MaxInt32)
			r.End = int(v)
		default:
			err = hd.d.Skip()
		}
		if err != nil {
			return r, err
		}
	}
	return r, nil
}

func isInt(c byte) bool {
	return msgpcode.IsFixedNum(c) || c == msgpcode.Uint8 || c == msgpcode.Uint16 || c == msgpcode.Uint32 ||
		c == msgpcode.Uint64 || c == msgpcode.Int8 || c == msgpcode.Int16 || c == msgpcode.Int32 || c == msgpcode.Int64
}

func isNegInt(c byte) bool {
	return msgpcode.IsFixedNum(c) && int8(c) < 0 || c == msgpcode.Int8 || c == msgpcode.Int16 ||
		c == msgpcode.Int32 || c == msgpcode.Int64
}
