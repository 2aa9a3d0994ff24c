package p2p

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// WithLatency makes the host behave as if its peers were across a slower network: every
// byte it writes on a libp2p stream reaches the peer oneWay later, after waiting its turn on
// a link of bandwidth bytes per second (0: unlimited) that all streams to that peer share.
// It is for benchmarks on one machine, where loopback hides the network: set it on every
// node and a round trip costs 2 x oneWay, as on a real link. Memberlist's own UDP/TCP port
// is not affected, nor are in-process hops to the host itself.
//
// Writes return at once and bytes are delivered later by a per-stream goroutine, as a real
// link pipelines them: a sender is not blocked for the latency, only its bytes are.
func WithLatency(oneWay time.Duration, bandwidth float64) Option {
	return func(c *hostConfig) { c.latency = linkEmulation{oneWay: oneWay, bandwidth: bandwidth} }
}

// linkEmulation is WithLatency's setting; the zero value emulates nothing.
type linkEmulation struct {
	oneWay    time.Duration
	bandwidth float64 // bytes per second; 0: unlimited
}

func (l linkEmulation) active() bool { return l.oneWay > 0 || l.bandwidth > 0 }

func (l linkEmulation) validate() error {
	if l.oneWay < 0 || l.bandwidth < 0 || l.bandwidth != l.bandwidth {
		return fmt.Errorf("emulated link: latency %s and bandwidth %g B/s must not be negative", l.oneWay, l.bandwidth)
	}
	return nil
}

// serialization is how long n bytes occupy the link.
func (l linkEmulation) serialization(n int) time.Duration {
	if l.bandwidth <= 0 {
		return 0
	}
	return time.Duration(float64(n) / l.bandwidth * float64(time.Second))
}

// latencyHost wraps a libp2p host so that the streams it opens and accepts write through an
// emulated link. Everything else is the wrapped host's.
type latencyHost struct {
	host.Host
	link linkEmulation

	mu    sync.Mutex
	links map[peer.ID]*linkState
}

// linkState is one direction of the emulated link to one peer: the time its last queued byte
// finishes being sent, so streams to the same peer share its bandwidth.
type linkState struct {
	mu       sync.Mutex
	busyTill time.Time
}

func newLatencyHost(h host.Host, l linkEmulation) *latencyHost {
	return &latencyHost{Host: h, link: l, links: map[peer.ID]*linkState{}}
}

func (h *latencyHost) state(p peer.ID) *linkState {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, ok := h.links[p]
	if !ok {
		s = &linkState{}
		h.links[p] = s
	}
	return s
}

func (h *latencyHost) wrap(s network.Stream) network.Stream {
	return &delayedStream{Stream: s, link: h.link, state: h.state(s.Conn().RemotePeer())}
}

// NewStream opens a stream whose writes cross the emulated link.
func (h *latencyHost) NewStream(ctx context.Context, p peer.ID, pids ...protocol.ID) (network.Stream, error) {
	s, err := h.Host.NewStream(ctx, p, pids...)
	if err != nil {
		return nil, err
	}
	return h.wrap(s), nil
}

// SetStreamHandler hands handler streams whose writes cross the emulated link.
func (h *latencyHost) SetStreamHandler(pid protocol.ID, handler network.StreamHandler) {
	h.Host.SetStreamHandler(pid, func(s network.Stream) { handler(h.wrap(s)) })
}

// SetStreamHandlerMatch is SetStreamHandler with a protocol matcher.
func (h *latencyHost) SetStreamHandlerMatch(pid protocol.ID, m func(protocol.ID) bool, handler network.StreamHandler) {
	h.Host.SetStreamHandlerMatch(pid, m, func(s network.Stream) { handler(h.wrap(s)) })
}

// delayedStream queues its writes and delivers each one when the emulated link would have:
// after the bytes before it on the link, their serialization time, and the one-way latency.
type delayedStream struct {
	network.Stream
	link  linkEmulation
	state *linkState

	mu      sync.Mutex
	started bool
	queue   chan delayedWrite
	quit    chan struct{} // closed by Reset: drop what is queued
	done    chan struct{} // closed when the delivery goroutine has ended
	err     error         // the first delivery error, reported by the next Write or Close
	closing bool
}

type delayedWrite struct {
	b     []byte
	at    time.Time
	flush chan struct{} // a marker: closed once everything queued before it is delivered
}

var errStreamClosed = errors.New("write on a closed stream")

