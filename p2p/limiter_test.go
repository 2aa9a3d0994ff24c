package p2p

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeClock is virtual time: Sleep advances it at once, so a test of the limiter checks how
// much time the bytes it let through would take, never how long the test took.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	slept time.Duration
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.slept += d
	return nil
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// p2p: the bandwidth limiter lets through a burst at once and then exactly its rate: the
// virtual time needed to pass B bytes is (B-burst)/rate, for one caller or several at once.
func TestLimiterRate(t *testing.T) {
	const rate = 64 << 20 // bytes per second; burst = max(rate/4, 8 MiB) = 16 MiB
	const burst = 16 << 20
	for _, tc := range []struct {
		name    string
		callers int
		chunk   int
		chunks  int
	}{
		{"one stream", 1, 1 << 20, 200},
		{"eight streams", 8, 256 << 10, 100},
		{"whole chunks", 2, MaxWeightsChunk, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &fakeClock{now: time.Unix(1e9, 0)}
			l := newLimiter(rate, c)
			var wg sync.WaitGroup
			for range tc.callers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range tc.chunks {
						if err := l.Wait(context.Background(), tc.chunk); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			total := float64(tc.callers * tc.chunk * tc.chunks)
			want := (total - burst) / rate // seconds of virtual time the bytes need past the burst
			got := c.now.Sub(time.Unix(1e9, 0)).Seconds()
			t.Logf("%d bytes through a %d B/s limiter: %.4fs of virtual time, (bytes-burst)/rate = %.4fs", int(total), rate, got, want)
			// Concurrent sleepers each advance the clock by their own debt, so the virtual time
			// may overshoot, never undershoot: bytes never pass faster than the rate.
			if got < want*(1-1e-9) {
				t.Fatalf("%.0f bytes passed in %.4fs, faster than %d B/s allows (%.4fs)", total, got, rate, want)
			}
			if tc.callers == 1 && got > want*1.001 {
				t.Fatalf("one stream took %.4fs for what the rate passes in %.4fs", got, want)
			}
		})
	}
}

// p2p: an idle limiter refills to its burst and no further; a nil limiter never waits; a
// cancelled wait returns the context's error.
func TestLimiterBurstAndCancel(t *testing.T) {
	const rate = 32 << 20 // burst: 8 MiB (MaxWeightsChunk)
	c := &fakeClock{now: time.Unix(1e9, 0)}
	l := newLimiter(rate, c)
	if err := l.Wait(context.Background(), MaxWeightsChunk); err != nil || c.slept != 0 {
		t.Fatalf("the first burst waited %s (%v)", c.slept, err)
	}
	c.advance(time.Hour) // idle: the bucket refills to the burst only
	if err := l.Wait(context.Background(), MaxWeightsChunk+rate); err != nil {
		t.Fatal(err)
	}
	if c.slept != time.Second {
		t.Fatalf("burst+rate bytes after an idle hour waited %s, want 1s", c.slept)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Wait(ctx, rate); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	var nilLimiter *Limiter
	if err := nilLimiter.Wait(ctx, 1<<30); err != nil {
		t.Fatalf("nil limiter: %v", err)
	}
	if NewLimiter(0) != nil {
		t.Fatal("a zero rate makes a limiter")
	}
}
