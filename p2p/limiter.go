package p2p

import (
	"context"
	"sync"
	"time"
)

// Limiter paces bytes to a rate, shared by any number of streams. A nil Limiter does not
// limit. It is a token bucket: a burst of max(rate/4, MaxWeightsChunk) bytes passes at once,
// then bytes pass at the rate.
type Limiter struct {
	rate  float64 // bytes per second
	burst float64
	clock clock

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

// clock is the time a Limiter goes by: the wall clock, or a test's.
type clock interface {
	Now() time.Time
	Sleep(ctx context.Context, d time.Duration) error
}

type wallClock struct{}

func (wallClock) Now() time.Time { return time.Now() }

func (wallClock) Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// NewLimiter returns a limiter of bytesPerSecond, or nil (no limit) when it is not positive.
func NewLimiter(bytesPerSecond int64) *Limiter {
	return newLimiter(bytesPerSecond, wallClock{})
}

func newLimiter(bytesPerSecond int64, c clock) *Limiter {
	if bytesPerSecond <= 0 {
		return nil
	}
	b := max(float64(bytesPerSecond)/4, MaxWeightsChunk)
	return &Limiter{rate: float64(bytesPerSecond), burst: b, tokens: b, last: c.Now(), clock: c}
}

// Wait blocks until n bytes may pass. The bytes are taken at once, so callers waiting
// together queue behind one another: each waits for the debt before it to be paid off.
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	now := l.clock.Now()
	l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	l.tokens -= float64(n)
	wait := time.Duration(0)
	if l.tokens < 0 {
		wait = time.Duration(-l.tokens / l.rate * float64(time.Second))
	}
	l.mu.Unlock()
	if wait == 0 {
		return nil
	}
	return l.clock.Sleep(ctx, wait)
}
