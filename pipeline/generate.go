package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/strata-llm/strata/pipeline/grammar"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/shard"
)

// GeneratorOption configures a Generator.
type GeneratorOption func(*Generator)

// WithExactReplay bounds the steps a recovery replays one by one (default 1024). ggml's
// kernels depend on a step's shape, so a session's KV cache is rebuilt bit for bit only by
// replaying its steps as they ran: the prompt's chunks, then each decoded token alone, which
// costs about what those steps cost the first time. A longer session replays its decoded
// tokens in prompt-sized chunks instead: fast, but the continuation may differ from an
// undisturbed run wherever two tokens were within about 1e-4 of each other.
func WithExactReplay(steps int) GeneratorOption { return func(g *Generator) { g.exactReplay = steps } }

// WithChunk sets the prefill chunk: how many prompt tokens travel in one step (default 128).
func WithChunk(n int) GeneratorOption { return func(g *Generator) { g.chunk = n } }

// WithMaxContext bounds prompt plus completion tokens (default 2048).
func WithMaxContext(n int) GeneratorOption { return func(g *Generator) { g.maxContext = n } }

// WithRecovery sets how long a generation keeps trying to rebuild its route after a stage
// fails, and how many times (default 30 s, 8 tries).
func WithRecovery(wait time.Duration, tries int) GeneratorOption {
	return func(g *Generator) { g.recoverFor, g.recoverTries = wait, tries }
}

// WithStepTimeout bounds how long one step may go unanswered before its route counts as
// failed and is rebuilt, as if a stage had reset its stream: base plus perPosition for each
// position the step carries (default off). A step's time is mostly queueing behind other
// sessions' steps on busy stages, which no fixed bound can tell from a hang: measured here,
// a whole 70B-shaped model with 8 streams left one decode step waiting 32 s behind the
// others' prefill, and a timeout there replays healthy sessions and slows every stream
// further. Nodes watch membership instead (a hop whose peer leaves it fails the step);
// this bound is for chains with no such signal.
func WithStepTimeout(base, perPosition time.Duration) GeneratorOption {
	return func(g *Generator) { g.stepBase, g.stepPerPos = base, perPosition }
}

// WithAdmission makes generations that find every route busy wait in a, rather than fail.
func WithAdmission(a *Admission) GeneratorOption { return func(g *Generator) { g.admit = a } }

// WithPromptConcurrency bounds how many prompts are tokenized at once (default GOMAXPROCS).
func WithPromptConcurrency(n int) GeneratorOption {
	return func(g *Generator) { g.encodeSlots = make(chan struct{}, max(1, n)) }
}

// WithGeneratorLogger sets the logger.
func WithGeneratorLogger(l *slog.Logger) GeneratorOption { return func(g *Generator) { g.log = l } }

// Observer is told what generations do, for metrics. Its methods are called on the
// generation's goroutine, from many generations at once: they must be quick and safe for
// concurrent use.
type Observer interface {
	// Started: a generation began.
	Started()
	// Step: one step of n positions went through the route in d (a prefill chunk, a decode
	// step or a replay after a re-route), or failed with err.
	Step(positions int, d time.Duration, err error)
	// Token: the i-th completion token (from 0) was sampled, elapsed after the request began.
	Token(i int, elapsed time.Duration)
	// Rerouted: a stage (peer) failed mid-generation and the route is being rebuilt.
	Rerouted(peer string)
	// Done: the generation ended with res (its token counts are set even on error) and err.
	Done(res Result, err error)
}

// WithObserver reports every generation's progress to o.
func WithObserver(o Observer) GeneratorOption { return func(g *Generator) { g.obs = o } }

type nopObserver struct{}

func (nopObserver) Started()                       {}
func (nopObserver) Step(int, time.Duration, error) {}
func (nopObserver) Token(int, time.Duration)       {}
func (nopObserver) Rerouted(string)                {}
func (nopObserver) Done(Result, error)             {}

