package p2p

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/strata-llm/strata/shard"
)

// Hops: the next stage of a route, how a session opens a stream to it, and how that stream is
// torn down from the tail or aborted.

func closeHop(nx *hop, session uint64, timeout time.Duration) {
	nx.hdr = Header{Kind: KindClose, Session: session}
	if err := nx.w.WriteFrame(&nx.hdr, nil); err != nil {
		nx.st.Reset()
		return
	}
	nx.st.CloseWrite()
	done := make(chan struct{})
	go func() {
		defer close(done)
		var h Header
		for {
			if _, err := nx.r.ReadFrame(&h); err != nil {
				return
			}
		}
	}()
	select {
	case <-done:
		nx.st.Close()
	case <-time.After(timeout):
		nx.st.Reset()
		<-done
	}
}

func abortHop(nx *hop, session uint64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		h := Header{Kind: KindCancel, Session: session}
		_ = nx.w.WriteFrame(&h, nil)
	}()
	select {
	case <-done:
	case <-time.After(200 * time.Millisecond):
	}
	nx.st.Reset()
}

// Hop is one stage of a route: who serves it and which layers it must run.
type Hop struct {
	Peer  peer.AddrInfo
	Range shard.Range
}

// hopAddrs is how a hop travels in an open frame: its full multiaddrs, or just /p2p/ID when
// it has none (the next stage may know its addresses already).
func hopAddrs(h Hop) ([]string, error) {
	if h.Peer.ID == "" {
		return nil, errors.New("hop without a peer ID")
	}
	if len(h.Peer.Addrs) == 0 {
		a, err := ma.NewComponent("p2p", h.Peer.ID.String())
		if err != nil {
			return nil, err
		}
		return []string{a.String()}, nil
	}
	addrs, err := peer.AddrInfoToP2pAddrs(&h.Peer)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out, nil
}

func encodeHops(hops []Hop) (addrs []string, ranges []shard.Range, err error) {
	for i, h := range hops {
		if i > 0 && h.Peer.ID == hops[i-1].Peer.ID {
			return nil, nil, fmt.Errorf("hops %d and %d are the same peer %s", i-1, i, shortID(h.Peer.ID))
		}
		as, err := hopAddrs(h)
		if err != nil {
			return nil, nil, fmt.Errorf("hop %d: %w", i, err)
		}
		addrs = append(addrs, as...)
		ranges = append(ranges, h.Range)
	}
	return addrs, ranges, nil
}

// parseHops groups consecutive multiaddrs of one peer into a hop each.
func parseHops(addrs []string, ranges []shard.Range) ([]Hop, error) {
	var hops []Hop
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("address %q: %w", s, err)
		}
		tpt, id := peer.SplitAddr(a)
		if id == "" {
			return nil, fmt.Errorf("address %q has no /p2p/ peer ID", s)
		}
		if len(hops) == 0 || hops[len(hops)-1].Peer.ID != id {
			hops = append(hops, Hop{Peer: peer.AddrInfo{ID: id}})
		}
		if tpt != nil {
			last := &hops[len(hops)-1]
			last.Peer.Addrs = append(last.Peer.Addrs, tpt)
		}
	}
	if len(hops) != len(ranges) {
		return nil, fmt.Errorf("%d hops but %d layer ranges", len(hops), len(ranges))
	}
	for i := range hops {
		hops[i].Range = ranges[i]
		if hops[i].Range.Empty() {
			return nil, fmt.Errorf("hop %d has an empty layer range %s", i, hops[i].Range)
		}
		if i > 0 && hops[i].Range.Start != hops[i-1].Range.End {
			return nil, fmt.Errorf("hop %d starts at layer %d, hop %d ends at %d", i, hops[i].Range.Start, i-1, hops[i-1].Range.End)
		}
	}
	return hops, nil
}

// dialStage opens a stage stream to p; to this host itself it is an in-process pipe.
func (h *Host) dialStage(ctx context.Context, p peer.AddrInfo, fopts []FrameOption) (*hop, error) {
	var st stream
	if p.ID == h.ID() {
		h.mu.Lock()
		srv := h.stage
		h.mu.Unlock()
		if srv == nil {
			return nil, &StageError{Peer: p.ID, Code: CodeNoStage, Message: "this node serves no stage"}
		}
		local, remote := newPipe()
		go srv.serve(remote, h.ID())
		st = local
	} else {
		if err := h.Connect(ctx, p); err != nil {
			return nil, err
		}
		s, err := h.h.NewStream(ctx, p.ID, StageProtocol)
		if err != nil {
			return nil, fmt.Errorf("open stage stream to %s: %w", shortID(p.ID), err)
		}
		st = h.counted(s)
	}
	return &hop{peer: p.ID, st: st, r: NewReader(st, fopts...), w: NewWriter(st, fopts...)}, nil
}

// open sends an open frame for the rest of the route and waits for the answer.
func (nx *hop) open(ctx context.Context, req *Header, rest []Hop) (*Header, error) {
	var err error
	if req.NextHops, req.NextRanges, err = encodeHops(rest); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { nx.st.Reset() })
	defer stop()
	if err := nx.w.WriteFrame(req, nil); err != nil {
		return nil, ctxOr(ctx, fmt.Errorf("send open: %w", err))
	}
	if _, err := nx.r.ReadFrame(&nx.hdr); err != nil {
		return nil, ctxOr(ctx, fmt.Errorf("wait for opened: %w", err))
	}
	switch nx.hdr.Kind {
	case KindOpened:
		return &nx.hdr, nil
	case KindError:
		return nil, nx.stageError(&nx.hdr)
	}
	return nil, fmt.Errorf("answered open with %s", nx.hdr.Kind)
}

func (nx *hop) stageError(h *Header) *StageError {
	p := nx.peer
	if h.Origin != "" {
		p = peer.ID(h.Origin)
	}
	return &StageError{Peer: p, Code: h.Code, Message: h.Message}
}

func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	}
	return err
}
