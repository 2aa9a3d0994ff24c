package p2p

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func fullHeader() Header {
	return Header{
		Kind: KindOpen, Session: 1<<63 + 5, Step: 1 << 40, Positions: []int32{0, 1, 2, 1 << 30},
		Tokens: []int32{-1, 7, 128000}, Codec: quant.CodecQ8, Shape: []int{3, 4096},
		Model: "ab12", Range: shard.Range{Start: 3, End: 9}, MaxContext: 8192,
		NextHops:   []string{"/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"},
		NextRanges: []shard.Range{{Start: 9, End: 12}},
		Sampling: sample.Params{Temperature: 0.7, TopK: 40, TopP: 0.9, MinP: 0.05, RepeatPenalty: 1.1, RepeatLastN: 64, Seed: 42,
			PresencePenalty: -0.5, FrequencyPenalty: 1.5, PenaltyStart: 17},
		Recent: []int32{5, 6}, WantLogits: true, Token: -3, Logprob: -0.25,
		BiasTokens: []int32{3, 128000}, BiasValues: []float32{-100, 2.5}, TopN: 20,
		TopIDs: []int32{9, 1}, TopProbs: []float32{-0.1, -2.75},
		Code: CodeBusy, Message: "why", Origin: "someone", Embed: true, Pooling: 3,
	}
}

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	r := NewReader(&buf)
	payloads := [][]byte{nil, {1, 2, 3}, bytes.Repeat([]byte{9}, smallPayload+1)}
	var got Header
	for _, p := range payloads {
		want := fullHeader()
		if err := w.WriteFrame(&want, p); err != nil {
			t.Fatal(err)
		}
		if want.PayloadLen != uint32(len(p)) || (len(p) > 0 && want.Checksum != Checksum(p)) {
			t.Fatalf("WriteFrame did not set length/checksum: %d %#x", want.PayloadLen, want.Checksum)
		}
		pl, err := r.ReadFrame(&got)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("header round trip:\n got %+v\nwant %+v", got, want)
		}
		if !bytes.Equal(pl, p) {
			t.Fatal("payload differs")
		}
	}
	// A sparse header after a full one: nothing leaks from the previous frame.
	sparse := Header{Kind: KindPing, Session: 3}
	if err := w.WriteFrame(&sparse, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadFrame(&got); err != nil {
		t.Fatal(err)
	}
	if got.Kind != KindPing || got.Session != 3 || len(got.Positions) != 0 || got.Model != "" || got.Range != (shard.Range{}) ||
		got.Sampling != (sample.Params{}) || got.WantLogits || got.Token != 0 {
		t.Fatalf("stale fields after reset: %+v", got)
	}
	if _, err := r.ReadFrame(&got); err != io.EOF {
		t.Fatalf("clean end of stream: got %v, want io.EOF", err)
	}
}

