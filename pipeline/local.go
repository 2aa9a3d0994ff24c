package pipeline

import (
	"context"
	"errors"
	"fmt"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// LocalChain runs stages in this process. Between stages the activations are encoded with the
// session's codec into raw little-endian bytes and decoded again, exactly as they cross the
// wire, so `strata run --split K` shows what a swarm of K nodes computes.
type LocalChain struct {
	stages  []*shard.Stage
	codec   quant.Codec
	session uint64
	sampler sample.Sampler
	wire    []byte
	act     []float32
}

// OpenLocalChain opens the session on every stage, which must cover the model in order.
func OpenLocalChain(stages []*shard.Stage, session uint64, codec quant.Codec) (*LocalChain, error) {
	if err := checkCoverage(stages); err != nil {
		return nil, err
	}
	for i, st := range stages {
		if err := st.OpenSession(session); err != nil {
			for _, prev := range stages[:i] {
				_ = prev.CloseSession(session)
			}
			if errors.Is(err, shard.ErrTooManySessions) {
				return nil, fmt.Errorf("%w: open session on stage %s: %w", ErrBusy, st.Info().Range, err)
			}
			return nil, fmt.Errorf("open session on stage %s: %w", st.Info().Range, err)
		}
	}
	return &LocalChain{stages: stages, codec: codec, session: session}, nil
}

// checkCoverage's errors are ErrNoRoute: in-process stages that miss layers are a swarm
// without a route, and callers answer them the same way.
func checkCoverage(stages []*shard.Stage) error {
	if len(stages) == 0 {
		return fmt.Errorf("%w: no stages", ErrNoRoute)
	}
	next := 0
	for _, st := range stages {
		r := st.Info().Range
		if r.Start != next {
			return fmt.Errorf("%w: stages do not chain: expected one starting at layer %d, got %s", ErrNoRoute, next, r)
		}
		next = r.End
	}
	if last := stages[len(stages)-1].Info(); next != last.Layers {
		return fmt.Errorf("%w: stages end at layer %d of %d", ErrNoRoute, next, last.Layers)
	}
	return nil
}

// Step runs the input through every stage and samples the next token.
func (c *LocalChain) Step(ctx context.Context, in StepInput) (StepResult, error) {
	step := shard.Step{Session: c.session, Positions: in.Positions, Tokens: in.Tokens, Embed: in.Embed}
	for i, st := range c.stages {
		out, err := st.Forward(ctx, step)
		if err != nil {
			return StepResult{}, fmt.Errorf("stage %s: %w", st.Info().Range, err)
		}
		if i == len(c.stages)-1 && in.Embed {
			return StepResult{Embedding: out.Embedding, Pooling: out.Pooling}, nil
		}
		if i == len(c.stages)-1 {
			ch := c.sampler.Choose(out.Logits, in.Sampling, sample.Step{Recent: in.Recent, Position: in.Positions[len(in.Positions)-1],
				Bias: in.Bias, TopLogprobs: in.TopLogprobs})
			res := StepResult{Token: ch.Token, Logprob: ch.Logprob}
			if len(ch.Top) > 0 {
				res.Top = append([]sample.TokenLogprob(nil), ch.Top...)
			}
			if in.WantLogits {
				res.Logits = append([]float32(nil), out.Logits...)
			}
			return res, nil
		}
		if c.wire, err = c.codec.Append(c.wire[:0], out.Hidden); err != nil {
			return StepResult{}, fmt.Errorf("encode activations: %w", err)
		}
		if cap(c.act) < len(out.Hidden) {
			c.act = make([]float32, len(out.Hidden))
		}
		c.act = c.act[:len(out.Hidden)]
		if err := c.codec.Decode(c.act, c.wire); err != nil {
			return StepResult{}, fmt.Errorf("decode activations: %w", err)
		}
		step = shard.Step{Session: c.session, Positions: in.Positions, Hidden: c.act, Embed: in.Embed}
	}
	panic("unreachable")
}

// Close frees the session on every stage.
func (c *LocalChain) Close(context.Context) error {
	var errs []error
	for _, st := range c.stages {
		if err := st.CloseSession(c.session); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// LocalRouter routes every session through the same in-process stages.
type LocalRouter struct {
	Stages []*shard.Stage
	Codec  quant.Codec
}

// OpenChain opens a session on the stages.
func (r LocalRouter) OpenChain(_ context.Context, session uint64) (Chain, error) {
	return OpenLocalChain(r.Stages, session, r.Codec)
}
