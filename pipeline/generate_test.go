package pipeline_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func tinyStages(t *testing.T, ranges ...shard.Range) ([]*shard.Stage, *shard.Tokenizer) {
	t.Helper()
	return testkit.LoadStages(t, testkit.TinyModel(t), ranges, shard.WithMaxSessions(4))
}

func generate(t *testing.T, g *pipeline.Generator, req pipeline.Request) (pipeline.Result, string) {
	t.Helper()
	var streamed strings.Builder
	res, err := g.Generate(context.Background(), req, func(d pipeline.Delta) error {
		streamed.WriteString(d.Text)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return res, streamed.String()
}

func TestGenerateStreamsStopsAndCounts(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 6})
	g := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages})
	full, streamed := generate(t, g, pipeline.Request{Prompt: "Once upon a time", MaxTokens: 40})
	if full.Text != streamed || full.CompletionTokens != 40 || full.FinishReason != "length" || full.PromptTokens == 0 {
		t.Fatalf("result %+v, streamed %q", full, streamed)
	}
	if strings.Contains(full.Text, "<|") {
		t.Fatalf("control tokens leaked into text: %q", full.Text)
	}
	// A stop sequence from the middle of the text cuts it there, in the result and the stream.
	stop := full.Text[len(full.Text)/2 : len(full.Text)/2+3]
	want := full.Text[:strings.Index(full.Text, stop)]
	res, streamed := generate(t, g, pipeline.Request{Prompt: "Once upon a time", MaxTokens: 40, Stop: []string{stop}})
	if res.Text != want || streamed != want || res.FinishReason != "stop" {
		t.Fatalf("stop %q: text %q streamed %q (%s), want %q", stop, res.Text, streamed, res.FinishReason, want)
	}
	// Sampling with a seed is reproducible.
	a, _ := generate(t, g, pipeline.Request{Prompt: "x", MaxTokens: 20, Sampling: samp(0.8, 7)})
	b, _ := generate(t, g, pipeline.Request{Prompt: "x", MaxTokens: 20, Sampling: samp(0.8, 7)})
	if a.Text != b.Text {
		t.Fatalf("same seed, different text: %q vs %q", a.Text, b.Text)
	}
}

// failingRouter hands out chains that fail once, after a few steps, the way a stage dying
// mid-generation looks from the entry node. With noRoute set, the next noRoute opens after
// the failure find no route (-1: every one), the way an entry node sees a middle node die
// when no survivor can take its layers.
type failingRouter struct {
	pipeline.LocalRouter
	failAfter int
	noRoute   int
	opens     int
	failed    bool
}

type failingChain struct {
	pipeline.Chain
	r     *failingRouter
	steps int
}

func (r *failingRouter) OpenChain(ctx context.Context, session uint64) (pipeline.Chain, error) {
	r.opens++
	if r.failed && r.noRoute != 0 {
		r.noRoute--
		return nil, fmt.Errorf("%w: layers [2,4) are served by no live node (of 6 layers)", pipeline.ErrNoRoute)
	}
	c, err := r.LocalRouter.OpenChain(ctx, session)
	if err != nil {
		return nil, err
	}
	return &failingChain{Chain: c, r: r}, nil
}

func (c *failingChain) Step(ctx context.Context, in pipeline.StepInput) (pipeline.StepResult, error) {
	c.steps++
	if !c.r.failed && c.steps > c.r.failAfter {
		c.r.failed = true
		return pipeline.StepResult{}, &pipeline.HopError{Peer: "stage-2", Err: errors.New("stream reset")}
	}
	return c.Chain.Step(ctx, in)
}

// TestGenerateRecoversFromAFailedHop: when a hop fails, the session is replayed on a new chain
// and the text is exactly the undisturbed one.
func TestGenerateRecoversFromAFailedHop(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 2}, shard.Range{Start: 2, End: 4}, shard.Range{Start: 4, End: 6})
	want, _ := generate(t, pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}), pipeline.Request{Prompt: "hello", MaxTokens: 30})
	r := &failingRouter{LocalRouter: pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}, failAfter: 12}
	got, streamed := generate(t, pipeline.NewGenerator(tok, r), pipeline.Request{Prompt: "hello", MaxTokens: 30})
	if !r.failed {
		t.Fatal("the chain never failed")
	}
	if got.Text != want.Text || streamed != want.Text {
		t.Fatalf("after recovery %q (streamed %q), undisturbed %q", got.Text, streamed, want.Text)
	}
	for _, st := range stages {
		if n := st.Sessions(); n != 0 {
			t.Fatalf("stage %s still holds %d sessions", st.Info().Range, n)
		}
	}
}

func samp(temp float32, seed uint64) (p sample.Params) {
	p.Temperature, p.Seed = temp, seed
	return p
}

