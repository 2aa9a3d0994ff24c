// Package sample is Strata's token sampler. It lives apart from pipeline so that the last
// stage of a route (in p2p) can sample where the logits are, without importing the pipeline.
package sample

// Params are the sampling settings of one request, as OpenAI and Ollama clients send them.
// The zero value is greedy decoding.
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