// Write queues b for delivery and returns at once, like a socket with room in its buffer.
func (s *delayedStream) Write(b []byte) (int, error) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return 0, errStreamClosed
	}
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return 0, err
	}
	s.startLocked()
	s.mu.Unlock()

	now := time.Now()
	s.state.mu.Lock()
	start := now
	if s.state.busyTill.After(now) {
		start = s.state.busyTill
	}
	s.state.busyTill = start.Add(s.link.serialization(len(b)))
	at := s.state.busyTill.Add(s.link.oneWay)
	s.state.mu.Unlock()

	w := delayedWrite{b: append([]byte(nil), b...), at: at}
	select {
	case s.queue <- w:
		return len(b), nil
	case <-s.quit:
		return 0, network.ErrReset
	case <-s.done:
		return 0, s.deliveryErr()
	}
}

func (s *delayedStream) startLocked() {
	if s.started {
		return
	}
	s.started = true
	s.queue = make(chan delayedWrite, 256)
	s.quit = make(chan struct{})
	s.done = make(chan struct{})
	go s.deliver()
}

func (s *delayedStream) deliver() {
	defer close(s.done)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case w := <-s.queue:
			if w.flush != nil {
				close(w.flush)
				continue
			}
			if d := time.Until(w.at); d > 0 {
				t.Reset(d)
				select {
				case <-t.C:
				case <-s.quit:
					return
				}
			}
			if _, err := s.Stream.Write(w.b); err != nil {
				s.mu.Lock()
				s.err = err
				s.mu.Unlock()
				return
			}
		}
	}
}

func (s *delayedStream) deliveryErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	return network.ErrReset
}

// drain waits until everything written so far has been delivered (or failed).
func (s *delayedStream) drain() error {
	s.mu.Lock()
	started := s.started
	s.mu.Unlock()
	if !started {
		return nil
	}
	f := make(chan struct{})
	select {
	case s.queue <- delayedWrite{flush: f}:
	case <-s.quit:
		return network.ErrReset
	case <-s.done:
		return s.deliveryErr()
	}
	select {
	case <-f:
		return nil
	case <-s.quit:
		return network.ErrReset
	case <-s.done:
		return s.deliveryErr()
	}
}

// CloseWrite delivers what is queued, then half-closes the stream.
func (s *delayedStream) CloseWrite() error {
	if err := s.drain(); err != nil {
		return err
	}
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	return s.Stream.CloseWrite()
}

// Close delivers what is queued, then closes the stream.
func (s *delayedStream) Close() error {
	err := s.drain()
	s.mu.Lock()
	s.closing = true
	if s.started {
		select {
		case <-s.quit:
		default:
			close(s.quit)
		}
	}
	s.mu.Unlock()
	if cerr := s.Stream.Close(); err == nil {
		err = cerr
	}
	return err
}

// Reset drops what is queued and resets the stream.
func (s *delayedStream) Reset() error {
	s.mu.Lock()
	s.closing = true
	if s.started {
		select {
		case <-s.quit:
		default:
			close(s.quit)
		}
	}
	s.mu.Unlock()
	return s.Stream.Reset()
}

// ResetWithError is Reset with an error code for the peer.
func (s *delayedStream) ResetWithError(code network.StreamErrorCode) error {
	s.mu.Lock()
	s.closing = true
	if s.started {
		select {
		case <-s.quit:
		default:
			close(s.quit)
		}
	}
	s.mu.Unlock()
	return s.Stream.ResetWithError(code)
}

// ParseBandwidth reads a link speed as bytes per second: "1Gbit", "100Mbit/s", "1Gbps", "10MB/s",
// "512KiB" or a plain number of bytes per second. Bit units are decimal (1 Gbit = 1e9 bits),
// as network speeds are quoted.
func ParseBandwidth(s string) (float64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimSuffix(t, "/s")
	if num, ok := strings.CutSuffix(t, "bps"); ok { // "1gbps" is bits, like "1gbit"
		t = num + "bit"
	}
	if t == "" {
		return 0, nil
	}
	units := []struct {
		suffix string
		mult   float64
	}{
		{"tbit", 1e12 / 8}, {"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"tib", 1 << 40}, {"gib", 1 << 30}, {"mib", 1 << 20}, {"kib", 1 << 10},
		{"tb", 1e12}, {"gb", 1e9}, {"mb", 1e6}, {"kb", 1e3}, {"b", 1},
	}
	mult := 1.0
	for _, u := range units {
		if num, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(num), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("bad bandwidth %q: want a number with a unit such as 1Gbit, 100Mbit/s or 10MB/s", s)
	}
	return f * mult, nil
}
