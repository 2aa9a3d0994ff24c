package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

// router opens chains through the stages membership shows as serving, and steers around
// peers that just failed until membership catches up with them.
type router struct {
	n *Node

	mu     sync.Mutex
	failed map[string]time.Time

	// How long OpenChain waits for a route to appear (a node reloading, a re-plan settling)
	// before it gives up and names the missing layers.
	wait time.Duration
}

// avoidFor is how long a failed peer is skipped: longer than memberlist takes to declare a
// crashed node dead (about 1 s with the tuned config), shorter than a restart.
const avoidFor = 5 * time.Second

func newRouter(n *Node) *router {
	// A recovery must still hear from OpenChain which layers are missing before it gives up.
	return &router{n: n, failed: map[string]time.Time{}, wait: min(20*time.Second, n.cfg.RecoverFor*2/3)}
}

func (r *router) markFailed(id string) {
	r.mu.Lock()
	r.failed[id] = time.Now()
	r.mu.Unlock()
}

func (r *router) avoided(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.failed[id]
	if ok && time.Since(t) > avoidFor {
		delete(r.failed, id)
		return false
	}
	return ok
}

// candidates are the stages that can take a session now.
func (r *router) candidates() []pipeline.Candidate {
	var out []pipeline.Candidate
	for _, m := range r.n.peers() {
		if !isServing(m.State) || (m.LayerEnd <= m.LayerStart && m.NextEnd <= m.NextStart) {
			continue
		}
		c := pipeline.Candidate{
			ID:         m.PeerID.String(),
			Range:      shard.Range{Start: m.LayerStart, End: m.LayerEnd},
			MsPerLayer: float64(m.MsPerLayer),
			Sessions:   int(m.Sessions),
		}
		for _, a := range m.Addrs {
			c.Addrs = append(c.Addrs, a.String())
		}
		out = append(out, c)
		if m.NextEnd > m.NextStart { // a range loaded for the next plan is served already
			c.Range = shard.Range{Start: m.NextStart, End: m.NextEnd}
			out = append(out, c)
		}
	}
	return out
}

// route picks the stages for a session without opening anything.
func (r *router) route(session uint64, avoid func(string) bool) ([]pipeline.Candidate, error) {
	if avoid == nil {
		avoid = r.avoided
	}
	return pipeline.ChooseRoute(r.candidates(), r.n.model.Layers, session, avoid)
}