// TestGenerateNoRouteLeft: a hop fails and no route comes back. The generation keeps asking
// for one within its recovery bounds, never steps a chain it does not have, and ends with
// ErrNoRoute naming the missing layers; when a route does come back in time, the text is the
// undisturbed one.
func TestGenerateNoRouteLeft(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 2}, shard.Range{Start: 2, End: 4}, shard.Range{Start: 4, End: 6})
	local := pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}
	want, _ := generate(t, pipeline.NewGenerator(tok, local), pipeline.Request{Prompt: "hello", MaxTokens: 30})
	freed := func() {
		t.Helper()
		for _, st := range stages {
			if n := st.Sessions(); n != 0 {
				t.Fatalf("stage %s still holds %d sessions", st.Info().Range, n)
			}
		}
	}

	t.Run("never", func(t *testing.T) {
		r := &failingRouter{LocalRouter: local, failAfter: 12, noRoute: -1}
		g := pipeline.NewGenerator(tok, r, pipeline.WithRecovery(10*time.Second, 3))
		var streamed strings.Builder
		res, err := g.Generate(context.Background(), pipeline.Request{Prompt: "hello", MaxTokens: 30}, func(d pipeline.Delta) error {
			streamed.WriteString(d.Text)
			return nil
		})
		if !errors.Is(err, pipeline.ErrNoRoute) || !strings.Contains(err.Error(), "layers [2,4)") || !strings.Contains(err.Error(), "stage stage-2 failed") {
			t.Fatalf("err %v, want ErrNoRoute naming layers [2,4) and the failed stage", err)
		}
		// One open for the start, then one per try.
		if r.opens != 1+3 {
			t.Fatalf("%d opens, want 4", r.opens)
		}
		if res.CompletionTokens == 0 || !strings.HasPrefix(want.Text, streamed.String()) {
			t.Fatalf("before the failure: %d tokens, streamed %q of %q", res.CompletionTokens, streamed.String(), want.Text)
		}
		freed()
	})
	t.Run("deadline", func(t *testing.T) {
		r := &failingRouter{LocalRouter: local, failAfter: 12, noRoute: -1}
		g := pipeline.NewGenerator(tok, r, pipeline.WithRecovery(500*time.Millisecond, 100))
		t0 := time.Now()
		_, err := g.Generate(context.Background(), pipeline.Request{Prompt: "hello", MaxTokens: 30}, nil)
		if !errors.Is(err, pipeline.ErrNoRoute) {
			t.Fatalf("err %v, want ErrNoRoute", err)
		}
		// Tries back off by 200 ms more each time: 0, 200, 400 ms, then the deadline is past.
		if d := time.Since(t0); d > 30*time.Second || r.opens > 6 { // the time is a hang guard
			t.Fatalf("gave up after %s and %d opens; the recovery bound is 500 ms", d, r.opens)
		}
		freed()
	})
	t.Run("comes back", func(t *testing.T) {
		r := &failingRouter{LocalRouter: local, failAfter: 12, noRoute: 2}
		got, streamed := generate(t, pipeline.NewGenerator(tok, r), pipeline.Request{Prompt: "hello", MaxTokens: 30})
		if r.opens != 1+3 || got.Text != want.Text || streamed != want.Text {
			t.Fatalf("after %d opens: %q (streamed %q), undisturbed %q", r.opens, got.Text, streamed, want.Text)
		}
		freed()
	})
}

// hangingRouter hands out chains whose stage stops answering once, after a few steps, without
// resetting anything: its step returns only when its context ends.
type hangingRouter struct {
	pipeline.LocalRouter
	hangAfter int
	always    bool // every chain hangs, not only the first
	hung      int
}

type hangingChain struct {
	pipeline.Chain
	r     *hangingRouter
	steps int
}

func (r *hangingRouter) OpenChain(ctx context.Context, session uint64) (pipeline.Chain, error) {
	c, err := r.LocalRouter.OpenChain(ctx, session)
	if err != nil {
		return nil, err
	}
	return &hangingChain{Chain: c, r: r}, nil
}

func (c *hangingChain) Step(ctx context.Context, in pipeline.StepInput) (pipeline.StepResult, error) {
	c.steps++
	if (c.r.hung == 0 || c.r.always) && c.steps > c.r.hangAfter {
		c.r.hung++
		<-ctx.Done()
		return pipeline.StepResult{}, fmt.Errorf("wait for step: %w", ctx.Err())
	}
	return c.Chain.Step(ctx, in)
}