// Generator turns requests into text through chains of stages.
type Generator struct {
	tok          *shard.Tokenizer
	router       Router
	chunk        int
	maxContext   int
	recoverFor   time.Duration
	recoverTries int
	exactReplay  int
	stepBase     time.Duration
	stepPerPos   time.Duration
	log          *slog.Logger
	obs          Observer
	admit        *Admission
	boundsOnce   sync.Once
	bounds       promptBounds
	// encodeSlots bounds the prompts being tokenized at once: N hostile prompts cost at most
	// this many bounded units of CPU; the rest wait, or leave.
	encodeSlots chan struct{}
	grammars    grammarCache
}

// NewGenerator makes a generator that tokenizes with tok and routes through router.
func NewGenerator(tok *shard.Tokenizer, router Router, opts ...GeneratorOption) *Generator {
	g := &Generator{tok: tok, router: router, chunk: 128, maxContext: 2048, recoverFor: 30 * time.Second, recoverTries: 8, exactReplay: 1024,
		log: slog.Default(), obs: nopObserver{}}
	for _, o := range opts {
		o(g)
	}
	if g.encodeSlots == nil {
		g.encodeSlots = make(chan struct{}, max(1, runtime.GOMAXPROCS(0)))
	}
	if g.obs == nil {
		g.obs = nopObserver{}
	}
	return g
}

// MaxContext is the most tokens, prompt and completion together, one generation may hold.
func (g *Generator) MaxContext() int { return g.maxContext }

var (
	// ErrContextLength means the prompt, or the prompt plus the completion asked for, does not
	// fit in the context.
	ErrContextLength = errors.New("context length exceeded")
	// ErrEmptyPrompt means the prompt tokenized to nothing, so there is nothing to continue.
	ErrEmptyPrompt = errors.New("empty prompt")
	// ErrStepTimeout means a step went unanswered for longer than WithStepTimeout allows.
	ErrStepTimeout = errors.New("step timed out")
	// ErrRouteUnavailable means no route could be opened, or rebuilt after a stage failed, in
	// the time allowed: the swarm's to heal, answered 503 with the reason.
	ErrRouteUnavailable = errors.New("no route could be opened")
)

// Encode tokenizes a rendered prompt, adding BOS unless the template already wrote it.
func (g *Generator) Encode(prompt string) ([]int32, error) {
	addBOS := !strings.HasPrefix(prompt, g.tok.BOS)
	ids, err := g.tok.Encode(prompt, addBOS)
	if err != nil {
		return nil, fmt.Errorf("tokenize prompt: %w", err)
	}
	return ids, nil
}

// Generate runs one completion, handing out text as it becomes final.
func (g *Generator) Generate(ctx context.Context, req Request, emit func(Delta) error) (Result, error) {
	g.obs.Started()
	res, err := g.generate(ctx, time.Now(), req, emit)
	g.obs.Done(res, err)
	return res, err
}

// penaltyWindow bounds the completion tokens the presence and frequency penalties count (a
// step carries them all to the last stage).
const penaltyWindow = 4096

