package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
)

// Route is one session's chain of stages, seen from the entry node: it holds the stream to
// the first stage, which holds the stream to the second, and so on. Its methods are safe for
// concurrent use; steps run one at a time.
type Route struct {
	h      *Host
	id     uint64
	hops   []Hop
	codec  quant.Codec
	maxCtx int
	nx     *hop
	tag    string

	mu     sync.Mutex
	step   uint64
	logits []float32
	closed bool
}

// Result is a step's answer: the token sampled after its last position.
type Result struct {
	Token   int32
	Logprob float32
	Top     []sample.TokenLogprob // the StepExtras.TopLogprobs most likely tokens, best first
	Logits  []float32             // when asked for; valid until the next Step
	// Embedding and Pooling answer a step with StepExtras.Embed (see shard.Output).
	Embedding []float32
	Pooling   uint8
}

// StepExtras are a step's optional requests beyond sampling settings: a logit bias (at most
// sample.MaxBias entries) and top logprobs (at most sample.MaxTopLogprobs). A stage from
// before them ignores both; a result that lacks the top logprobs asked for is an error.
type StepExtras struct {
	Bias        []sample.Bias
	TopLogprobs int
	// Embed asks for the pooled final hidden state instead of a token (Result.Embedding).
	Embed bool
}

// RouteOption configures OpenRoute.
type RouteOption func(*routeConfig)

type routeConfig struct {
	model      string
	codec      quant.Codec
	maxContext int
	frameOpts  []FrameOption
}

// WithModel names the model (its sha256) whose stages the route must reach.
func WithModel(sha256 string) RouteOption { return func(c *routeConfig) { c.model = sha256 } }

// WithCodec sets how activations travel between the route's stages (default f16).
func WithCodec(c quant.Codec) RouteOption { return func(c2 *routeConfig) { c2.codec = c } }

// WithMaxContext asks every stage to hold n tokens for the session (default: whatever they
// hold; see Route.MaxContext).
func WithMaxContext(n int) RouteOption { return func(c *routeConfig) { c.maxContext = n } }

// WithRouteFrameOptions sets the frame limits and timeouts of the entry's stream.
func WithRouteFrameOptions(opts ...FrameOption) RouteOption {
	return func(c *routeConfig) { c.frameOpts = append(c.frameOpts, opts...) }
}

// ErrRouteClosed is returned by Step on a route that was closed or broken.
var ErrRouteClosed = errors.New("route closed")

// OpenRoute opens session on the chain of hops, which must cover the model's layers in
// order from layer 0. It returns when every stage has opened the session.
func (h *Host) OpenRoute(ctx context.Context, session uint64, hops []Hop, opts ...RouteOption) (*Route, error) {
	cfg := routeConfig{codec: quant.CodecF16}
	for _, o := range opts {
		o(&cfg)
	}
	if !cfg.codec.Valid() {
		return nil, fmt.Errorf("open route: unknown codec %d", uint8(cfg.codec))
	}
	if len(hops) == 0 {
		return nil, errors.New("open route: no hops")
	}
	if hops[0].Range.Start != 0 {
		return nil, fmt.Errorf("open route: first hop starts at layer %d, not 0", hops[0].Range.Start)
	}
	for i := 1; i < len(hops); i++ {
		if hops[i].Range.Start != hops[i-1].Range.End {
			return nil, fmt.Errorf("open route: hop %d starts at layer %d, hop %d ends at %d", i, hops[i].Range.Start, i-1, hops[i-1].Range.End)
		}
	}
	nx, err := h.dialStage(ctx, hops[0].Peer, cfg.frameOpts)
	if err != nil {
		var se *StageError
		if errors.As(err, &se) {
			return nil, err
		}
		return nil, &StageError{Peer: hops[0].Peer.ID, Code: CodeUnreachable, Message: err.Error()}
	}
	opened, err := nx.open(ctx, &Header{
		Kind: KindOpen, Session: session, Model: cfg.model, Range: hops[0].Range,
		MaxContext: cfg.maxContext, Codec: cfg.codec,
	}, hops[1:])
	if err != nil {
		nx.st.Reset()
		var se *StageError
		if errors.As(err, &se) || ctx.Err() != nil {
			return nil, fmt.Errorf("open route: %w", err)
		}
		return nil, fmt.Errorf("open route: %w", &StageError{Peer: hops[0].Peer.ID, Code: CodeUnreachable, Message: err.Error()})
	}
	r := &Route{
		h: h, id: session, hops: append([]Hop(nil), hops...), codec: cfg.codec, maxCtx: opened.MaxContext, nx: nx,
		tag: fmt.Sprintf("strata/route/%d", session),
	}
	if nx.peer != h.ID() {
		h.Protect(nx.peer, r.tag)
	}
	return r, nil
}