// OpenChain opens a route for a session, waiting out short gaps in coverage. A stage that
// refuses for lack of room is left out of this call's next tries (a replica may have room)
// but not avoided by others: it is healthy. When every route runs through a full stage the
// answer is pipeline.ErrBusy, at once, for the caller's admission queue to wait on.
func (r *router) OpenChain(ctx context.Context, session uint64) (pipeline.Chain, error) {
	deadline := time.Now().Add(r.wait)
	// A caller with a deadline (a recovery bounded by --recover-for) must hear which layers
	// are missing before it gives up, not a bare "deadline exceeded".
	if d, ok := ctx.Deadline(); ok && d.Add(-openMargin).Before(deadline) {
		deadline = d.Add(-openMargin)
	}
	full := map[string]error{}
	avoid := func(id string) bool { return full[id] != nil || r.avoided(id) }
	for {
		route, err := r.route(session, avoid)
		if err == nil {
			var c pipeline.Chain
			if c, err = r.open(ctx, session, route); err == nil {
				return c, nil
			}
			var be *busyError
			if errors.As(err, &be) && full[be.peer] == nil {
				full[be.peer] = err
				continue // a replica of the full stage may have room
			}
		} else if len(full) > 0 {
			if _, free := r.route(session, nil); free == nil {
				var first error
				for _, e := range full {
					first = e
					break
				}
				return nil, first
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		wait := 200 * time.Millisecond
		if left := time.Until(deadline); left <= 0 {
			return nil, err
		} else if left < wait {
			wait = left
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		clear(full) // sessions may have ended meanwhile
	}
}

// openMargin is how long before its caller's deadline OpenChain stops waiting for coverage,
// so that its answer, naming what is missing, still arrives in time.
const openMargin = 100 * time.Millisecond

// busyError is a stage's refusal for lack of room.
type busyError struct {
	peer string
	err  error
}

func (e *busyError) Error() string   { return fmt.Sprintf("%v: %v", pipeline.ErrBusy, e.err) }
func (e *busyError) Unwrap() []error { return []error{pipeline.ErrBusy, e.err} }

func (r *router) open(ctx context.Context, session uint64, route []pipeline.Candidate) (pipeline.Chain, error) {
	hops := make([]p2p.Hop, len(route))
	for i, c := range route {
		id, err := peer.Decode(c.ID)
		if err != nil {
			return nil, fmt.Errorf("route: bad peer id %q: %w", c.ID, err)
		}
		ai := peer.AddrInfo{ID: id}
		for _, m := range r.n.peers() {
			if m.PeerID == id {
				ai.Addrs = m.Addrs
			}
		}
		hops[i] = p2p.Hop{Peer: ai, Range: c.Range}
	}
	rt, err := r.n.host.OpenRoute(ctx, session, hops, p2p.WithModel(r.n.sha), p2p.WithCodec(r.n.cfg.Codec), p2p.WithMaxContext(r.n.cfg.MaxContext))
	if err != nil {
		return nil, r.hopError(err, route[0].ID)
	}
	ids := make([]peer.ID, len(hops))
	for i, h := range hops {
		ids[i] = h.Peer.ID
	}
	c := &remoteChain{r: r, rt: rt, first: route[0].ID, hops: ids}
	c.gone, c.stopWatch = context.WithCancelCause(context.Background())
	go c.watch()
	return c, nil
}

// hopError marks the peer behind a failure as failed and wraps the error so the generation
// rebuilds its route; refusals that another route would meet too pass through unchanged.
func (r *router) hopError(err error, fallback string) error {
	var se *p2p.StageError
	peerID := fallback
	if errors.As(err, &se) {
		if se.Peer != "" {
			peerID = se.Peer.String()
		}
		if se.Code.Busy() {
			return &busyError{peer: peerID, err: err}
		}
		switch se.Code {
		case p2p.CodeBadShape, p2p.CodeNonFinite, p2p.CodeContextFull, p2p.CodeBadRequest, p2p.CodeBadCodec, p2p.CodeTooLarge:
			return err
		}
	}
	r.markFailed(peerID)
	return &pipeline.HopError{Peer: peerID, Err: err}
}

func isBusy(err error) bool {
	var se *p2p.StageError
	return errors.As(err, &se) && se.Code.Busy()
}

// remoteChain adapts a p2p route to the pipeline.
type remoteChain struct {
	r     *router
	rt    *p2p.Route
	first string
	hops  []peer.ID
	// gone is cancelled with a hopGone cause once a hop leaves membership, or when the chain
	// closes: one watcher per chain, so a decode step starts no goroutine of its own.
	gone      context.Context
	stopWatch context.CancelCauseFunc
}

// watchEvery is how often a chain checks that its hops are still members.
const watchEvery = 250 * time.Millisecond

// hopGone is why a step was abandoned: membership declared one of its hops dead.
type hopGone struct{ peer peer.ID }

func (e hopGone) Error() string { return fmt.Sprintf("hop %s left the swarm mid-step", e.peer) }

func (c *remoteChain) Step(ctx context.Context, in pipeline.StepInput) (pipeline.StepResult, error) {
	// A stage that hangs without resetting its stream (a frozen process, a dropped link with
	// no RST) would hold the step forever. How long a step takes says nothing: on busy stages
	// it is queueing behind other sessions. Membership's probes do tell: a hop that stops
	// answering them is declared dead in about a second, and the step is failed then.
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(c.gone, func() { cancel(context.Cause(c.gone)) })()
	extras := p2p.StepExtras{Bias: in.Bias, TopLogprobs: in.TopLogprobs, Embed: in.Embed}
	res, err := c.rt.StepWith(sctx, in.Positions, in.Tokens, in.Sampling, in.Recent, in.WantLogits, extras)
	// A stage with too many bytes in flight refuses the frame and keeps the session: the
	// step is tried again once the others' frames drained, never counted as a failure.
	for backoff := 10 * time.Millisecond; err != nil && isBusy(err) && sctx.Err() == nil; backoff = min(2*backoff, time.Second) {
		select {
		case <-time.After(backoff):
		case <-sctx.Done():
		}
		res, err = c.rt.StepWith(sctx, in.Positions, in.Tokens, in.Sampling, in.Recent, in.WantLogits, extras)
	}
	if err != nil {
		var gone hopGone
		if errors.As(context.Cause(sctx), &gone) && ctx.Err() == nil {
			c.r.markFailed(gone.peer.String())
			return pipeline.StepResult{}, &pipeline.HopError{Peer: gone.peer.String(), Err: fmt.Errorf("%w (%v)", gone, err)}
		}
		if ctx.Err() != nil {
			return pipeline.StepResult{}, ctx.Err()
		}
		return pipeline.StepResult{}, c.r.hopError(err, c.first)
	}
	out := pipeline.StepResult{Token: res.Token, Logprob: res.Logprob, Top: res.Top, Embedding: res.Embedding, Pooling: shard.Pooling(res.Pooling)}
	if in.WantLogits {
		out.Logits = append([]float32(nil), res.Logits...)
	}
	return out, nil
}

func (c *remoteChain) Close(ctx context.Context) error {
	c.stopWatch(context.Canceled)
	return c.rt.Close(ctx)
}

// watch cancels c.gone when a hop's peer is no longer a live member, until the chain closes.
func (c *remoteChain) watch() {
	t := time.NewTicker(watchEvery)
	defer t.Stop()
	for {
		select {
		case <-c.gone.Done():
			return
		case <-t.C:
		}
		live := map[peer.ID]bool{}
		for _, m := range c.r.n.peers() {
			live[m.PeerID] = true
		}
		for _, id := range c.hops {
			if !live[id] {
				c.stopWatch(hopGone{peer: id})
				return
			}
		}
	}
}
