package pipeline_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func tinyStages(t *testing.T, ranges ...shard.Range) ([]*shard.Stage, *shard.Tokenizer) {
	t.Helper()
	path := testkit.TinyModel(t)
	var stages []*shard.Stage
	for _, r := range ranges {
		st, err := shard.LoadStage(context.Background(), path, r, shard.WithSliceDir(t.TempDir()), shard.WithThreads(1), shard.WithMaxSessions(4))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		stages = append(stages, st)
	}
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	return stages, tok
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
// mid-generation looks from the entry node.
type failingRouter struct {
	pipeline.LocalRouter
	failAfter int
	failed    bool
}

type failingChain struct {
	pipeline.Chain
	r     *failingRouter
	steps int
}

func (r *failingRouter) OpenChain(ctx context.Context, session uint64) (pipeline.Chain, error) {
	c, err := r.LocalRouter.OpenChain(ctx, session)
	return &failingChain{Chain: c, r: r}, err
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
