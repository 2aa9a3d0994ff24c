package p2p

import (
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// Admission: which sessions a stage takes, and the bytes in flight it lets each peer and the
// whole host hold, checked against a frame's header before its payload is read.

type peerLoad struct {
	sessions int
	inflight int64
}

func (srv *stageServer) admit(ss *stageSession) error {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		return errStopping
	}
	pl := srv.peers[ss.remote]
	if pl == nil {
		pl = &peerLoad{}
		srv.peers[ss.remote] = pl
	}
	if pl.sessions >= srv.cfg.maxSessionsPerPeer {
		return fmt.Errorf("peer already has %d sessions open here (limit %d)", pl.sessions, srv.cfg.maxSessionsPerPeer)
	}
	pl.sessions++
	srv.sessions[ss] = struct{}{}
	return nil
}

func (srv *stageServer) leave(ss *stageSession) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if _, ok := srv.sessions[ss]; !ok {
		return
	}
	delete(srv.sessions, ss)
	if pl := srv.peers[ss.remote]; pl != nil {
		pl.sessions--
		if pl.sessions == 0 && pl.inflight == 0 {
			delete(srv.peers, ss.remote)
		}
	}
}

func (srv *stageServer) reserve(p peer.ID, n int64) error {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	pl := srv.peers[p]
	if pl == nil {
		pl = &peerLoad{}
		srv.peers[p] = pl
	}
	if pl.inflight+n > srv.cfg.maxInflightPerPeer {
		return errBusyPeer
	}
	if srv.inflight+n > srv.cfg.maxInflightTotal {
		return errBusyHost
	}
	pl.inflight += n
	srv.inflight += n
	return nil
}

func (srv *stageServer) release(p peer.ID, n int64) {
	if n == 0 {
		return
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.inflight -= n
	if pl := srv.peers[p]; pl != nil {
		pl.inflight -= n
		if pl.sessions == 0 && pl.inflight == 0 {
			delete(srv.peers, p)
		}
	}
}

// check vets a forward frame's header before its payload is read: everything that can be
// refused without the payload is refused here, so a refused frame never costs a buffer.
func (ss *stageSession) check(h *Header) refusal {
	refuse := func(code ErrorCode, format string, args ...any) refusal {
		return refusal{code, fmt.Sprintf(format, args...)}
	}
	n := len(h.Positions)
	hidden := ss.info.Hidden
	switch {
	case h.Session != ss.id:
		return refuse(CodeUnknownSession, "session %d is not the one this stream opened", h.Session)
	case n == 0:
		return refuse(CodeBadShape, "forward with no positions")
	case ss.info.MaxBatch > 0 && n > ss.info.MaxBatch:
		return refuse(CodeBadShape, "%d positions in one step, stage batch limit %d", n, ss.info.MaxBatch)
	case ss.maxCtx > 0 && int(h.Positions[n-1]) >= ss.maxCtx:
		return refuse(CodeContextFull, "position %d is past the session's context of %d", h.Positions[n-1], ss.maxCtx)
	}
	if ss.info.First() {
		if len(h.Tokens) != n || h.PayloadLen != 0 {
			return refuse(CodeBadShape, "first stage wants one token per position: %d positions, %d tokens, %d payload bytes", n, len(h.Tokens), h.PayloadLen)
		}
		for _, t := range h.Tokens {
			if t < 0 || (ss.info.Vocab > 0 && int(t) >= ss.info.Vocab) {
				return refuse(CodeBadShape, "token %d outside the vocabulary of %d", t, ss.info.Vocab)
			}
		}
		return refusal{}
	}
	if h.Codec != ss.codec {
		return refuse(CodeBadCodec, "activations in %s, session uses %s", h.Codec, ss.codec)
	}
	if len(h.Shape) != 2 || h.Shape[0] != n || h.Shape[1] != hidden {
		return refuse(CodeBadShape, "activation shape %v, want [%d %d]", h.Shape, n, hidden)
	}
	if size, _ := quant.EncodedSize(ss.codec, n*hidden); int(h.PayloadLen) != size {
		return refuse(CodeBadShape, "%d-byte payload, [%d %d] in %s takes %d", h.PayloadLen, n, hidden, ss.codec, size)
	}
	return refusal{}
}

// frameCost is the memory a checked forward frame makes this stage hold until it is answered:
// its payload, the decoded activations, the activations encoded for the next hop, and the
// logits if they were asked for (encoded here, or relayed from downstream).
func (ss *stageSession) frameCost(h *Header) int64 {
	cost := frameCost(ss.info, ss.codec, len(h.Positions), int(h.PayloadLen), h.WantLogits)
	if h.Embed {
		cost += heldBytes(4 * ss.info.Hidden) // the pooled embedding, encoded or relayed
	}
	return cost
}

func frameCost(info shard.StageInfo, codec quant.Codec, positions, payload int, logits bool) int64 {
	n := positions * info.Hidden
	cost := heldBytes(payload)
	if !info.First() {
		cost += heldBytes(4 * n)
	}
	if !info.Last() {
		size, _ := quant.EncodedSize(codec, n)
		cost += heldBytes(size)
	}
	if logits {
		cost += heldBytes(4 * info.Vocab)
	}
	return cost
}
