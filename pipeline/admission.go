package pipeline

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"sync"
	"time"
)

// ErrBusy means every route through the swarm runs through a stage that is full: the swarm
// is healthy, a later try will be taken. A Router answers it at once rather than waiting, so
// the generator's admission queue can hold the request.
var ErrBusy = errors.New("every route is busy")

// ErrQueueFull and ErrQueueTimeout are the admission queue's refusals, answered 429 with a
// Retry-After (see QueueError).
var (
	ErrQueueFull    = errors.New("admission queue full")
	ErrQueueTimeout = errors.New("waited too long in the admission queue")
)

// QueueError is a request the admission queue turned away.
type QueueError struct {
	Err   error         // ErrQueueFull or ErrQueueTimeout
	Depth int           // the queue's bound
	Wait  time.Duration // how long the request waited
	After time.Duration // when a retry is likely to be taken
	Cause error         // the last busy answer, if any
}

func (e *QueueError) Error() string {
	switch {
	case errors.Is(e.Err, ErrQueueFull):
		return fmt.Sprintf("the swarm is busy and %d requests are already queued (--queue %d); retry after %ds", e.Depth, e.Depth, e.RetryAfterSeconds())
	default:
		return fmt.Sprintf("the swarm stayed busy for %s while the request waited (--queue-timeout); retry after %ds", e.Wait.Round(time.Millisecond), e.RetryAfterSeconds())
	}
}

func (e *QueueError) Unwrap() error { return e.Err }

// HTTPStatus is 429: the client is asked to come back, as rate limits do.
func (e *QueueError) HTTPStatus() int { return http.StatusTooManyRequests }

// RetryAfterSeconds is the Retry-After header's value: at least 1.
func (e *QueueError) RetryAfterSeconds() int { return max(1, int(math.Ceil(e.After.Seconds()))) }

// AdmissionOption configures an Admission.
type AdmissionOption func(*Admission)

// WithAdmissionPoll sets how often the request at the head of the queue tries again when no
// session ended on this node (default 250 ms): sessions that other entry nodes opened end
// without telling this one.
func WithAdmissionPoll(d time.Duration) AdmissionOption {
	return func(a *Admission) {
		if d > 0 {
			a.poll = d
		}
	}
}

// Admission is an entry node's queue for one model: requests that find every route busy wait
// in it, first in first out within a client and round robin across clients, and start as
// sessions free up. Only the request at the head tries to open a route, so a burst does not
// hammer the stages, and no request overtakes another of its client.
type Admission struct {
	depth   int
	timeout time.Duration
	poll    time.Duration

	mu      sync.Mutex
	clients map[string][]*waiter // each client's waiters, oldest first
	order   []string             // clients with waiters, the head's first
	waiting int
	stats   AdmissionStats
	avgWait time.Duration // moving average of the waits of requests that started
}

type waiter struct {
	client string
	turn   chan struct{} // signalled when this waiter is the head and may try
	since  time.Time
}

// AdmissionStats are the queue's counters, for /metrics and /health.
type AdmissionStats struct {
	Waiting   int           // requests in the queue now
	Queued    uint64        // requests that had to wait, ever
	Started   uint64        // queued requests that got a route
	Full      uint64        // refused: the queue was full
	TimedOut  uint64        // refused: waited past the timeout
	Cancelled uint64        // left: the client went away
	WaitSum   time.Duration // total wait of queued requests that left the queue
	Oldest    time.Duration // how long the head has waited
	// StartedWait is the total wait of the queued requests that started, and StartedWaits
	// how many of them waited at most each of WaitBuckets' bounds (not cumulative; the last
	// count is the waits beyond every bound): a histogram, for percentiles of the wait.
	StartedWait  time.Duration
	StartedWaits [len(waitBounds) + 1]uint64
}

// waitBounds are the upper bounds, in seconds, of AdmissionStats.StartedWaits.
var waitBounds = [...]float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// WaitBuckets returns the upper bounds, in seconds, of AdmissionStats.StartedWaits.
func WaitBuckets() []float64 { return slices.Clone(waitBounds[:]) }

// NewAdmission makes a queue holding up to depth requests, each for at most timeout
// (0: until its context ends). depth 0 queues nothing: a busy swarm is answered at once.
func NewAdmission(depth int, timeout time.Duration, opts ...AdmissionOption) *Admission {
	a := &Admission{depth: max(depth, 0), timeout: timeout, poll: 250 * time.Millisecond, clients: map[string][]*waiter{}}
	for _, o := range opts {
		o(a)
	}
	return a
}

// Stats returns the queue's counters now.
func (a *Admission) Stats() AdmissionStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.stats
	s.Waiting = a.waiting
	if h := a.headLocked(); h != nil {
		s.Oldest = time.Since(h.since)
	}
	return s
}

// Wake tells the queue a session ended, so the head tries at once.
func (a *Admission) Wake() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.signalLocked()
}

