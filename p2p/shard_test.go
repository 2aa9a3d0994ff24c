package p2p

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// Executor is what the stage protocol needs; shard.Stage must provide it.
var _ Executor = (*shard.Stage)(nil)

// tinyModel is the synthesized tiny model, loaded as ggml stages on demand.
type tinyModel struct {
	t      *testing.T
	path   string
	dir    string
	layers int
	sha    string
}

func newTinyModel(t *testing.T) *tinyModel {
	t.Helper()
	if testing.Short() {
		t.Skip("loads ggml stages")
	}
	path := testkit.TinyModel(t)
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	return &tinyModel{t: t, path: path, dir: t.TempDir(), layers: info.Layers}
}

func (m *tinyModel) load(r shard.Range) *shard.Stage {
	m.t.Helper()
	st, err := shard.LoadStage(context.Background(), m.path, r, shard.WithSliceDir(m.dir), shard.WithCacheType("f32"),
		shard.WithMaxSessions(4), shard.WithThreads(1))
	if err != nil {
		m.t.Fatalf("load %s: %v", r, err)
	}
	m.t.Cleanup(func() { st.Close() })
	if m.sha = st.Info().ModelSHA256; m.sha == "" {
		m.t.Fatal("stage reports no model digest")
	}
	return st
}

// serve starts a host per range serving it, and returns the route through them.
func (m *tinyModel) serve(opts []StageOption, ranges ...shard.Range) ([]*Host, []Hop) {
	m.t.Helper()
	var hosts []*Host
	var hops []Hop
	for _, r := range ranges {
		st := m.load(r)
		h := newTestHost(m.t)
		if err := h.ServeStage(st, opts...); err != nil {
			m.t.Fatal(err)
		}
		hosts = append(hosts, h)
		hops = append(hops, Hop{Peer: h.AddrInfo(), Range: r})
	}
	return hosts, hops
}

// thirds cuts the model in three stages.
func (m *tinyModel) thirds() []shard.Range {
	return []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: m.layers}}
}

// wholeGreedy is the reference: the whole model on one shard.Stage, called in-process with
// no wire at all, sampled greedily as a last stage samples. It returns n tokens and the
// logits the last of them was sampled from.
func (m *tinyModel) wholeGreedy(prompt []int32, n int) ([]int32, []float32) {
	m.t.Helper()
	st := m.load(shard.Range{Start: 0, End: m.layers})
	ctx := context.Background()
	if err := st.OpenSession(1); err != nil {
		m.t.Fatal(err)
	}
	defer st.CloseSession(1)
	pos := make([]int32, len(prompt))
	for i := range pos {
		pos[i] = int32(i)
	}
	var toks []int32
	var logits []float32
	tokens := prompt
	for i := 0; i < n; i++ {
		out, err := st.Forward(ctx, shard.Step{Session: 1, Positions: pos, Tokens: tokens})
		if err != nil {
			m.t.Fatalf("whole model step %d: %v", i, err)
		}
		tok, _ := sample.Sample(out.Logits, sample.Params{}, nil, pos[len(pos)-1])
		toks, logits = append(toks, tok), out.Logits
		pos, tokens = []int32{pos[len(pos)-1] + 1}, []int32{tok}
	}
	return toks, slices.Clone(logits)
}

// generateGreedy runs prompt and n-1 decode steps through a route and returns the n tokens
// and the logits the last one was sampled from.
func generateGreedy(ctx context.Context, entry *Host, hops []Hop, model string, codec quant.Codec, session uint64,
	prompt []int32, n int) ([]int32, []float32, error) {
	r, err := entry.OpenRoute(ctx, session, hops, WithModel(model), WithCodec(codec))
	if err != nil {
		return nil, nil, fmt.Errorf("open route: %w", err)
	}
	defer r.Close(ctx)
	pos := make([]int32, len(prompt))
	for i := range pos {
		pos[i] = int32(i)
	}
	res, err := r.Step(ctx, pos, prompt, sample.Params{}, nil, n == 1)
	if err != nil {
		return nil, nil, fmt.Errorf("prefill: %w", err)
	}
	toks := []int32{res.Token}
	for i := 1; i < n; i++ {
		p := int32(len(prompt) + i - 1)
		if res, err = r.Step(ctx, []int32{p}, []int32{res.Token}, sample.Params{}, nil, i == n-1); err != nil {
			return nil, nil, fmt.Errorf("decode step %d: %w", i, err)
		}
		toks = append(toks, res.Token)
	}
	return toks, slices.Clone(res.Logits), nil
}

func maxAbsDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var d float64
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

var tinyPrompt = []int32{1, 400, 17, 999, 3, 42, 7}

// TestRealStagesChain runs the tiny synthesized model cut in three on three hosts, against
// the whole model run in-process. Over an f32 wire the split route must give the same greedy
// tokens, with last-step logits equal to float rounding; over f16 the same greedy tokens;
// q8's divergence is measured and logged.
func TestRealStagesChain(t *testing.T) {
	m := newTinyModel(t)
	const n = 16
	wantToks, wantLogits := m.wholeGreedy(tinyPrompt, n)
	_, hops := m.serve(nil, m.thirds()...)
	entry := newTestHost(t)
	for i, codec := range []quant.Codec{quant.CodecF32, quant.CodecF16, quant.CodecQ8} {
		toks, logits, err := generateGreedy(context.Background(), entry, hops, m.sha, codec, uint64(i+1), tinyPrompt, n)
		if err != nil {
			t.Fatalf("%s wire: %v", codec, err)
		}
		same := 0
		for i := range toks {
			if toks[i] == wantToks[i] {
				same++
			}
		}
		diff := maxAbsDiff(logits, wantLogits)
		t.Logf("%s wire: %d/%d greedy tokens as the whole model, last-step logits max diff %.3g", codec, same, len(toks), diff)
		switch codec {
		case quant.CodecF32:
			if same != n || diff > 1e-4 {
				t.Errorf("split over an f32 wire differs from the whole model: tokens %v vs %v, logit diff %g", toks, wantToks, diff)
			}
		case quant.CodecF16:
			if same != n {
				t.Errorf("split over an f16 wire changes greedy tokens: %v vs %v", toks, wantToks)
			}
		}
	}
}

// TestEmbeddingThroughRealStages: an Embed step through three ggml stages over libp2p
// returns the whole model's pooled final hidden state (f32 wire: identical), and the route
// stays usable for the next step.
func TestEmbeddingThroughRealStages(t *testing.T) {
	m := newTinyModel(t)
	whole := m.load(shard.Range{Start: 0, End: m.layers})
	if err := whole.OpenSession(1); err != nil {
		t.Fatal(err)
	}
	pos := make([]int32, len(tinyPrompt))
	for i := range pos {
		pos[i] = int32(i)
	}
	want, err := whole.Forward(context.Background(), shard.Step{Session: 1, Positions: pos, Tokens: tinyPrompt, Embed: true})
	if err != nil {
		t.Fatal(err)
	}
	_, hops := m.serve(nil, m.thirds()...)
	entry := newTestHost(t)
	ctx := context.Background()
	r, err := entry.OpenRoute(ctx, 9, hops, WithModel(m.sha), WithCodec(quant.CodecF32))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	res, err := r.StepWith(ctx, pos, tinyPrompt, sample.Params{}, nil, false, StepExtras{Embed: true})
	if err != nil {
		t.Fatal(err)
	}
	if d := maxAbsDiff(res.Embedding, want.Embedding); d != 0 || shard.Pooling(res.Pooling) != want.Pooling {
		t.Fatalf("embedding through the swarm differs from the whole model by %g (pooling %d vs %v)", d, res.Pooling, want.Pooling)
	}
	if _, err := r.StepWith(ctx, []int32{int32(len(pos))}, tinyPrompt[:1], sample.Params{}, nil, false, StepExtras{Embed: true}); err != nil {
		t.Fatalf("next step on the same route: %v", err)
	}
}