// Session is the route's session id.
func (r *Route) Session() uint64 { return r.id }

// Hops is the route's chain of stages.
func (r *Route) Hops() []Hop { return r.hops }

// MaxContext is the number of tokens the session may reach: the least any stage holds.
func (r *Route) MaxContext() int { return r.maxCtx }

// Step runs positions through the chain and returns the sampled token. tokens are the ids
// at those positions; recent are the tokens for the repeat penalty. Cancelling ctx aborts
// the step on every stage and breaks the route. A StageError for one step (a bad input,
// a full context) leaves the route usable; a broken stream does not.
func (r *Route) Step(ctx context.Context, positions, tokens []int32, sampling sample.Params, recent []int32, wantLogits bool) (Result, error) {
	return r.StepWith(ctx, positions, tokens, sampling, recent, wantLogits, StepExtras{})
}

// StepWith is Step with extras.
func (r *Route) StepWith(ctx context.Context, positions, tokens []int32, sampling sample.Params, recent []int32, wantLogits bool, ex StepExtras) (Result, error) {
	if len(ex.Bias) > sample.MaxBias {
		return Result{}, fmt.Errorf("%d logit bias entries, at most %d", len(ex.Bias), sample.MaxBias)
	}
	if ex.TopLogprobs < 0 || ex.TopLogprobs > sample.MaxTopLogprobs {
		return Result{}, fmt.Errorf("top logprobs %d: must be in [0, %d]", ex.TopLogprobs, sample.MaxTopLogprobs)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return Result{}, ErrRouteClosed
	}
	r.step++
	nx := r.nx
	req := &nx.fwd
	*req = Header{
		Kind: KindForward, Session: r.id, Step: r.step, Positions: positions, Tokens: tokens,
		Sampling: sampling, Recent: recent, WantLogits: wantLogits, TopN: ex.TopLogprobs, Embed: ex.Embed,
	}
	for _, b := range ex.Bias {
		req.BiasTokens = append(req.BiasTokens, b.Token)
		req.BiasValues = append(req.BiasValues, b.Value)
	}
	// Only a reset here: a cancel frame would race with this goroutine's own writes. The
	// stage sees the reset as an abort all the same.
	stop := context.AfterFunc(ctx, func() { nx.st.Reset() })
	defer stop()
	sent := time.Now()
	if err := nx.w.WriteFrame(req, nil); err != nil {
		return Result{}, r.broken(ctx, fmt.Errorf("send step: %w", err))
	}
	rep := &nx.hdr
	payload, err := nx.r.ReadFrame(rep)
	if err != nil {
		return Result{}, r.broken(ctx, fmt.Errorf("wait for step %d: %w", r.step, err))
	}
	if rep.Step != r.step {
		return Result{}, r.broken(ctx, fmt.Errorf("answer for step %d, expected %d", rep.Step, r.step))
	}
	switch rep.Kind {
	case KindError:
		se := nx.stageError(rep)
		if fatalCode(se.Code) {
			// The stage that said so has ended the session: the route is gone.
			r.closed = true
			nx.st.Reset()
			r.unprotect()
		}
		return Result{}, se
	case KindResult:
		r.h.observeHop(nx.peer, sent)
	default:
		return Result{}, r.broken(ctx, fmt.Errorf("step answered with %s", rep.Kind))
	}
	res := Result{Token: rep.Token, Logprob: rep.Logprob}
	if ex.Embed {
		if rep.Codec != quant.CodecF32 || len(rep.Shape) != 1 || rep.Shape[0]*4 != len(payload) || rep.Shape[0] == 0 {
			if len(payload) == 0 {
				// The last stage predates embeddings: it sampled a token instead.
				return res, errors.New("the last stage returned no embedding (a node too old for embeddings?)")
			}
			return Result{}, r.broken(ctx, fmt.Errorf("embedding in %s with shape %v and %d bytes", rep.Codec, rep.Shape, len(payload)))
		}
		res.Embedding = make([]float32, rep.Shape[0])
		if err := quant.CodecF32.Decode(res.Embedding, payload); err != nil {
			return Result{}, r.broken(ctx, fmt.Errorf("embedding: %w", err))
		}
		res.Pooling = rep.Pooling
		return res, nil
	}
	if ex.TopLogprobs > 0 {
		if len(rep.TopIDs) == 0 {
			// The last stage predates top logprobs: say so rather than answer without them.
			return res, fmt.Errorf("the last stage returned no top logprobs of the %d asked for (a node too old for logprobs?)", ex.TopLogprobs)
		}
		res.Top = make([]sample.TokenLogprob, len(rep.TopIDs))
		for i, id := range rep.TopIDs {
			res.Top[i] = sample.TokenLogprob{Token: id, Logprob: rep.TopProbs[i]}
		}
	}
	if wantLogits {
		if rep.Codec != quant.CodecF32 || len(rep.Shape) != 1 {
			return Result{}, r.broken(ctx, fmt.Errorf("logits in %s with shape %v", rep.Codec, rep.Shape))
		}
		if cap(r.logits) < rep.Shape[0] {
			r.logits = make([]float32, rep.Shape[0])
		}
		r.logits = r.logits[:rep.Shape[0]]
		if err := quant.CodecF32.Decode(r.logits, payload); err != nil {
			return Result{}, r.broken(ctx, fmt.Errorf("logits: %w", err))
		}
		res.Logits = r.logits
	}
	return res, nil
}

