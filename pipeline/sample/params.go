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
}

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
