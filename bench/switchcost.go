package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"syscall"
	"time"
	"unsafe"
)

// SwitchCost measures what taking turns between processes costs a memory-bound step on this
// machine, with no Strata code in the loop: procs buffers of size bytes streamed in turn by
// one process, against the same buffers each in a child process of its own, a token passed
// round a ring of pipes as a swarm's stages pass a step. It returns the median over reps of
// the children's time per round over the one process's, and the two times of that rep.
//
// A swarm whose nodes share one machine pays it on every step: on the 2-vCPU virtual machines
// this was written on, 3 processes taking turns streamed memory 1.15-1.3x slower than one
// process streaming the same buffers, which is what the 3-node bench's stages lost against
// the whole model. Machines of a real swarm each run one node and never pay it.
//
// worker is the command line that runs StreamWorker in a child (size in bytes is appended).
func SwitchCost(ctx context.Context, worker []string, procs, size, rounds, reps int) (ratio float64, one, many time.Duration, err error) {
	type pair struct{ one, many time.Duration }
	var pairs []pair
	for range reps {
		o, err := streamInOne(procs, size, rounds)
		if err != nil {
			return 0, 0, 0, err
		}
		m, err := streamInMany(ctx, worker, procs, size, rounds)
		if err != nil {
			return 0, 0, 0, err
		}
		pairs = append(pairs, pair{o, m})
	}
	slices.SortFunc(pairs, func(a, b pair) int {
		ra, rb := float64(a.many)/float64(a.one), float64(b.many)/float64(b.one)
		switch {
		case ra < rb:
			return -1
		case ra > rb:
			return 1
		}
		return 0
	})
	p := pairs[len(pairs)/2]
	return float64(p.many) / float64(p.one), p.one, p.many, nil
}

// streamBuffer is size bytes of anonymous memory in huge pages where the kernel gives them, as
// the engine's weights are (engine patch 0004), touched once so that streaming it reads RAM.
type streamBuffer struct {
	mem []byte
	w   []uint64
}

func newStreamBuffer(size int) (*streamBuffer, error) {
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("stream buffer of %d bytes: %w", size, err)
	}
	_ = syscall.Madvise(mem, 14) // MADV_HUGEPAGE; without it the kernel may still give them
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = byte(i >> 12)
	}
	return &streamBuffer{mem: mem, w: unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), size/8)}, nil
}

// sum reads every word: a memory-bound pass, like a decode step over a stage's weights.
func (b *streamBuffer) sum() uint64 {
	var s0, s1, s2, s3 uint64
	w := b.w
	for i := 0; i+3 < len(w); i += 4 {
		s0 += w[i]
		s1 += w[i+1]
		s2 += w[i+2]
		s3 += w[i+3]
	}
	return s0 + s1 + s2 + s3
}

func (b *streamBuffer) free() { _ = syscall.Munmap(b.mem) }

// use keeps a sum from being optimised away.
//
//go:noinline
func use(uint64) {}

func streamInOne(procs, size, rounds int) (time.Duration, error) {
	var bufs []*streamBuffer
	defer func() {
		for _, b := range bufs {
			b.free()
		}
	}()
	for range procs {
		b, err := newStreamBuffer(size)
		if err != nil {
			return 0, err
		}
		bufs = append(bufs, b)
	}
	for _, b := range bufs { // warm-up round
		use(b.sum())
	}
	t := time.Now()
	for range rounds {
		for _, b := range bufs {
			use(b.sum())
		}
	}
	return time.Since(t) / time.Duration(rounds), nil
}

func streamInMany(ctx context.Context, worker []string, procs, size, rounds int) (d time.Duration, err error) {
	// A ring: this process -> child 0 -> child 1 -> ... -> this process.
	first, in, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	prev := first // the read end the next child takes
	var cmds []*exec.Cmd
	defer func() {
		in.Close()
		for _, c := range cmds {
			if werr := c.Wait(); werr != nil && err == nil {
				err = fmt.Errorf("stream worker: %w", werr)
			}
		}
	}()
	for range procs {
		r, w, err := os.Pipe()
		if err != nil {
			prev.Close()
			return 0, err
		}
		c := exec.CommandContext(ctx, worker[0], append(worker[1:], strconv.Itoa(size))...)
		c.ExtraFiles = []*os.File{prev, w}
		c.Stderr = os.Stderr
		err = c.Start()
		prev.Close()
		w.Close()
		if err != nil {
			r.Close()
			return 0, fmt.Errorf("start stream worker: %w", err)
		}
		cmds = append(cmds, c)
		prev = r
	}
	out := prev
	defer out.Close()
	tok := []byte{1}
	pass := func() error {
		if _, err := in.Write(tok); err != nil {
			return fmt.Errorf("stream workers: %w", err)
		}
		if _, err := io.ReadFull(out, tok); err != nil {
			return fmt.Errorf("stream workers: %w", err)
		}
		return nil
	}
	if err := pass(); err != nil { // the workers fill their buffers, then a warm-up round
		return 0, err
	}
	if err := pass(); err != nil {
		return 0, err
	}
	t := time.Now()
	for range rounds {
		if err := pass(); err != nil {
			return 0, err
		}
	}
	return time.Since(t) / time.Duration(rounds), nil
}

// StreamWorker is a SwitchCost child: it streams a buffer of size bytes once for every byte
// read from in, then passes the byte on to out, until in ends.
func StreamWorker(in io.Reader, out io.Writer, size int) error {
	if size <= 0 {
		return errors.New("stream worker: size must be positive")
	}
	b, err := newStreamBuffer(size)
	if err != nil {
		return err
	}
	defer b.free()
	tok := make([]byte, 1)
	for {
		if _, err := io.ReadFull(in, tok); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("stream worker: %w", err)
		}
		use(b.sum())
		if _, err := out.Write(tok); err != nil {
			return fmt.Errorf("stream worker: %w", err)
		}
	}
}
