// Package shard is one node's slice of a model: reading GGUF metadata, cutting and caching
// slice files, planning which node serves which layers, and running a slice's forward pass
// on ggml with a KV cache per session.
package shard

import (
	"errors"
	"fmt"
)

// Range is a half-open interval of transformer layers [Start, End).
type Range struct {
	Start int `msgpack:"s" json:"start"`
	End   int `msgpack:"e" json:"end"`
}

// Len is the number of layers in the range.
func (r Range) Len() int { return r.End - r.Start }

// Contains reports whether layer l is in the range.
func (r Range) Contains(l int) bool { return l >= r.Start && l < r.End }

// Empty reports whether the range holds no layers.
func (r Range) Empty() bool { return r.End <= r.Start }

func (r Range) String() string { return fmt.Sprintf("[%d,%d)", r.Start, r.End) }

// Validate checks that r is a non-empty range inside a model of n layers.
func (r Range) Validate(n int) error {
	if r.Start < 0 || r.End > n || r.Start >= r.End {
		return fmt.Errorf("%w: layer range %s is outside [0,%d) or empty", ErrBadRange, r, n)
	}
	return nil
}

// StageInfo describes a loaded stage to the code that feeds it.
type StageInfo struct {
	ModelSHA256 string `json:"model_sha256"`
	Range       Range  `json:"range"`
	Layers      int    `json:"layers"` // layers in the whole model
	Hidden      int    `json:"hidden"`
	Vocab       int    `json:"vocab"`
	MaxContext  int    `json:"max_context"`  // tokens per session
	MaxSessions int    `json:"max_sessions"` // sessions open at once
	MaxBatch    int    `json:"max_batch"`    // tokens in one forward, over all sessions
}

// First reports whether the stage takes token ids (it holds layer 0 and the embeddings).
func (i StageInfo) First() bool { return i.Range.Start == 0 }

// Last reports whether the stage produces logits (it holds the last layer and the LM head).
func (i StageInfo) Last() bool { return i.Range.End == i.Layers }

// Step is one session's input to one forward of a stage.
type Step struct {
	Session   uint64
	Positions []int32   // absolute positions in the session, contiguous with what came before
	Tokens    []int32   // the first stage's input: one id per position
	Hidden    []float32 // any other stage's input: len(Positions)*Hidden, token-major
	// Embed asks the last stage for the final norm's hidden state, pooled over the step's
	// positions as the model says (Output.Embedding), instead of logits. It runs alone,
	// never batched: every position's row is kept, not only the last.
	Embed bool
}

// Output is a stage's answer to one Step.
type Output struct {
	Hidden []float32 // a non-last stage: len(Positions)*Hidden, token-major
	Logits []float32 // the last stage: logits of the step's last position, len Vocab
	// Embedding is the last stage's answer to an Embed step: len Hidden, pooled by Pooling
	// over the step's positions (a mean is over this step's only; see Pooling).
	Embedding []float32
	Pooling   Pooling
}

// Pooling is how a sequence's final hidden states become one embedding, with GGUF's
// pooling_type numbers.
type Pooling uint8

const (
	PoolNone Pooling = iota // GGUF: no pooling; Strata pools a decoder model by its last token
	PoolMean
	PoolCLS  // the first token's
	PoolLast // the last token's
)

func (p Pooling) String() string {
	switch p {
	case PoolMean:
		return "mean"
	case PoolCLS:
		return "cls"
	case PoolLast:
		return "last"
	}
	return fmt.Sprintf("pooling(%d)", uint8(p))
}

// Errors a stage returns; callers match them with errors.Is.
var (
	ErrBadRange        = errors.New("bad layer range")
	ErrBadInput        = errors.New("bad stage input")
	ErrUnknownSession  = errors.New("unknown session")
	ErrSessionExists   = errors.New("session already open")
	ErrTooManySessions = errors.New("too many sessions")
	ErrContextFull     = errors.New("context length exceeded")
	ErrClosed          = errors.New("stage closed")
)
