// Package progress turns bytes done by concurrent writers into the fraction a progress bar
// shows.
package progress

import "sync"

// Counter reports done/total to a callback as work is added. The zero value, or one with a
// nil Report, counts nothing.
type Counter struct {
	Total  int64
	Report func(float32)

	mu   sync.Mutex
	done int64
}

// Add records n more units done; safe for concurrent use.
func (c *Counter) Add(n int64) {
	if c == nil || c.Report == nil || c.Total <= 0 {
		return
	}
	c.mu.Lock()
	c.done += n
	f := float32(c.done) / float32(c.Total)
	c.mu.Unlock()
	c.Report(min(f, 1))
}
