package node

import (
	"math"
	"time"
)

// memoryBandwidth measures how fast this machine copies memory, in bytes per second. Decoding
// one token reads every weight once, so this bounds a node's speed before it has loaded
// anything, which is when the planner first needs it.
func memoryBandwidth() float64 {
	const size = 64 << 20
	src := make([]byte, size)
	dst := make([]byte, size)
	for i := range src {
		src[i] = byte(i)
	}
	best := math.Inf(1)
	for range 3 {
		t := time.Now()
		copy(dst, src)
		best = min(best, time.Since(t).Seconds())
	}
	return 2 * size / best // a copy reads and writes
}

// msPerLayer estimates decode milliseconds per layer from the bandwidth, rounded to a
// quarter-octave so that small measurement noise does not move layers between nodes.
func msPerLayer(layerBytes int64, bandwidth float64) float32 {
	if bandwidth <= 0 || layerBytes <= 0 {
		return 0
	}
	ms := float64(layerBytes) / bandwidth * 1000
	return float32(math.Exp2(math.Round(math.Log2(ms)*4) / 4))
}
