package p2p

import (
	"errors"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// The stage protocol's error codes: what a stage answers when it refuses a frame or fails a
// step, and which of them mean "busy" (try a replica, never avoid the peer) rather than broken.

// ErrorCode says why a stage refused a frame or a session. Each code is also a counter in
// StageStats.Rejected, under its String.
type ErrorCode uint16

// forward runs a frame that check accepted.
func (ss *stageSession) forward(h *Header, payload []byte) bool {
	n := len(h.Positions)
	hidden := ss.info.Hidden
	step := shard.Step{Session: ss.local, Positions: h.Positions, Embed: h.Embed}
	if ss.info.First() {
		step.Tokens = h.Tokens
	} else {
		acts := ss.acts.get(&ss.srv.floats, n*hidden)
		if err := ss.codec.Decode(acts, payload); err != nil {
			return ss.reject(h.Step, CodeBadShape, "%v", err) != nil
		}
		if err := quant.CheckFinite(acts); err != nil {
			return ss.reject(h.Step, CodeNonFinite, "%v", err) != nil
		}
		step.Hidden = acts
	}
	out, err := ss.exec.Forward(ss.ctx, step)
	if err != nil {
		if ss.ctx.Err() != nil {
			return true
		}
		return ss.reject(h.Step, execCode(err), "%v", err) != nil
	}
	if ss.info.Last() && h.Embed {
		return ss.embedding(h, out)
	}
	if ss.info.Last() {
		return ss.result(h, out.Logits)
	}
	if len(out.Hidden) != n*hidden {
		return ss.reject(h.Step, CodeInternal, "executor returned %d activations for %d positions of %d", len(out.Hidden), n, hidden) != nil
	}
	size, _ := quant.EncodedSize(ss.codec, n*hidden)
	enc, err := ss.codec.Append(ss.out.get(&ss.srv.bytes, size)[:0], out.Hidden)
	if err != nil {
		return ss.reject(h.Step, CodeInternal, "encode activations: %v", err) != nil
	}
	return ss.relay(h, enc)
}

const (
	CodeInternal        ErrorCode = 1 + iota // a bug or a broken invariant on the stage
	CodeBadRequest                           // undecodable header, or a frame out of protocol order
	CodeTooLarge                             // header or payload over the limits
	CodeUnknownKind                          // a frame kind this stage does not know
	CodeBadCodec                             // unknown codec, or not the session's
	CodeBadShape                             // positions, tokens, shape and payload disagree with each other or the model
	CodeNonFinite                            // NaN or Inf in the activations
	CodeChecksum                             // payload CRC mismatch
	CodeUnknownSession                       // a session id this stream did not open
	CodeNoStage                              // no stage here serves the model and layers asked for
	CodeTooManySessions                      // per-peer or executor session cap
	CodeBusy                                 // the peer has too many bytes in flight; retry
	CodeStalled                              // the stream stopped mid-frame or went idle too long
	CodeContextFull                          // the session reached its context length
	CodeExec                                 // the executor failed the step
	CodeUnreachable                          // the next hop could not be reached or died
	CodeClosing                              // the node is shutting down
	codeEnd
)

var codeNames = [...]string{"", "internal", "bad_request", "too_large", "unknown_kind", "bad_codec", "bad_shape",
	"non_finite", "checksum", "unknown_session", "no_stage", "too_many_sessions", "busy", "stalled",
	"context_full", "exec", "unreachable", "closing"}

func (c ErrorCode) String() string {
	if c > 0 && c < codeEnd {
		return codeNames[c]
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// StageError is a stage's refusal, as the entry node sees it.
type StageError struct {
	Peer    peer.ID // the stage that refused (or the hop that could not be reached)
	Code    ErrorCode
	Message string
}

func (e *StageError) Error() string {
	return fmt.Sprintf("stage %s: %s: %s", shortID(e.Peer), e.Code, e.Message)
}

// Busy reports whether the code is a refusal for lack of room (sessions or bytes in flight):
// the stage is healthy and a later try, or a replica, may be taken.
func (c ErrorCode) Busy() bool { return c == CodeTooManySessions || c == CodeBusy }

// Is lets callers match codes with the shard errors they stand for.
func (e *StageError) Is(target error) bool {
	switch target {
	case shard.ErrContextFull:
		return e.Code == CodeContextFull
	case shard.ErrTooManySessions:
		return e.Code == CodeTooManySessions
	case shard.ErrBadInput:
		return e.Code == CodeBadShape || e.Code == CodeNonFinite
	}
	return false
}

func execCode(err error) ErrorCode {
	switch {
	case errors.Is(err, shard.ErrContextFull):
		return CodeContextFull
	case errors.Is(err, shard.ErrTooManySessions):
		return CodeTooManySessions
	case errors.Is(err, shard.ErrBadInput):
		return CodeBadShape
	case errors.Is(err, shard.ErrUnknownSession):
		return CodeUnknownSession
	case errors.Is(err, shard.ErrClosed):
		return CodeClosing
	}
	return CodeExec
}