// Do runs try, which opens a route, when the queue lets it: at once when nobody waits,
// otherwise when this request reaches the head. While try answers ErrBusy the request waits
// (at the head) for a session to end. It returns try's result, ctx's error when the client
// left, or a QueueError when the queue is full or the wait ran past the timeout.
func (a *Admission) Do(ctx context.Context, client string, try func(context.Context) (Chain, error)) (Chain, error) {
	a.mu.Lock()
	if a.waiting == 0 {
		a.mu.Unlock()
		c, err := try(ctx)
		if !errors.Is(err, ErrBusy) || ctx.Err() != nil {
			return c, err
		}
		a.mu.Lock()
	}
	if a.waiting >= a.depth {
		a.stats.Full++
		after := a.retryAfterLocked()
		a.mu.Unlock()
		return nil, &QueueError{Err: ErrQueueFull, Depth: a.depth, After: after}
	}
	w := &waiter{client: client, turn: make(chan struct{}, 1), since: time.Now()}
	a.enqueueLocked(w)
	a.mu.Unlock()

	var expire <-chan time.Time
	if a.timeout > 0 {
		t := time.NewTimer(a.timeout)
		defer t.Stop()
		expire = t.C
	}
	poll := time.NewTimer(a.poll)
	defer poll.Stop()
	var last error
	for {
		select {
		case <-ctx.Done():
			a.leave(w, &a.stats.Cancelled)
			return nil, ctx.Err()
		case <-expire:
			a.leave(w, &a.stats.TimedOut)
			a.mu.Lock()
			after := a.retryAfterLocked()
			a.mu.Unlock()
			return nil, &QueueError{Err: ErrQueueTimeout, Depth: a.depth, Wait: time.Since(w.since), After: after, Cause: last}
		case <-w.turn:
			if !a.isHead(w) {
				continue
			}
		case <-poll.C:
			poll.Reset(a.poll)
			if !a.isHead(w) {
				continue
			}
		}
		c, err := try(ctx)
		if errors.Is(err, ErrBusy) && ctx.Err() == nil {
			last = err
			continue // still the head: wait for a session to end
		}
		a.mu.Lock()
		a.removeLocked(w)
		if err == nil {
			a.stats.Started++
			wait := time.Since(w.since)
			a.avgWait = (3*a.avgWait + wait) / 4
			a.stats.StartedWait += wait
			i := 0
			for i < len(waitBounds) && wait.Seconds() > waitBounds[i] {
				i++
			}
			a.stats.StartedWaits[i]++
			// The client that just started goes behind the others.
			a.rotateLocked(w.client)
		}
		a.signalLocked() // there may be room for the next one too
		a.mu.Unlock()
		return c, err
	}
}

// retryAfterLocked guesses when a retry is likely to be taken: the recent wait of requests
// that did start, bounded by the queue's timeout.
func (a *Admission) retryAfterLocked() time.Duration {
	d := max(a.avgWait, time.Second)
	if a.timeout > 0 && d > a.timeout {
		d = a.timeout
	}
	return d
}

func (a *Admission) enqueueLocked(w *waiter) {
	if len(a.clients[w.client]) == 0 {
		a.order = append(a.order, w.client)
	}
	a.clients[w.client] = append(a.clients[w.client], w)
	a.waiting++
	a.stats.Queued++
	if a.waiting == 1 {
		a.signalLocked()
	}
}

func (a *Admission) leave(w *waiter, counter *uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	wasHead := a.headLocked() == w
	if a.removeLocked(w) {
		*counter++
	}
	if wasHead {
		a.signalLocked()
	}
}

// removeLocked takes w out of the queue; false if it was not in it.
func (a *Admission) removeLocked(w *waiter) bool {
	q := a.clients[w.client]
	for i, x := range q {
		if x != w {
			continue
		}
		q = append(q[:i], q[i+1:]...)
		a.waiting--
		a.stats.WaitSum += time.Since(w.since)
		if len(q) == 0 {
			delete(a.clients, w.client)
			for j, c := range a.order {
				if c == w.client {
					a.order = append(a.order[:j], a.order[j+1:]...)
					break
				}
			}
		} else {
			a.clients[w.client] = q
		}
		return true
	}
	return false
}

// rotateLocked moves client to the back of the round robin.
func (a *Admission) rotateLocked(client string) {
	for j, c := range a.order {
		if c == client {
			a.order = append(append(a.order[:j:j], a.order[j+1:]...), client)
			return
		}
	}
}

func (a *Admission) headLocked() *waiter {
	if len(a.order) == 0 {
		return nil
	}
	return a.clients[a.order[0]][0]
}

func (a *Admission) isHead(w *waiter) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.headLocked() == w
}

func (a *Admission) signalLocked() {
	if h := a.headLocked(); h != nil {
		select {
		case h.turn <- struct{}{}:
		default:
		}
	}
}
