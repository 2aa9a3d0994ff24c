// Package sample is Strata's token sampler. It lives apart from pipeline so that the last
// stage of a route (in p2p) can sample where the logits are, without importing the pipeline.
package sample

import (
	"fmt"
	"math/rand/v2"
)

// Params are the sampling settings of one request, as OpenAI and Ollama clients send them.
// The zero value is greedy decoding. Zero (or out-of-range) filter values mean "off":
// TopK <= 0 or >= vocabulary, TopP <= 0 or >= 1, MinP <= 0, RepeatPenalty 0 or 1.
// RepeatLastN <= 0 penalizes every token of the recent slice the caller passes.
//
// Seed: the draw is a pure function of (Seed, position), so replaying a generation on another
// node gives the same tokens. Seed 0 means "random" to the layer that accepts a request: it
// must replace 0 with a fresh seed (WithRandomSeed) before the first token and carry that seed
// with the request, so that replays stay reproducible. Sample itself treats 0 as one more seed.
// The repeat penalty applies to greedy decoding too, as in llama.cpp.
type Params struct {
	Temperature   float32 `msgpack:"t" json:"temperature"`
	TopK          int     `msgpack:"k" json:"top_k"`
	TopP          float32 `msgpack:"p" json:"top_p"`
	MinP          float32 `msgpack:"m" json:"min_p"`
	RepeatPenalty float32 `msgpack:"r" json:"repeat_penalty"` // 0 or 1: off
	RepeatLastN   int     `msgpack:"n" json:"repeat_last_n"`
	Seed          uint64  `msgpack:"s" json:"seed"`

	// OpenAI's additive penalties: a token's logit loses FrequencyPenalty times the number
	// of times it was sampled so far, plus PresencePenalty once if it was sampled at all.
	// Negative values encourage repeats. "Sampled so far" is the tokens of the recent slice
	// at positions PenaltyStart and later (the completion: the entry sets PenaltyStart to
	// the prompt's length). Peers from before these fields ignore them.
	PresencePenalty  float32 `msgpack:"pp" json:"presence_penalty,omitempty"`
	FrequencyPenalty float32 `msgpack:"fp" json:"frequency_penalty,omitempty"`
	PenaltyStart     int32   `msgpack:"ps" json:"penalty_start,omitempty"`
}

// Bias is one entry of OpenAI's logit_bias: Value is added to the token's logit before
// penalties and sampling (-100 bans a token in practice, +100 all but forces it).
type Bias struct {
	Token int32
	Value float32
}

// MaxTopLogprobs bounds the alternatives a step reports, as OpenAI's top_logprobs does.
const MaxTopLogprobs = 20

// MaxBias bounds the logit_bias entries a step carries.
const MaxBias = 1024

// Greedy reports whether the params pick the most likely token with no randomness.
func (p Params) Greedy() bool { return p.Temperature <= 0 }

// Validate reports settings that are out of range, for the API to answer with a clear error
// rather than silently clamping them. Zero values are valid (they mean "off").
func (p Params) Validate() error {
	switch {
	case p.Temperature != p.Temperature || p.Temperature < 0:
		return fmt.Errorf("temperature %v: must be >= 0", p.Temperature)
	case p.TopK < 0:
		return fmt.Errorf("top_k %d: must be >= 0", p.TopK)
	case p.TopP != p.TopP || p.TopP < 0 || p.TopP > 1:
		return fmt.Errorf("top_p %v: must be in [0, 1]", p.TopP)
	case p.MinP != p.MinP || p.MinP < 0 || p.MinP > 1:
		return fmt.Errorf("min_p %v: must be in [0, 1]", p.MinP)
	case p.RepeatPenalty != p.RepeatPenalty || p.RepeatPenalty < 0:
		return fmt.Errorf("repeat_penalty %v: must be >= 0", p.RepeatPenalty)
	case p.PresencePenalty != p.PresencePenalty || p.PresencePenalty < -2 || p.PresencePenalty > 2:
		return fmt.Errorf("presence_penalty %v: must be in [-2, 2]", p.PresencePenalty)
	case p.FrequencyPenalty != p.FrequencyPenalty || p.FrequencyPenalty < -2 || p.FrequencyPenalty > 2:
		return fmt.Errorf("frequency_penalty %v: must be in [-2, 2]", p.FrequencyPenalty)
	case p.PenaltyStart < 0:
		return fmt.Errorf("penalty start %d: must be >= 0", p.PenaltyStart)
	}
	return nil
}

// WithRandomSeed returns p with a fresh random seed if Seed is 0 ("random"), otherwise p.
// Call it once where a request enters the swarm, never per token.
func (p Params) WithRandomSeed() Params {
	for p.Seed == 0 {
		p.Seed = rand.Uint64()
	}
	return p
}