func TestFrameNoAllocs(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	r := NewReader(&buf)
	payload := make([]byte, 4<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	h := Header{Kind: KindForward, Session: 9, Positions: make([]int32, 512), Codec: quant.CodecF16,
		Shape: []int{512, 4096}, Sampling: sample.Params{Temperature: 1, TopK: 40}, Recent: make([]int32, 64)}
	var got Header
	round := func() {
		h.Step++
		if err := w.WriteFrame(&h, payload); err != nil {
			t.Fatal(err)
		}
		if _, err := r.ReadFrame(&got); err != nil {
			t.Fatal(err)
		}
	}
	round() // grow the buffers
	if n := testing.AllocsPerRun(20, round); n != 0 {
		t.Fatalf("%v allocations per 4 MiB frame written and read with reused buffers", n)
	}
}

func writeRaw(t testing.TB, w io.Writer, hdr []byte, payload []byte) {
	t.Helper()
	var pre [4]byte
	binary.BigEndian.PutUint32(pre[:], uint32(len(hdr)))
	w.Write(pre[:])
	w.Write(hdr)
	w.Write(payload)
}

// encodeHeader encodes h as it is, PayloadLen and Checksum included.
func encodeHeader(t testing.TB, h Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := h.encode(msgpack.NewEncoder(&buf)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestFrameErrors(t *testing.T) {
	read := func(b []byte, opts ...FrameOption) error {
		_, err := NewReader(bytes.NewReader(b), opts...).ReadFrame(&Header{})
		return err
	}
	frame := func(h Header, payload []byte) []byte {
		var buf bytes.Buffer
		if err := NewWriter(&buf).WriteFrame(&h, payload); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	good := frame(Header{Kind: KindForward, Session: 1}, []byte("payload"))

	cases := []struct {
		name string
		b    []byte
		opts []FrameOption
		want error
	}{
		{"huge header length", []byte{0xff, 0xff, 0xff, 0xff, 1, 2}, nil, ErrFrameTooLarge},
		{"empty header", []byte{0, 0, 0, 0}, nil, ErrMalformed},
		{"header over limit", good, []FrameOption{WithMaxHeader(3)}, ErrFrameTooLarge},
		{"payload over limit", good, []FrameOption{WithMaxPayload(6)}, ErrFrameTooLarge},
		{"not a map", append([]byte{0, 0, 0, 1}, 0x05), nil, ErrMalformed},
		{"no kind", []byte{0, 0, 0, 4, 0x81, 0xa1, 's', 0x01}, nil, ErrMalformed},
		{"truncated header", good[:8], nil, io.ErrUnexpectedEOF},
		{"truncated length", good[:2], nil, io.ErrUnexpectedEOF},
		{"truncated payload", good[:len(good)-1], nil, io.ErrUnexpectedEOF},
	}
	bad := append([]byte(nil), good...)
	bad[len(bad)-1] ^= 1
	cases = append(cases, struct {
		name string
		b    []byte
		opts []FrameOption
		want error
	}{"bad checksum", bad, nil, ErrChecksum})

	// Array lengths that claim more elements than the header has bytes: msgpack would
	// allocate them up front; the decoder must refuse before allocating.
	for i, hdr := range [][]byte{
		{0x82, 0xa1, 'k', 0x03, 0xa1, 'p', 0xdd, 0x7f, 0xff, 0xff, 0xff},                         // positions: array32 of 2^31-1
		{0x82, 0xa1, 'k', 0x03, 0xa1, 'h', 0xdc, 0xff, 0xff},                                     // next hops: array16 of 65535
		{0x82, 0xa1, 'k', 0x03, 0xa1, 'm', 0xdb, 0x7f, 0xff, 0xff, 0xff},                         // model: str32 of 2 GiB
		{0xdf, 0x7f, 0xff, 0xff, 0xff, 0xa1, 'k', 0x03},                                          // map32 of 2^31-1 entries
		{0x82, 0xa1, 'k', 0x03, 0xa2, 's', 'h', 0x91, 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0},           // negative shape
		{0x82, 0xa1, 'k', 0x03, 0xa1, 'n', 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, // payload length over uint32
		{0x81, 0xa1, 'k', 0xa1, 'x'},                                                             // kind is a string
		{0x82, 0xa1, 'k', 0x03, 0xa1, 't', 0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0},                   // token over int32
	} {
		var buf bytes.Buffer
		writeRaw(t, &buf, hdr, nil)
		cases = append(cases, struct {
			name string
			b    []byte
			opts []FrameOption
			want error
		}{fmt.Sprintf("hostile header %d", i), buf.Bytes(), nil, ErrMalformed})
	}
	for _, tc := range cases {
		err := read(tc.b, tc.opts...)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if err := read(good); err != nil {
		t.Fatalf("good frame: %v", err)
	}
}

func TestUnknownFieldsSkipped(t *testing.T) {
	// A newer peer's field, between known ones, is skipped.
	hdr := []byte{0x83, 0xa1, 'k', 0x03, 0xa3, 'z', 'z', 'z', 0x92, 0x01, 0xa1, 'y', 0xa1, 's', 0x07}
	var h Header
	if err := DecodeHeader(hdr, &h); err != nil {
		t.Fatal(err)
	}
	if h.Kind != KindForward || h.Session != 7 {
		t.Fatalf("got %+v", h)
	}
}

// TestExtrasBounded: logit bias and top logprobs must come in pairs and within bounds.
func TestExtrasBounded(t *testing.T) {
	for _, h := range []Header{
		{Kind: KindForward, BiasTokens: []int32{1, 2}, BiasValues: []float32{1}},
		{Kind: KindForward, BiasTokens: make([]int32, sample.MaxBias+1), BiasValues: make([]float32, sample.MaxBias+1)},
		{Kind: KindResult, TopIDs: []int32{1}},
		{Kind: KindResult, TopIDs: make([]int32, sample.MaxTopLogprobs+1), TopProbs: make([]float32, sample.MaxTopLogprobs+1)},
		{Kind: KindForward, TopN: sample.MaxTopLogprobs + 1},
	} {
		var buf bytes.Buffer
		if err := NewWriter(&buf).WriteFrame(&h, nil); err != nil {
			t.Fatal(err)
		}
		var got Header
		if _, err := NewReader(&buf).ReadFrame(&got); !errors.Is(err, ErrMalformed) {
			t.Errorf("%+v: got %v, want ErrMalformed", h, err)
		}
	}
}

func TestChecksumErrorKeepsStreamInStep(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	h := Header{Kind: KindForward, Session: 1}
	w.WriteFrame(&h, []byte("abc"))
	b := buf.Bytes()
	b[len(b)-1] ^= 0xff
	h2 := Header{Kind: KindPing, Session: 1}
	w.WriteFrame(&h2, nil)
	r := NewReader(&buf)
	var got Header
	if _, err := r.ReadFrame(&got); !errors.Is(err, ErrChecksum) {
		t.Fatalf("got %v, want ErrChecksum", err)
	}
	if _, err := r.ReadFrame(&got); err != nil || got.Kind != KindPing {
		t.Fatalf("next frame after a checksum error: %v %v", got.Kind, err)
	}
}

func TestReadStalls(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	r := NewReader(b, WithFrameTimeout(100*time.Millisecond), WithIdleTimeout(300*time.Millisecond))
	// Idle: nothing at all arrives.
	start := time.Now()
	if _, err := r.ReadFrame(&Header{}); !errors.Is(err, ErrStalled) {
		t.Fatalf("idle stream: got %v, want ErrStalled", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("idle timeout fired after %v", d)
	}
	// Mid-frame: the length arrives, the header never does.
	go a.Write([]byte{0, 0, 0, 10, 0x81})
	if _, err := r.ReadFrame(&Header{}); !errors.Is(err, ErrStalled) {
		t.Fatalf("stalled frame: got %v, want ErrStalled", err)
	}
}

func TestWriteLimits(t *testing.T) {
	w := NewWriter(io.Discard, WithMaxPayload(10), WithMaxHeader(20))
	if err := w.WriteFrame(&Header{Kind: KindForward}, make([]byte, 11)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("payload over limit: %v", err)
	}
	if err := w.WriteFrame(&Header{Kind: KindForward, Positions: make([]int32, 100)}, nil); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("header over limit: %v", err)
	}
}

// FuzzReadFrame reads arbitrary bytes as a stream of frames: no panics, no allocation beyond
// the limits, and whatever decodes re-encodes to a frame that decodes the same.
func FuzzReadFrame(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	h := fullHeader()
	w.WriteFrame(&h, []byte{1, 2, 3, 4})
	f.Add(append([]byte(nil), buf.Bytes()...))
	buf.Reset()
	h = Header{Kind: KindForward, Session: 1, Step: 2, Positions: []int32{5}, Codec: quant.CodecF16, Shape: []int{1, 2}}
	w.WriteFrame(&h, []byte{0, 0x3c, 0, 0x3c})
	h = Header{Kind: KindResult, Session: 1, Step: 2, Token: 9, Logprob: -1}
	w.WriteFrame(&h, nil)
	h = Header{Kind: KindForward, Session: 1, Step: 3, Positions: []int32{0, 1}, Tokens: []int32{4, 5}, Embed: true}
	w.WriteFrame(&h, nil)
	h = Header{Kind: KindResult, Session: 1, Step: 3, Codec: quant.CodecF32, Shape: []int{1}, Pooling: 1}
	w.WriteFrame(&h, []byte{0, 0, 0x80, 0x3f})
	f.Add(append([]byte(nil), buf.Bytes()...))
	f.Add([]byte{0, 0, 0, 3, 0x81, 0xa1, 'k'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 11, 0x82, 0xa1, 'k', 0x03, 0xa1, 'p', 0xdd, 0x7f, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), WithMaxPayload(1<<20), WithMaxHeader(64<<10))
		var h Header
		for i := 0; i < 8; i++ {
			payload, err := r.ReadFrame(&h)
			if err != nil {
				if errors.Is(err, ErrChecksum) {
					continue
				}
				return
			}
			var out bytes.Buffer
			h2 := h
			h2.Positions = append([]int32(nil), h.Positions...)
			if err := NewWriter(&out).WriteFrame(&h2, payload); err != nil {
				t.Fatalf("re-encode %+v: %v", h, err)
			}
			var back Header
			p2, err := NewReader(&out).ReadFrame(&back)
			if err != nil {
				t.Fatalf("re-decode: %v", err)
			}
			if !bytes.Equal(p2, payload) || back.Kind != h.Kind || back.Session != h.Session || back.Step != h.Step ||
				!slicesEqual(back.Positions, h.Positions) || !slicesEqual(back.Tokens, h.Tokens) || back.Model != h.Model ||
				back.Embed != h.Embed || back.Pooling != h.Pooling {
				t.Fatalf("re-decoded frame differs:\n%+v\n%+v", back, h)
			}
		}
	})
}

func slicesEqual[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func BenchmarkFrame4MiB(b *testing.B) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	r := NewReader(&buf)
	payload := make([]byte, 4<<20)
	h := Header{Kind: KindForward, Session: 9, Positions: make([]int32, 512), Codec: quant.CodecF16, Shape: []int{512, 4096}}
	var got Header
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		if err := w.WriteFrame(&h, payload); err != nil {
			b.Fatal(err)
		}
		if _, err := r.ReadFrame(&got); err != nil {
			b.Fatal(err)
		}
	}
}