func (g *Generator) generate(ctx context.Context, start time.Time, req Request, emit func(Delta) error) (Result, error) {
	var prompt []int32
	if req.PromptIDs != nil {
		for i, id := range req.PromptIDs {
			if id < 0 {
				return Result{}, fmt.Errorf("%w: prompt token %d is %d", ErrBadToken, i, id)
			}
		}
		prompt = slices.Clone(req.PromptIDs)
	} else {
		var err error
		if prompt, err = g.encode(ctx, req.Prompt); err != nil {
			return Result{}, err
		}
	}
	if req.TopLogprobs < 0 || req.TopLogprobs > sample.MaxTopLogprobs {
		return Result{}, fmt.Errorf("top logprobs %d: must be in [0, %d]", req.TopLogprobs, sample.MaxTopLogprobs)
	}
	if len(req.LogitBias) > sample.MaxBias {
		return Result{}, fmt.Errorf("%d logit bias entries: at most %d", len(req.LogitBias), sample.MaxBias)
	}
	if len(prompt) == 0 {
		return Result{}, fmt.Errorf("%w: the prompt has no tokens", ErrEmptyPrompt)
	}
	if len(prompt) >= g.maxContext {
		return Result{}, fmt.Errorf("%w: the prompt is %d tokens, the context %d, which leaves no room to generate", ErrContextLength, len(prompt), g.maxContext)
	}
	// As OpenAI does: a completion asked for that cannot fit is refused rather than cut
	// short, and one not asked for runs to the end of the context.
	maxNew := g.maxContext - len(prompt)
	if req.MaxTokens > 0 {
		if req.MaxTokens > maxNew {
			return Result{}, fmt.Errorf("%w: %d prompt tokens plus %d completion tokens asked for is %d, the context %d", ErrContextLength, len(prompt), req.MaxTokens, len(prompt)+req.MaxTokens, g.maxContext)
		}
		maxNew = req.MaxTokens
	}
	sp := req.Sampling
	if !sp.Greedy() && sp.Seed == 0 {
		sp.Seed = rand.Uint64() | 1 // 0 asks for a random seed; fix it for replays
	}
	sp.PenaltyStart = int32(len(prompt)) // presence and frequency count the completion only

	if emit != nil {
		first, inner := true, emit
		emit = func(d Delta) error {
			if first {
				first, d.PromptTokens = false, len(prompt)
			}
			return inner(d)
		}
	}
	s := &run{g: g, start: start, client: req.Client, tokens: prompt, promptLen: len(prompt), sampling: sp, bias: req.LogitBias,
		out: newTextStream(g.tok, req.Stop, emit), left: maxNew}
	if req.Logprobs {
		s.top = max(req.TopLogprobs, 0)
		s.logprobs = true
	}
	s.out.raw = req.KeepControl
	if req.Grammar != nil {
		m, err := g.grammars.matcher(g.tok, req.Grammar)
		if err != nil {
			return Result{}, err
		}
		s.matcher = m
	}
	defer s.close()
	res := Result{PromptTokens: len(prompt), FinishReason: "length"}
	next, err := s.prefill(ctx)
	if err == nil && req.Echo {
		echo := req.Prompt
		if req.PromptIDs != nil {
			if echo, err = g.tok.Decode(prompt); err != nil {
				err = fmt.Errorf("detokenize prompt: %w", err)
			}
		}
		if err == nil {
			err = s.out.echo(echo)
		}
	}
	for err == nil && res.CompletionTokens < maxNew {
		g.obs.Token(res.CompletionTokens, time.Since(start))
		// The end-of-sequence token ends the completion without being part of it: it is
		// neither shown nor counted, so usage equals the tokens handed out.
		if g.tok.IsEOS(next.Token) {
			res.FinishReason = "stop"
			break
		}
		res.CompletionTokens++
		s.tokens = append(s.tokens, next.Token)
		var stop bool
		if stop, err = s.out.pushInfo(next.Token, s.info(next)); err != nil || stop {
			if stop {
				res.FinishReason = "stop"
				res.StopSequence = s.out.stopped
			}
			break
		}
		if res.CompletionTokens == maxNew {
			break
		}
		s.left = maxNew - res.CompletionTokens
		next, err = s.step(ctx, len(s.tokens)-1, s.tokens[len(s.tokens)-1:])
	}
	if err != nil {
		return res, err
	}
	if err := s.out.flush(); err != nil {
		return res, err
	}
	res.Text = s.out.text()
	return res, nil
}

// ErrBadToken means a prompt given as token ids holds one the model does not have.
var ErrBadToken = errors.New("invalid token id")

// info is a sampled token's logprobs as a Delta carries them, when the request asked.
func (s *run) info(r StepResult) *TokenLogprobs {
	if !s.logprobs {
		return nil
	}
	lp := &TokenLogprobs{TokenText: TokenText{ID: r.Token, Text: s.g.pieceText(r.Token), Logprob: r.Logprob}}
	for _, t := range r.Top {
		lp.Top = append(lp.Top, TokenText{ID: t.Token, Text: s.g.pieceText(t.Token), Logprob: t.Logprob})
	}
	return lp
}

// pieceText is one token's text alone; a token the tokenizer cannot decode shows as "".
func (g *Generator) pieceText(id int32) string {
	t, err := g.tok.Decode([]int32{id})
	if err != nil {
		return ""
	}
	return t
}

// run is one generation's state: every token so far, so a broken route can be rebuilt by
// replaying them through a new one.
type run struct {
	g         *Generator
	client    string
	start     time.Time
	chain     Chain
	session   uint64
	tokens    []int32
	promptLen int
	bounds    []int // where each step that went through ended, in tokens: its shape, for replays
	sampling  sample.Params
	bias      []sample.Bias
	logprobs  bool
	top       int
	out       *textStream
	matcher   *grammar.Matcher // nil: the last stage's sample is the token
	left      int              // tokens the generation may still produce, the next one included
	sampler   sample.Sampler
}

