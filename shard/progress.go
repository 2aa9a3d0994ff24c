package shard

import "sync"

// progressCounter turns bytes done by concurrent writers into a fraction for a progress bar.
type progressCounter struct {
	mu     sync.Mutex
	done   int64
	total  int64
	report func(float32)
}

func (p *progressCounter) add(n int64) {
	if p.report == nil || p.total <= 0 {
		return
	}
	p.mu.Lock()
	p.done += n
	f := float32(p.done) / float32(p.total)
	p.mu.Unlock()
	p.report(f)
}
