package p2p

import (
	"bytes"
	"context"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/shard"
)

const echoProto protocol.ID = "/strata/test/echo/1.0.0"

// TestLatencyRoundTrip: a byte written on an emulated link arrives one-way latency later in
// each direction, and a write followed at once by Close still delivers everything.
func TestLatencyRoundTrip(t *testing.T) {
	const oneWay = 40 * time.Millisecond
	a := newTestHost(t, WithLatency(oneWay, 0))
	b := newTestHost(t, WithLatency(oneWay, 0))
	b.Libp2p().SetStreamHandler(echoProto, func(s network.Stream) {
		defer s.Close()
		_, _ = io.Copy(s, s)
	})
	ctx := context.Background()
	if err := a.Connect(ctx, b.AddrInfo()); err != nil {
		t.Fatal(err)
	}
	s, err := a.Libp2p().NewStream(ctx, b.ID(), echoProto)
	if err != nil {
		t.Fatal(err)
	}
	var rtts []time.Duration
	buf := make([]byte, 1)
	for i := range 5 {
		start := time.Now()
		if _, err := s.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, buf); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(i) {
			t.Fatalf("echo %d, want %d", buf[0], i)
		}
		rtts = append(rtts, time.Since(start))
	}
	slices.Sort(rtts)
	t.Logf("round trips with %s one way: %v", oneWay, rtts)
	// Every round trip waits the latency both ways; a load can only add to it, so the upper
	// bound is on the fastest of five and only catches the latency applied twice.
	if rtts[0] < 2*oneWay || rtts[0] >= 4*oneWay {
		t.Fatalf("fastest round trip %s, want about %s", rtts[0], 2*oneWay)
	}

	// Close right after a write: the queued bytes still go out before the stream ends.
	msg := bytes.Repeat([]byte("strata"), 10000)
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echoed %d bytes, want %d", len(got), len(msg))
	}
	_ = s.Close()
}

// TestLatencyBandwidth: streams to one peer share the emulated bandwidth.
func TestLatencyBandwidth(t *testing.T) {
	const bw = 4 << 20 // 4 MiB/s
	a := newTestHost(t, WithLatency(0, bw))
	b := newTestHost(t)
	got := make(chan time.Time, 2)
	b.Libp2p().SetStreamHandler(echoProto, func(s network.Stream) {
		defer s.Close()
		_, _ = io.Copy(io.Discard, s)
		got <- time.Now()
	})
	ctx := context.Background()
	if err := a.Connect(ctx, b.AddrInfo()); err != nil {
		t.Fatal(err)
	}
	const size = 256 << 10 // two streams x 256 KiB at 4 MiB/s: 125 ms
	start := time.Now()
	for range 2 {
		go func() {
			s, err := a.Libp2p().NewStream(ctx, b.ID(), echoProto)
			if err != nil {
				t.Error(err)
				return
			}
			for range 4 {
				if _, err := s.Write(make([]byte, size/4)); err != nil {
					t.Error(err)
				}
			}
			_ = s.Close()
		}()
	}
	var last time.Time
	for range 2 {
		select {
		case last = <-got:
		case <-time.After(10 * time.Second):
			t.Fatal("streams did not finish")
		}
	}
	took := last.Sub(start)
	want := time.Duration(float64(2*size) / bw * float64(time.Second))
	t.Logf("%d KiB over a %d MiB/s link: %s (ideal %s)", 2*size>>10, bw>>20, took, want)
	// The emulated link is never faster than its bandwidth; a loaded machine only makes it
	// slower, so the upper bound only catches gross mistakes (the streams not sharing, bytes
	// paced twice).
	if took < want || took > 4*want {
		t.Fatalf("took %s, want about %s", took, want)
	}
}

// TestLatencyStageChain: a decode step through entry -> 3 stages crosses six links, so it
// costs six one-way latencies; the tokens are still right.
func TestLatencyStageChain(t *testing.T) {
	const oneWay = 15 * time.Millisecond
	cuts := []int{0, 2, 4, 6}
	c := &testChain{L: 6, V: 1000}
	for i := 1; i < len(cuts); i++ {
		h := newTestHost(t, WithLatency(oneWay, 1e9/8))
		r := shard.Range{Start: cuts[i-1], End: cuts[i]}
		e := newToy(r, c.L, 256, c.V)
		if err := h.ServeStage(e); err != nil {
			t.Fatal(err)
		}
		c.hosts = append(c.hosts, h)
		c.execs = append(c.execs, e)
		c.hops = append(c.hops, Hop{Peer: h.AddrInfo(), Range: r})
	}
	entry := newTestHost(t, WithLatency(oneWay, 1e9/8))
	ctx := context.Background()
	r, err := entry.OpenRoute(ctx, 7, c.hops, WithModel(testModel))
	if err != nil {
		t.Fatal(err)
	}
	generate(t, c, r, []int32{1, 2, 3}, 4) // checks every token
	var steps []time.Duration
	for p := int32(7); p < 14; p++ { // generate left the session at position 7
		start := time.Now()
		if _, err := r.Step(ctx, []int32{p}, []int32{5}, sample.Params{}, nil, false); err != nil {
			t.Fatal(err)
		}
		steps = append(steps, time.Since(start))
	}
	slices.Sort(steps)
	t.Logf("decode steps over 6 links of %s: %v", oneWay, steps)
	// Each step waits six latencies at least; the fastest of seven under twelve catches a
	// link delayed twice, and no load makes all seven that slow.
	if steps[0] < 6*oneWay || steps[0] >= 12*oneWay {
		t.Fatalf("fastest step %s, want about %s", steps[0], 6*oneWay)
	}
	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	c.waitClosed(t)
}

func TestLatencyRejectsNegative(t *testing.T) {
	if _, err := New(context.Background(), WithListen("/ip4/127.0.0.1/tcp/0"), WithLatency(-time.Millisecond, 0)); err == nil {
		t.Fatal("negative latency accepted")
	}
	if _, err := New(context.Background(), WithListen("/ip4/127.0.0.1/tcp/0"), WithLatency(0, -1)); err == nil {
		t.Fatal("negative bandwidth accepted")
	}
}

func TestParseBandwidth(t *testing.T) {
	for in, want := range map[string]float64{
		"1Gbit": 125e6, "100Mbit/s": 12.5e6, "10MB/s": 10e6, "512KiB": 512 << 10, "2000": 2000, "": 0, "1gbps": 125e6,
	} {
		got, err := ParseBandwidth(in)
		if err != nil || got != want {
			t.Errorf("ParseBandwidth(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"fast", "-1Gbit", "1Xbit", "NaN"} {
		if _, err := ParseBandwidth(bad); err == nil {
			t.Errorf("ParseBandwidth(%q) accepted", bad)
		}
	}
}
