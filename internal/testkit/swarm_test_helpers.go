package testkit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// BuildStrata builds the strata binary for tests. It inherits CGO_CFLAGS, so `make test` gets
// the fast ggml build. In a package whose TestMain runs through Main, the binary is built once
// for the whole test process and shared: a build is a cgo link of ggml, ~10 s of CPU each, and
// the node package used to pay it in every swarm test. Elsewhere it is built into the test's
// temp dir.
func BuildStrata(tb testing.TB) string {
	tb.Helper()
	if sharedBuild.dir == "" {
		return buildStrata(tb, filepath.Join(tb.TempDir(), "strata"))
	}
	sharedBuild.once.Do(func() {
		sharedBuild.bin = filepath.Join(sharedBuild.dir, "strata")
		sharedBuild.err = build(sharedBuild.bin)
	})
	if sharedBuild.err != nil {
		tb.Fatal(sharedBuild.err)
	}
	return sharedBuild.bin
}

// sharedBuild is the binary shared by a test process's tests; Main sets dir.
var sharedBuild struct {
	dir  string
	once sync.Once
	bin  string
	err  error
}

// Main runs a package's tests with one shared strata build (see BuildStrata) and removes it
// afterwards. Use it from TestMain: os.Exit(testkit.Main(m)).
func Main(m *testing.M) int {
	dir, err := os.MkdirTemp("", "strata-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testkit:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	sharedBuild.dir = dir
	return m.Run()
}

func buildStrata(tb testing.TB, bin string) string {
	tb.Helper()
	if err := build(bin); err != nil {
		tb.Fatal(err)
	}
	return bin
}

func build(bin string) error {
	cmd := exec.Command("go", "build", "-o", bin, "github.com/strata-llm/strata/cmd/strata")
	cmd.Env = os.Environ()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build strata: %v\n%s", err, out)
	}
	return nil
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
