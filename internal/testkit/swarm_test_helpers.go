package testkit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BuildStrata returns a strata binary for tests. In a package whose TestMain runs through Main
// with the CLI, that is the test binary itself, which runs as strata when started with
// asStrataEnv set: no build at all. With Main alone, strata is built once for the whole test
// process and shared: a build is a cgo link of ggml, ~10 s of CPU each, and the node package
// used to pay it in every swarm test. Elsewhere it is built into the test's temp dir. A build
// inherits CGO_CFLAGS, so `make test` gets the fast ggml build.
func BuildStrata(tb testing.TB) string {
	tb.Helper()
	if sharedBuild.dir == "" {
		return buildStrata(tb, filepath.Join(tb.TempDir(), "strata"))
	}
	sharedBuild.once.Do(func() {
		if sharedBuild.bin == "" {
			sharedBuild.bin = filepath.Join(sharedBuild.dir, "strata")
			sharedBuild.err = build(sharedBuild.bin)
		}
	})
	if sharedBuild.err != nil {
		tb.Fatal(sharedBuild.err)
	}
	return sharedBuild.bin
}

// sharedBuild is the binary shared by a test process's tests; Main sets dir, and bin when the
// test binary itself serves as strata.
var sharedBuild struct {
	dir  string
	once sync.Once
	bin  string
	err  error
}

// asStrataEnv, set to 1 in a test binary's environment, makes Main run the CLI instead of the
// tests. Main sets it for every process the tests start: those that are the test binary are
// the strata nodes and commands; the others ignore it.
const asStrataEnv = "STRATA_TESTKIT_AS_STRATA"

// Main runs a package's tests with one strata binary for all of them (see BuildStrata) and
// removes what it built afterwards. Use it from TestMain: os.Exit(testkit.Main(m, nil)), or,
// where the test package can import the CLI, os.Exit(testkit.Main(m, cli.Execute)): the test
// binary then is the strata binary, as a `go build` of the same packages with the same flags
// would be, and runs the CLI as cmd/strata's main does (interrupt and SIGTERM cancel it).
func Main(m *testing.M, strata func(ctx context.Context, args []string) int) int {
	if strata != nil && os.Getenv(asStrataEnv) == "1" && !testInvocation(os.Args[1:]) {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return strata(ctx, os.Args[1:])
	}
	dir, err := os.MkdirTemp("", "strata-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testkit:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	sharedBuild.dir = dir
	if strata != nil {
		if exe, err := os.Executable(); err == nil && os.Setenv(asStrataEnv, "1") == nil {
			sharedBuild.bin = exe
		}
	}
	return m.Run()
}

// testInvocation reports whether args are the testing package's own (-test.*), as when
// the fuzzing engine starts this binary as a worker: those must run the tests even with
// asStrataEnv inherited. strata's flags never start with -test.
func testInvocation(args []string) bool {
	for _, a := range args {
		if strings.HasPrefix(a, "-test.") {
			return true
		}
	}
	return false
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