func (s *run) close() {
	if s.chain != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.chain.Close(ctx)
		s.chain = nil
		if s.g.admit != nil {
			s.g.admit.Wake() // a session ended: the queue's head may start
		}
	}
}

// prefill feeds the prompt in chunks and returns the first sampled token. Opening the first
// route goes through the admission queue, if any: a busy swarm makes the request wait there.
func (s *run) prefill(ctx context.Context) (StepResult, error) {
	if a := s.g.admit; a != nil {
		s.session = rand.Uint64()
		c, err := a.Do(ctx, s.client, func(ctx context.Context) (Chain, error) { return s.g.router.OpenChain(ctx, s.session) })
		if err != nil {
			return StepResult{}, routeError(ctx, err)
		}
		s.chain = c
	} else if err := s.open(ctx); err != nil {
		return StepResult{}, err
	}
	return s.step(ctx, 0, s.tokens)
}

func (s *run) open(ctx context.Context) error {
	s.session = rand.Uint64()
	c, err := s.g.router.OpenChain(ctx, s.session)
	if err != nil {
		return routeError(ctx, err)
	}
	s.chain = c
	return nil
}

// routeError says why a route did not open. Refusals the caller must see as they are (a
// busy swarm, a full queue, the client leaving) pass through; anything else (a stage that
// did not answer in time, a link too slow to open over) is ErrRouteUnavailable with the
// reason, not a bare "deadline exceeded".
func routeError(ctx context.Context, err error) error {
	var qe *QueueError
	if ctx.Err() != nil || errors.As(err, &qe) || errors.Is(err, ErrBusy) || errors.Is(err, ErrNoRoute) {
		return fmt.Errorf("open route: %w", err)
	}
	return fmt.Errorf("%w: %w", ErrRouteUnavailable, err)
}

// step feeds tokens starting at position from, in chunks, and samples after the last. When a
// stage fails it rebuilds the route and replays the whole session before trying again.
func (s *run) step(ctx context.Context, from int, toks []int32) (StepResult, error) {
	res, err := s.feed(ctx, from, toks, true)
	if err == nil {
		return s.pick(res, from+len(toks)-1)
	}
	if ctx.Err() != nil {
		return StepResult{}, ctx.Err()
	}
	var hop *HopError
	if !errors.As(err, &hop) {
		return StepResult{}, err
	}
	return s.recover(ctx, from, toks, hop)
}

// recover rebuilds the route after failed, replays the session on it and feeds toks again,
// as often as the generator's recovery allows. Every try starts from a fresh route: a chain
// that failed or never opened is not used again.
func (s *run) recover(ctx context.Context, from int, toks []int32, failed *HopError) (StepResult, error) {
	start := time.Now()
	deadline := start.Add(s.g.recoverFor)
	err := error(failed)
	for attempt := 0; ; attempt++ {
		s.close()
		if attempt >= s.g.recoverTries || !time.Now().Before(deadline) {
			return StepResult{}, fmt.Errorf("%w: stage %s failed and the route could not be rebuilt (%d tries in %s): %w",
				ErrRouteUnavailable, failed.peer(), attempt, time.Since(start).Round(time.Millisecond), err)
		}
		var hop *HopError
		if errors.As(err, &hop) {
			s.g.log.Warn("stage failed mid-generation; rebuilding the route", "peer", hop.Peer, "err", hop.Err, "tokens", len(s.tokens), "attempt", attempt+1)
			s.g.obs.Rerouted(hop.Peer)
		}
		select {
		case <-time.After(min(time.Duration(attempt)*200*time.Millisecond, time.Until(deadline))):
		case <-ctx.Done():
			return StepResult{}, ctx.Err()
		}
		// Opening is bounded by the deadline too: a router waiting for coverage answers
		// before it (see Router), so the error names what is missing.
		octx, cancel := context.WithDeadline(ctx, deadline)
		prev := err
		err = s.open(octx)
		if err != nil && octx.Err() != nil && ctx.Err() == nil {
			err = prev // cut off by the deadline: the last real reason is the one to tell
		}
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return StepResult{}, ctx.Err()
			}
			// No route yet: membership may still be catching up, or a node reloading. A hop
			// that failed while opening is logged as such at the top of the loop.
			if !errors.As(err, &hop) {
				s.g.log.Warn("no route yet", "err", err, "attempt", attempt+1)
			}
			continue
		}
		// Rebuild the new stages' KV caches with everything before `from`, then feed toks again.
		if err = s.replay(ctx, from); err == nil {
			var res StepResult
			if res, err = s.feed(ctx, from, toks, true); err == nil {
				return s.pick(res, from+len(toks)-1)
			}
		}
		if ctx.Err() != nil {
			return StepResult{}, ctx.Err()
		}
		if !errors.As(err, &hop) {
			return StepResult{}, err
		}
	}
}

