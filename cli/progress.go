package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progressBar draws a one-line bar on a terminal and stays quiet anywhere else, so logs and
// pipes get no control characters.
type progressBar struct {
	mu    sync.Mutex
	w     io.Writer
	label string
	on    bool
	last  time.Time
	frac  float32
}

func newProgressBar(f *os.File, label string) *progressBar {
	return &progressBar{w: f, label: label, on: isTerminal(f)}
}

// Set updates the bar to fraction f (0..1); safe for concurrent use.
func (p *progressBar) Set(f float32) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if f < p.frac { // a new phase (cutting a slice, then loading it) starts a new line
		p.frac = 0
		fmt.Fprintln(p.w)
	}
	if f < 1 && time.Since(p.last) < 100*time.Millisecond {
		return
	}
	p.frac, p.last = f, time.Now()
	const width = 30
	n := int(f * width)
	fmt.Fprintf(p.w, "\r%-24s [%s%s] %3.0f%%", p.label, strings.Repeat("=", n), strings.Repeat(" ", width-n), f*100)
}

// Done ends the bar's line.
func (p *progressBar) Done() {
	if !p.on {
		return
	}
	p.Set(1)
	fmt.Fprintln(p.w)
}
