package pipeline

import (
	"context"

	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/shard"
)

// Chain carries one session's steps through stages that together hold every layer, and
// samples the next token where the logits are: at the last stage. Step must return soon
// after its ctx is done, even when a stage does not answer: that is how the generator's step
// timeout gets a hung route back.
type Chain interface {
	Step(ctx context.Context, in StepInput) (StepResult, error)
	Close(ctx context.Context) error
}

// StepInput is one prefill chunk or one decode token of a session.
type StepInput struct {
	Positions  []int32
	Tokens     []int32
	Sampling   sample.Params
	Recent     []int32 // the last tokens, for the penalties
	WantLogits bool    // return the full logits too (tests and oracles)
	// Bias is the request's logit_bias; TopLogprobs asks for that many alternatives
	// (at most sample.MaxTopLogprobs) with the sampled token.
	Bias        []sample.Bias
	TopLogprobs int
	// Embed asks for the final hidden state pooled over the step (StepResult.Embedding)
	// instead of a sampled token.
	Embed bool
}

// StepResult is the token sampled after the step's last position.
type StepResult struct {
	Token   int32
	Logprob float32
	Top     []sample.TokenLogprob // the TopLogprobs most likely tokens, best first
	Logits  []float32
	// Embedding and Pooling answer an Embed step: see shard.Output.
	Embedding []float32
	Pooling   shard.Pooling
}

// Router opens chains over the stages that are alive now. A generation asks again after a
// chain fails, so a router should route around the peer that failed (see HopError). A router
// that waits for coverage should answer before ctx's deadline, naming what is missing; one
// that finds every route full should answer ErrBusy at once, without avoiding anyone.
type Router interface {
	OpenChain(ctx context.Context, session uint64) (Chain, error)
}

// HopError says which peer of a route failed, so a router can avoid it while membership
// catches up with its death. Peer is empty when the route failed somewhere unknown (a step
// that timed out).
type HopError struct {
	Peer string
	Err  error
}

func (e *HopError) Error() string { return "stage " + e.peer() + ": " + e.Err.Error() }

func (e *HopError) peer() string {
	if e.Peer == "" {
		return "(unknown)"
	}
	return e.Peer
}
func (e *HopError) Unwrap() error { return e.Err }
