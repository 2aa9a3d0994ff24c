package testkit

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// BuildStrata builds the strata binary for tests into a temp dir (the go build cache makes
// this a link step once the packages are compiled). It inherits CGO_CFLAGS, so `make test`
// gets the fast ggml build.
func BuildStrata(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "strata")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/strata-llm/strata/cmd/strata")
	cmd.Env = os.Environ()
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("build strata: %v\n%s", err, out)
	}
	return bin
}

// NewSwarm starts a local swarm for a test, builds the binary if opts.Binary is empty, and
// stops every node when the test ends (printing their logs if it failed).
func NewSwarm(tb testing.TB, opts SwarmOptions) *Swarm {
	tb.Helper()
	if opts.Binary == "" {
		opts.Binary = BuildStrata(tb)
	}
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	s, err := StartSwarm(context.Background(), opts)
	tb.Cleanup(func() {
		if s == nil {
			return
		}
		s.Close()
		if tb.Failed() {
			for _, n := range s.Nodes {
				tb.Logf("node %d log:%s", n.Index, n.Tail(40))
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// MustReady waits for the swarm to be ready or fails the test.
func (s *Swarm) MustReady(tb testing.TB, want int, timeout time.Duration) {
	tb.Helper()
	if err := s.WaitReady(context.Background(), want, timeout); err != nil {
		tb.Fatal(err)
	}
}
