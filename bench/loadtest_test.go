package bench

import (
	"math"
	"testing"
)

// TestQueueWaitQuantiles: requests that never queued count as waits of 0, and a quantile
// among the queued ones is the upper bound of its histogram bucket.
func TestQueueWaitQuantiles(t *testing.T) {
	before := waitHist{bounds: []float64{0.1, 1, 10}, cum: []uint64{1, 1, 1}, count: 1, sum: 0.05}
	after := waitHist{bounds: []float64{0.1, 1, 10}, cum: []uint64{1, 3, 5}, count: 6, sum: 20}
	w := after.minus(before) // 5 queued: 2 within 1 s, 2 more within 10 s, 1 beyond
	for _, c := range []struct {
		q     float64
		total int
		want  float64
	}{{0.5, 10, 0}, {0.5, 5, 10}, {0.4, 5, 1}, {0.99, 10, math.Inf(1)}, {0.8, 10, 10}, {0.5, 0, 0}} {
		if got := w.quantile(c.q, c.total); got != c.want {
			t.Errorf("quantile(%v) of %d requests: %v, want %v", c.q, c.total, got, c.want)
		}
	}
}