// replay feeds the session's first n tokens through a fresh chain, step by step as they
// first went when that keeps within the generator's exactReplay, in chunks otherwise.
func (s *run) replay(ctx context.Context, n int) error {
	i := 0
	for i < len(s.bounds) && s.bounds[i] <= n {
		i++
	}
	orig := slices.Clone(s.bounds[:i])
	defer func() { s.bounds = orig }() // a replay that fails is replayed the same way again
	bounds := orig
	if len(bounds) > s.g.exactReplay {
		s.g.log.Warn("replaying a long session in chunks; its continuation may differ in near-ties", "steps", len(bounds), "exact_replay", s.g.exactReplay)
		bounds = nil
	}
	// Whatever no recorded step covers (nothing, normally) goes in chunks.
	last := 0
	if len(bounds) > 0 {
		last = bounds[len(bounds)-1]
	}
	for end := last + s.g.chunk; last < n; end += s.g.chunk {
		last = min(end, n)
		bounds = append(bounds, last)
	}
	from := 0
	for _, end := range bounds {
		if _, err := s.feed(ctx, from, s.tokens[from:end], false); err != nil {
			return err
		}
		from = end
	}
	return nil
}

// feed runs toks through the chain; sampled says the answer's token will be used, which
// under a grammar means the last chunk must bring its logits back.
func (s *run) feed(ctx context.Context, from int, toks []int32, sampled bool) (StepResult, error) {
	var res StepResult
	for off := 0; off < len(toks); off += s.g.chunk {
		end := min(off+s.g.chunk, len(toks))
		pos := make([]int32, end-off)
		for i := range pos {
			pos[i] = int32(from + off + i)
		}
		var err error
		t0 := time.Now()
		res, err = s.stepOnce(ctx, StepInput{
			Positions:   pos,
			Tokens:      toks[off:end],
			Sampling:    s.sampling,
			Recent:      s.recent(from + end),
			Bias:        s.bias,
			TopLogprobs: s.top,
			WantLogits:  sampled && s.matcher != nil && end == len(toks),
		})
		s.g.obs.Step(len(pos), time.Since(t0), err)
		if err != nil {
			return StepResult{}, err
		}
		s.bounds = append(s.bounds, from+end)
	}
	return res, nil
}

// stepOnce runs one step on the chain within the step timeout. A step that outlasts it is a
// failed hop, like a reset stream: a stage that hangs without resetting must not stall the
// generation. Which stage hangs is not known here, so the HopError names no peer.
func (s *run) stepOnce(ctx context.Context, in StepInput) (StepResult, error) {
	if s.g.stepBase <= 0 {
		return s.chain.Step(ctx, in)
	}
	limit := s.g.stepBase + time.Duration(len(in.Positions))*s.g.stepPerPos
	sctx, cancel := context.WithTimeoutCause(ctx, limit, ErrStepTimeout)
	defer cancel()
	res, err := s.chain.Step(sctx, in)
	if err != nil && ctx.Err() == nil && errors.Is(context.Cause(sctx), ErrStepTimeout) {
		return res, &HopError{Err: fmt.Errorf("%w: no answer to a step of %d positions in %s (%v)", ErrStepTimeout, len(in.Positions), limit, err)}
	}
	return res, err
}

