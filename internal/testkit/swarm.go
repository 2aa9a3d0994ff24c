package testkit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// SwarmOptions describe a local swarm of `strata node start` processes on 127.0.0.1.
type SwarmOptions struct {
	Binary  string   // the strata binary
	Nodes   int      // how many to start
	Model   string   // GGUF path every node serves
	Dir     string   // where the nodes' data dirs and logs go
	Threads int      // ggml threads per node (default: the cores shared out, at least 1)
	Args    []string // extra flags for every node
	// Env adds KEY=value variables to every node's environment (t.Setenv would do it for the
	// whole test process, and so forbid t.Parallel).
	Env []string
}

// Swarm is a set of local node processes. The first one is every other's bootstrap peer.
type Swarm struct {
	opts  SwarmOptions
	Nodes []*Node
}

// Node is one `strata node start` process.
type Node struct {
	Index     int
	DataDir   string
	API       string // host:port
	Multiaddr string // libp2p address with /p2p/ID
	LogPath   string
	cmd       *exec.Cmd
	args      []string
	exited    chan struct{}
}

// StartSwarm starts opts.Nodes nodes and waits until each has written its addresses.
func StartSwarm(ctx context.Context, opts SwarmOptions) (*Swarm, error) {
	if opts.Threads <= 0 {
		// ggml's worker threads spin while they wait: nodes sharing a machine must share its
		// cores, or they run many times slower.
		opts.Threads = max(1, runtime.NumCPU()/max(1, opts.Nodes))
	}
	s := &Swarm{opts: opts}
	for range opts.Nodes {
		if _, err := s.Add(ctx); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Add starts one more node that joins through the first one.
func (s *Swarm) Add(ctx context.Context, extra ...string) (*Node, error) {
	i := len(s.Nodes)
	n := &Node{Index: i, DataDir: filepath.Join(s.opts.Dir, fmt.Sprintf("node%d", i)), exited: make(chan struct{})}
	if err := os.MkdirAll(n.DataDir, 0o755); err != nil {
		return nil, err
	}
	// Address files from an earlier run in the same dir would be read as this run's.
	for _, f := range []string{"multiaddr", "api"} {
		if err := os.Remove(filepath.Join(n.DataDir, f)); err != nil && !os.IsNotExist(err) {
			return nil, err
		}
	}
	n.LogPath = filepath.Join(s.opts.Dir, fmt.Sprintf("node%d.log", i))
	args := []string{"node", "start", "--model", s.opts.Model, "--data-dir", n.DataDir,
		"--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--gossip", "127.0.0.1:0",
		"--threads", fmt.Sprint(s.opts.Threads), "--mdns=false", "--verbose"}
	if len(s.Nodes) > 0 {
		args = append(args, "--join", s.Nodes[0].Multiaddr)
	}
	n.args = append(append(args, s.opts.Args...), extra...)
	if err := os.Remove(n.LogPath); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	err := s.start(ctx, n)
	if n.cmd == nil || n.cmd.Process == nil {
		return nil, err // never started
	}
	s.Nodes = append(s.Nodes, n)
	return n, err
}

// Restart starts a stopped node again with the same data dir and flags (its identity, slice
// cache and cached headers carry over); its log continues in the same file.
func (s *Swarm) Restart(ctx context.Context, n *Node) error {
	if !n.Exited() {
		return fmt.Errorf("restart node %d: still running", n.Index)
	}
	for _, f := range []string{"multiaddr", "api"} {
		if err := os.Remove(filepath.Join(n.DataDir, f)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	n.exited = make(chan struct{})
	return s.start(ctx, n)
}

func (s *Swarm) start(ctx context.Context, n *Node) error {
	logf, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.opts.Binary, n.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if len(s.opts.Env) > 0 {
		cmd.Env = append(os.Environ(), s.opts.Env...)
	}
	// Pdeathsig: nodes die with the process that started them, even when it cannot clean up
	// (a test binary killed at its timeout, a demo killed with -9).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		close(n.exited) // nothing runs: Stop and Exited see a stopped node
		return fmt.Errorf("start node %d: %w", n.Index, err)
	}
	n.cmd = cmd
	exited := n.exited
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	// A node writes its addresses after hashing the model: the hang guard grows with the file
	// (16 MB/s, what a loaded 2-core machine still hashes), or a GB-sized model never starts.
	guard := 60 * time.Second
	if st, err := os.Stat(s.opts.Model); err == nil {
		guard += time.Duration(st.Size()/16e6) * time.Second
	}
	return n.waitAddrs(ctx, guard)
}

func (n *Node) waitAddrs(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		ma, err1 := os.ReadFile(filepath.Join(n.DataDir, "multiaddr"))
		api, err2 := os.ReadFile(filepath.Join(n.DataDir, "api"))
		if err1 == nil && err2 == nil && len(ma) > 0 && len(api) > 0 {
			n.Multiaddr = strings.TrimSpace(strings.Split(string(ma), "\n")[0])
			n.API = strings.TrimSpace(string(api))
			return nil
		}
		select {
		case <-n.exited:
			return fmt.Errorf("node %d exited at start: %s", n.Index, n.Tail(30))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("node %d wrote no addresses in %s: %s", n.Index, timeout, n.Tail(30))
}

// Health is the part of a node's /health that the launcher reads.
type Health struct {
	Ready   bool   `json:"ready"`
	PeerID  string `json:"peer_id"`
	State   string `json:"state"`
	Missing string `json:"missing"`
	AtPlan  bool   `json:"at_plan"`
	Peers   []struct {
		PeerID   string    `json:"peer_id"`
		State    string    `json:"state"`
		Sessions int       `json:"sessions"`
		Self     bool      `json:"self"`
		Memory   int64     `json:"memory_bytes"`
		Next     *struct{} `json:"next"`
		Range    struct {
			Start int `json:"start"`
			End   int `json:"end"`
		} `json:"range"`
	} `json:"peers"`
}

// Health fetches the node's /health.
func (n *Node) Health(ctx context.Context) (Health, error) {
	var h Health
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.API+"/health", nil)
	if err != nil {
		return h, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&h)
	return h, err
}

// WaitReady waits until the swarm has settled with at least want nodes that offer memory:
// every running node is ready (a route covers every layer), sees them all, and is at its part
// of the plan with nobody loading or moving. How many of them the plan gives layers depends on
// their measured speeds, so it is not counted: a test that needs a node in some role finds
// one from /health.
func (s *Swarm) WaitReady(ctx context.Context, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		ok := true
		for _, n := range s.Nodes {
			if n.Exited() {
				continue
			}
			h, err := n.Health(ctx)
			members, moving := 0, 0
			for _, p := range h.Peers {
				if p.Memory > 0 && p.State != "draining" {
					members++
				}
				if p.State == "loading" || p.Next != nil {
					moving++
				}
			}
			if err != nil || !h.Ready || !h.AtPlan || members < want || moving > 0 {
				ok = false
				last = fmt.Sprintf("node %d: ready=%v at_plan=%v members %d/%d moving=%d missing=%q err=%v", n.Index, h.Ready, h.AtPlan, members, want, moving, h.Missing, err)
				break
			}
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("swarm not ready in %s: %s", timeout, last)
}

// Exited reports whether the process has ended.
func (n *Node) Exited() bool {
	select {
	case <-n.exited:
		return true
	default:
		return false
	}
}

// Kill ends the node with SIGKILL, as a crash would.
func (n *Node) Kill() {
	if n.cmd.Process != nil {
		_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-n.exited
}

// Freeze stops the node with SIGSTOP: it keeps its connections open but answers nothing, like
// a hung process or a link that drops packets without a reset. Kill still ends it.
func (n *Node) Freeze() {
	if n.cmd.Process != nil {
		_ = syscall.Kill(n.cmd.Process.Pid, syscall.SIGSTOP)
	}
}

// Stop asks the node to drain and leave (SIGTERM) and waits for it, killing it after timeout.
func (n *Node) Stop(timeout time.Duration) error {
	if n.cmd.Process == nil || n.Exited() {
		return nil
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
		return nil
	case <-time.After(timeout):
		n.Kill()
		return errors.New("node did not stop in time; killed")
	}
}

// Tail returns the last lines of the node's log, for failure messages.
func (n *Node) Tail(lines int) string {
	f, err := os.Open(n.LogPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(f)
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return "\n" + strings.Join(all[max(0, len(all)-lines):], "\n")
}

// Close stops every node: gracefully first, then by force.
func (s *Swarm) Close() {
	for _, n := range s.Nodes {
		if !n.Exited() && n.cmd.Process != nil {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, n := range s.Nodes {
		select {
		case <-n.exited:
		case <-time.After(10 * time.Second):
			n.Kill()
		}
	}
}