// broken marks the route unusable after a stream failure and says which hop to blame.
func (r *Route) broken(ctx context.Context, err error) error {
	r.closed = true
	r.nx.st.Reset()
	r.unprotect()
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	}
	return &StageError{Peer: r.nx.peer, Code: CodeUnreachable, Message: err.Error()}
}

// Close ends the session on every stage and waits until the chain has closed it, or ctx
// ends (then the chain is aborted instead).
func (r *Route) Close(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	defer r.unprotect()
	nx := r.nx
	nx.hdr = Header{Kind: KindClose, Session: r.id}
	if err := nx.w.WriteFrame(&nx.hdr, nil); err != nil {
		nx.st.Reset()
		return fmt.Errorf("close route: %w", err)
	}
	nx.st.CloseWrite()
	stop := context.AfterFunc(ctx, func() { abortHop(nx, r.id) })
	defer stop()
	for {
		if _, err := nx.r.ReadFrame(&nx.hdr); err != nil {
			if errors.Is(err, io.EOF) {
				nx.st.Close()
				return nil
			}
			nx.st.Reset()
			if ctx.Err() != nil {
				return fmt.Errorf("close route: %w", context.Cause(ctx))
			}
			return fmt.Errorf("close route: %w", err)
		}
	}
}

// Abort cancels the session on every stage without waiting.
func (r *Route) Abort() {
	if !r.mu.TryLock() {
		// A Step or Close is running: resetting the stream ends it, and it marks the route
		// closed.
		r.nx.st.Reset()
		return
	}
	defer r.mu.Unlock()
	if !r.closed {
		r.closed = true
		abortHop(r.nx, r.id)
		r.unprotect()
	}
}

// fatalCode reports whether a stage ends the session after answering with code.
func fatalCode(c ErrorCode) bool {
	switch c {
	case CodeUnreachable, CodeStalled, CodeTooLarge, CodeClosing:
		return true
	}
	return false
}

func (r *Route) unprotect() {
	if r.nx.peer != r.h.ID() {
		r.h.Unprotect(r.nx.peer, r.tag)
	}
}

// pipeEnd is one end of an in-process stream, for a hop to this host's own stage.
type pipeEnd struct {
	r *io.PipeReader
	w *io.PipeWriter
}

var errPipeReset = errors.New("stream reset")

func newPipe() (a, b *pipeEnd) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &pipeEnd{r: ar, w: aw}, &pipeEnd{r: br, w: bw}
}

func (p *pipeEnd) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p *pipeEnd) Write(b []byte) (int, error) { return p.w.Write(b) }
func (p *pipeEnd) CloseWrite() error           { return p.w.Close() }
func (p *pipeEnd) CloseRead() error            { return p.r.CloseWithError(errPipeReset) }

func (p *pipeEnd) Close() error {
	p.w.Close()
	return p.r.Close()
}

func (p *pipeEnd) Reset() error {
	p.w.CloseWithError(errPipeReset)
	return p.r.CloseWithError(errPipeReset)
}