// TestHostilePeerRealStages: while an entry generates greedily through three ggml stages, a
// peer floods the middle stage with garbage. Every garbage frame is refused and counted, and
// every healthy generation gives exactly the whole model's tokens.
func TestHostilePeerRealStages(t *testing.T) {
	m := newTinyModel(t)
	const n = 16
	wantToks, wantLogits := m.wholeGreedy(tinyPrompt, n)
	hosts, hops := m.serve([]StageOption{WithStageTimeouts(0, 0, 500*time.Millisecond), WithStageFrameLimits(16<<10, 1<<20)},
		m.thirds()...)
	entry, attacker := newTestHost(t), newTestHost(t)
	mid := hops[1]
	hidden := 64 // the tiny preset's

	// The healthy side: one generation after another, each checked, until told to stop.
	var (
		mu          sync.Mutex
		generations int
	)
	started := make(chan struct{})
	stop := make(chan struct{})
	healthy := make(chan error, 1)
	go func() {
		for g := 0; ; g++ {
			if g == 1 {
				close(started)
			}
			toks, logits, err := generateGreedy(context.Background(), entry, hops, m.sha, quant.CodecF32, uint64(100+g), tinyPrompt, n)
			if err != nil {
				healthy <- fmt.Errorf("generation %d: %w", g, err)
				return
			}
			if !slices.Equal(toks, wantToks) {
				healthy <- fmt.Errorf("generation %d: tokens %v, the whole model's %v", g, toks, wantToks)
				return
			}
			if d := maxAbsDiff(logits, wantLogits); d > 1e-4 {
				healthy <- fmt.Errorf("generation %d: last-step logits differ from the whole model's by %g", g, d)
				return
			}
			mu.Lock()
			generations++
			mu.Unlock()
			select {
			case <-stop:
				healthy <- nil
				return
			default:
			}
		}
	}()
	<-started

	// The hostile side: a session of its own on the middle stage, routed on to the real
	// last stage, and frames a well-behaved first stage never sends.
	const session = 7
	rs := openRawWith(t, attacker, mid, func() Header {
		h := Header{Kind: KindOpen, Session: session, Model: m.sha, Range: mid.Range, Codec: quant.CodecF32}
		var err error
		if h.NextHops, h.NextRanges, err = encodeHops(hops[2:]); err != nil {
			t.Fatal(err)
		}
		return h
	}())
	acts := make([]float32, 2*hidden)
	for i := range acts {
		acts[i] = float32(math.Sin(float64(i)))
	}
	good, _ := quant.CodecF32.Append(nil, acts)
	fwd := func(step uint64) Header {
		return Header{Kind: KindForward, Session: session, Step: step, Positions: []int32{0, 1}, Codec: quant.CodecF32, Shape: []int{2, hidden}}
	}
	nan := slices.Clone(acts)
	nan[33] = float32(math.NaN())
	nanBytes, _ := quant.CodecF32.Append(nil, nan)
	big := make([]byte, 512<<10)
	type garbage struct {
		name    string
		edit    func(*Header)
		payload []byte
		code    ErrorCode
	}
	frames := []garbage{
		{"payload short of its shape", nil, good[:len(good)-4], CodeBadShape},
		{"payload far larger than its shape", nil, big, CodeBadShape},
		{"unknown kind", func(h *Header) { *h = Header{Kind: 77, Session: session, Step: h.Step} }, nil, CodeUnknownKind},
		{"wrong shape", func(h *Header) { h.Shape = []int{2, hidden + 1} }, good, CodeBadShape},
		{"batch over the stage's limit", func(h *Header) {
			h.Positions = make([]int32, 300)
			h.Shape = []int{300, hidden}
		}, make([]byte, 300*hidden*4), CodeBadShape},
		{"codec not the session's", func(h *Header) { h.Codec = quant.CodecF16 }, good[:len(good)/2], CodeBadCodec},
		{"NaN activations", nil, nanBytes, CodeNonFinite},
		{"unknown session", func(h *Header) { h.Session = 100 }, good, CodeUnknownSession},
	}
	healthyDone := func() int {
		mu.Lock()
		defer mu.Unlock()
		return generations
	}
	// Garbage flows until at least two whole generations ran inside its window.
	before := healthyDone()
	var step uint64
	rounds := 0
	for ; rounds < 20 || healthyDone() < before+3; rounds++ {
		if rounds == 2000 {
			t.Fatal("the healthy side made no progress while the garbage flowed")
		}
		for _, g := range frames {
			step++
			h := fwd(step)
			if g.edit != nil {
				g.edit(&h)
			}
			ans := rs.send(t, h, g.payload)
			if ans.Kind != KindError || ans.Code != g.code || ans.Step != step {
				t.Fatalf("%s: answered %s %s %q for step %d, want error %s for step %d", g.name, ans.Kind, ans.Code, ans.Message, ans.Step, g.code, step)
			}
		}
		// A payload corrupted in flight: the header's checksum is not the payload's.
		step++
		h := fwd(step)
		h.PayloadLen, h.Checksum = uint32(len(good)), Checksum(good)^1
		writeRaw(t, rs.st, encodeHeader(t, h), good)
		if _, err := rs.r.ReadFrame(&rs.h); err != nil || rs.h.Kind != KindError || rs.h.Code != CodeChecksum {
			t.Fatalf("bad checksum: %v, answered %s %s %q", err, rs.h.Kind, rs.h.Code, rs.h.Message)
		}
		// Frames no reader can step over end their own stream, and only it.
		for _, raw := range [][]byte{
			{0x7f, 0xff, 0xff, 0xff}, // a header over the limit
			append([]byte{0, 0, 0, 40, 0x85}, slices.Repeat([]byte{0xc1}, 39)...), // a map of reserved codes
		} {
			fs := dialRaw(t, attacker, mid)
			fs.st.Write(raw)
			var fh Header
			if _, err := fs.r.ReadFrame(&fh); err == nil && fh.Kind != KindError {
				t.Fatalf("garbage stream answered %s", fh.Kind)
			}
			fs.st.Reset()
		}
	}
	close(stop)
	if err := <-healthy; err != nil {
		t.Fatalf("healthy side: %v", err)
	}
	t.Logf("%d healthy generations of %d tokens, all the whole model's, %d of them while %d rounds of garbage flowed",
		healthyDone(), n, healthyDone()-before, rounds)

	// The hostile session itself still works: a good step runs on the real stages. (Only
	// now, so that its batch cannot share a forward with the healthy steps above.)
	if ans := rs.send(t, fwd(step+1), good); ans.Kind != KindResult {
		t.Fatalf("a good step after the garbage: %s %s %q", ans.Kind, ans.Code, ans.Message)
	}
	st := hosts[1].Stats()
	t.Logf("middle stage stats: %+v", st)
	want := map[string]uint64{
		"bad_shape": uint64(4 * rounds), "unknown_kind": uint64(rounds), "bad_codec": uint64(rounds),
		"non_finite": uint64(rounds), "unknown_session": uint64(rounds), "checksum": uint64(rounds),
		"too_large": uint64(rounds), "bad_request": uint64(rounds),
	}
	for reason, n := range want {
		if st.Rejected[reason] != n {
			t.Errorf("%s refusals counted %d times, want %d", reason, st.Rejected[reason], n)
		}
	}
	if st.Inflight != 0 {
		t.Errorf("%d bytes still in flight on the middle stage", st.Inflight)
	}
	for _, h := range []*Host{hosts[0], hosts[2]} {
		if r := h.Stats().Rejected; len(r) != 0 {
			t.Errorf("a stage the attacker never spoke to refused frames: %v", r)
		}
	}
	rs.st.Close()
}