// TestGenerateStepTimeout: a stage that hangs without resetting its stream counts as failed
// once a step outlasts the step timeout, and the session recovers on a new route with the
// undisturbed text; a route that hangs every time ends the generation with ErrStepTimeout
// instead of stalling it.
func TestGenerateStepTimeout(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	local := pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}
	want, _ := generate(t, pipeline.NewGenerator(tok, local), pipeline.Request{Prompt: "hello", MaxTokens: 30})

	// The step timeouts are far above a tiny model's step (about a millisecond) so that on a
	// loaded machine only the hangs time out.
	r := &hangingRouter{LocalRouter: local, hangAfter: 10}
	t0 := time.Now()
	got, streamed := generate(t, pipeline.NewGenerator(tok, r, pipeline.WithStepTimeout(2*time.Second, 0)), pipeline.Request{Prompt: "hello", MaxTokens: 30})
	if r.hung != 1 || got.Text != want.Text || streamed != want.Text {
		t.Fatalf("hung %d times; after recovery %q (streamed %q), undisturbed %q", r.hung, got.Text, streamed, want.Text)
	}
	if d := time.Since(t0); d > 60*time.Second { // a hang guard
		t.Fatalf("recovering from a 2 s step timeout took %s", d)
	}

	r = &hangingRouter{LocalRouter: local, hangAfter: 10, always: true}
	g := pipeline.NewGenerator(tok, r, pipeline.WithStepTimeout(time.Second, 0), pipeline.WithRecovery(30*time.Second, 2))
	_, err := g.Generate(context.Background(), pipeline.Request{Prompt: "hello", MaxTokens: 30}, nil)
	if !errors.Is(err, pipeline.ErrStepTimeout) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want ErrStepTimeout (and not the client's deadline)", err)
	}
	if r.hung != 3 {
		t.Fatalf("hung %d times, want 3 (the first step and two tries)", r.hung)
	}
	for _, st := range stages {
		if n := st.Sessions(); n != 0 {
			t.Fatalf("stage %s still holds %d sessions", st.Info().Range, n)
		}
	}
}

// TestGenerateContextBounds: as OpenAI does, a prompt that fills the context or a completion
// asked for that cannot fit after the prompt is refused with ErrContextLength; with no
// max_tokens the completion runs to the end of the context.
func TestGenerateContextBounds(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 6})
	g := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages}, pipeline.WithMaxContext(48))
	prompt := "Once upon a time"
	ids, err := g.Encode(prompt)
	if err != nil {
		t.Fatal(err)
	}
	room := 48 - len(ids)
	if _, err := g.Generate(context.Background(), pipeline.Request{Prompt: strings.Repeat("word ", 60)}, nil); !errors.Is(err, pipeline.ErrContextLength) {
		t.Fatalf("prompt beyond the context: %v", err)
	}
	if _, err := g.Generate(context.Background(), pipeline.Request{Prompt: prompt, MaxTokens: room + 1}, nil); !errors.Is(err, pipeline.ErrContextLength) ||
		!strings.Contains(err.Error(), fmt.Sprintf("%d prompt tokens plus %d completion tokens", len(ids), room+1)) {
		t.Fatalf("max_tokens one past the room left: %v", err)
	}
	res, _ := generate(t, g, pipeline.Request{Prompt: prompt, MaxTokens: room})
	if res.FinishReason == "length" && res.CompletionTokens != room {
		t.Fatalf("max_tokens exactly the room left: %+v", res)
	}
	res, _ = generate(t, g, pipeline.Request{Prompt: prompt})
	if res.FinishReason == "length" && res.CompletionTokens != room {
		t.Fatalf("no max_tokens: %d completion tokens (%s), want the %d left", res.CompletionTokens, res.FinishReason, room)
	}
}

// stallingRouter fails a chain after a few steps; every open after that waits for its
// context to end, as a router waiting for coverage that never comes back does.
type stallingRouter struct {
	failingRouter
	deadlines []time.Time
	first     time.Time // the first open after the failure
	unbounded int
}

func (r *stallingRouter) OpenChain(ctx context.Context, session uint64) (pipeline.Chain, error) {
	if !r.failed {
		return r.failingRouter.OpenChain(ctx, session)
	}
	if r.first.IsZero() {
		r.first = time.Now()
	}
	d, ok := ctx.Deadline()
	if !ok {
		r.unbounded++
		return nil, fmt.Errorf("%w: layers [2,4) are served by no live node (of 6 layers)", pipeline.ErrNoRoute)
	}
	r.deadlines = append(r.deadlines, d)
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestRecoveryHonoursRecoverFor: a recovery hands the router a deadline no later than
// --recover-for after it began, so a router that waits for coverage cannot stretch it (a 30 s
// bound once gave up after 40 s), and the error still names the stage that failed.
func TestRecoveryHonoursRecoverFor(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	r := &stallingRouter{failingRouter: failingRouter{LocalRouter: pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}, failAfter: 3}}
	const recoverFor = 300 * time.Millisecond
	g := pipeline.NewGenerator(tok, r, pipeline.WithRecovery(recoverFor, 100))
	_, err := g.Generate(context.Background(), pipeline.Request{Prompt: "hello", MaxTokens: 30}, nil)
	if err == nil || !strings.Contains(err.Error(), "stage stage-2 failed") || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want the failed stage named, not a bare deadline", err)
	}
	if r.unbounded > 0 || len(r.deadlines) == 0 {
		t.Fatalf("%d opens without a deadline, %d with", r.unbounded, len(r.deadlines))
	}
	for _, d := range r.deadlines {
		if d.After(r.first.Add(recoverFor)) {
			t.Fatalf("an open may wait until %s after the recovery began, past the %s bound", d.Sub(r.first), recoverFor)
		}
	}
}