// recent is the window the penalties look at, ending at position n: the repeat penalty's
// last RepeatLastN tokens, and the completion so far (up to penaltyWindow tokens) for the
// presence and frequency penalties.
func (s *run) recent(n int) []int32 {
	from := n
	if k := s.sampling.RepeatLastN; k > 0 && s.sampling.RepeatPenalty != 0 && s.sampling.RepeatPenalty != 1 {
		from = min(from, n-k)
	}
	if s.sampling.PresencePenalty != 0 || s.sampling.FrequencyPenalty != 0 {
		from = min(from, max(s.promptLen, n-penaltyWindow))
	}
	if from >= n {
		return nil
	}
	return s.tokens[max(0, from):n]
}

// textStream turns tokens into text, holding back what may still change: an incomplete UTF-8
// sequence, or a tail that could be the start of a stop sequence.
type textStream struct {
	tok     *shard.Tokenizer
	stop    []string
	emit    func(Delta) error
	ids     []int32
	pending []int32
	infos   []TokenLogprobs // pending's logprobs, when asked
	sent    int             // bytes of the decoded text already emitted
	full    string
	prefix  string // the echoed prompt, ahead of the completion's text
	stopped string // the stop sequence found
	raw     bool   // keep control tokens' text (Request.KeepControl)
}

func newTextStream(tok *shard.Tokenizer, stop []string, emit func(Delta) error) *textStream {
	var st []string
	for _, s := range stop {
		if s != "" {
			st = append(st, s)
		}
	}
	return &textStream{tok: tok, stop: st, emit: emit}
}

// push adds a generated token; it reports true when a stop sequence has been reached.
func (t *textStream) push(id int32) (bool, error) { return t.pushInfo(id, nil) }

// echo hands out the prompt's text ahead of the completion.
func (t *textStream) echo(prompt string) error {
	t.prefix = prompt
	if prompt == "" || t.emit == nil {
		return nil
	}
	return t.emit(Delta{Text: prompt})
}

// pushInfo is push with the token's logprobs, handed out with it.
func (t *textStream) pushInfo(id int32, info *TokenLogprobs) (bool, error) {
	t.pending = append(t.pending, id)
	if info != nil {
		t.infos = append(t.infos, *info)
	}
	if !t.raw && t.tok.IsControl(id) {
		return false, nil // control tokens are markup, not text: never shown, as llama.cpp does
	}
	t.ids = append(t.ids, id)
	text, err := t.tok.Decode(t.ids)
	if err != nil {
		return false, fmt.Errorf("detokenize: %w", err)
	}
	t.full = text
	for _, s := range t.stop {
		if i := strings.Index(text[max(0, t.sent-len(s)):], s); i >= 0 {
			t.full = text[:max(0, t.sent-len(s))+i]
			t.stopped = s
			return true, t.flush()
		}
	}
	safe := len(text)
	// Hold back a trailing incomplete UTF-8 sequence, which the next token may complete; a
	// stray invalid byte earlier on will never become valid and goes out as it is.
	for i := len(text) - 1; i >= max(t.sent, len(text)-utf8.UTFMax); i-- {
		if utf8.RuneStart(text[i]) {
			if !utf8.FullRuneInString(text[i:]) {
				safe = i
			}
			break
		}
	}
	for _, s := range t.stop {
		for k := min(len(s)-1, safe-t.sent); k > 0; k-- {
			if strings.HasSuffix(text[:safe], s[:k]) {
				safe -= k
				break
			}
		}
	}
	return false, t.send(text[:max(safe, t.sent)], false)
}

// send hands out the text up to upTo with the tokens pending; final hands out pending tokens
// even with no new text (a trailing control token), so that every token is handed out once.
func (t *textStream) send(upTo string, final bool) error {
	if len(upTo) <= t.sent && !(final && len(t.pending) > 0) {
		return nil
	}
	d := Delta{Tokens: t.pending, Logprobs: t.infos}
	if len(upTo) > t.sent {
		d.Text = upTo[t.sent:]
		t.sent = len(upTo)
	}
	t.pending, t.infos = nil, nil
	if t.emit == nil {
		return nil
	}
	return t.emit(d)
}

// flush emits what was held back once the generation is over.
func (t *textStream) flush() error { return t.send(t.full, true) }

func (t *textStream) text() string { return t.prefix + t.full }
