package node_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"github.com/strata-llm/strata/internal/testkit"
)

// Tiny model arithmetic for --max-memory: a layer is ~99 KB of f16 weights plus ~2 MiB of KV
// budget (2048 tokens x 8 sessions x 128 B), the embeddings and head ~0.3 MB each, so 5 MiB
// holds two layers and 7.5 MiB three.
const (
	twoLayers   = "5MiB"
	threeLayers = "7.5MiB"
)

// coverage returns the serving ranges a node sees, as "[a,b)" strings sorted.
func coverage(t *testing.T, n *testkit.Node) ([]string, testkit.Health) {
	t.Helper()
	h, err := n.Health(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var rs []string
	for _, p := range h.Peers {
		if p.State == "serving" {
			rs = append(rs, fmt.Sprintf("[%d,%d)", p.Range.Start, p.Range.End))
		}
	}
	slices.Sort(rs)
	return rs, h
}

func covers(ranges []string, layers int) bool {
	seen := make([]bool, layers)
	for _, r := range ranges {
		var a, b int
		fmt.Sscanf(r, "[%d,%d)", &a, &b)
		for l := a; l < b && l < layers; l++ {
			seen[l] = true
		}
	}
	return !slices.Contains(seen, false)
}

// settled waits until n sees want serving ranges that partition the layers: they cover every
// layer and none overlaps another. Ready can come while nodes that planned from different
// early views still serve overlapping ranges ([0,3) beside [2,4)) or a first range beside the
// one the settled plan gives them; a stream opened then may skip a node or land on a range
// being retired, so tests that need a session on every node wait for the plan first.
func settled(t *testing.T, n *testkit.Node, want, layers int) []string {
	t.Helper()
	var rs []string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if rs, _ = coverage(t, n); covers(rs, layers) && len(rs) == want && span(rs) == layers {
			return rs
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes serve %v, want %d ranges that partition %d layers", rs, want, layers)
		}
	}
}

// span is the ranges' total length: the layer count exactly when ranges that cover every layer
// do not overlap.
func span(ranges []string) int {
	total := 0
	for _, r := range ranges {
		var a, b int
		fmt.Sscanf(r, "[%d,%d)", &a, &b)
		total += b - a
	}
	return total
}

// TestSwarmPlansHealsAndGrows: three node processes join through --join and split the model
// so that every layer is served; a fourth joins without a gap in coverage (whether it takes a
// share or stays idle is the planner's call on measured speeds: shard's plan tests cover it);
// after kill -9 of one, the others re-plan and are ready again.
func TestSwarmPlansHealsAndGrows(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", twoLayers}})
	s.MustReady(t, 3, 30*time.Second)
	rs := settled(t, s.Nodes[1], 3, 6)
	t.Logf("3 nodes: %v", rs)

	// A fourth node: coverage must hold at every moment while it takes its share.
	stop := make(chan struct{})
	gaps := make(chan string, 100)
	go func() {
		for {
			select {
			case <-stop:
				close(gaps)
				return
			case <-time.After(50 * time.Millisecond):
			}
			if h, err := s.Nodes[0].Health(context.Background()); err == nil && !h.Ready {
				gaps <- h.Missing
			}
		}
	}()
	if _, err := s.Add(context.Background(), "--max-memory", twoLayers); err != nil {
		t.Fatal(err)
	}
	// Every node offers two layers, so a plan that leaves the newcomer idle is as balanced as
	// one that gives it a share, and which one the planner picks turns on the speeds the
	// nodes measured at start, i.e. on the machine's load: wait for the swarm to take the
	// newcomer in and settle (ranges that partition the layers, nothing loading), whichever
	// plan it is. The deadline is a hang guard.
	var newcomer string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		rs, h := coverage(t, s.Nodes[0])
		h4, err := s.Nodes[3].Health(context.Background())
		newcomer = ""
		for _, p := range h4.Peers {
			if err == nil && p.Self {
				newcomer = p.State
			}
		}
		if len(h.Peers) == 4 && h.Ready && covers(rs, 6) && span(rs) == 6 && (newcomer == "serving" || newcomer == "idle") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("60 s after a fourth node joined: node 0 sees %d peers serving %v (ready %v); the newcomer is %q", len(h.Peers), rs, h.Ready, newcomer)
		}
	}
	close(stop)
	for g := range gaps {
		t.Errorf("coverage gap while a node joined: %s", g)
	}
	rs, _ = coverage(t, s.Nodes[0])
	t.Logf("4 nodes: %v; the newcomer is %s", rs, newcomer)

	// kill -9 one node: the other three re-plan and serve everything again.
	victim := s.Nodes[2]
	start := time.Now()
	victim.Kill()
	deadline := time.Now().Add(60 * time.Second) // a hang guard: detection and re-plan slow down under load
	for {
		rs, h := coverage(t, s.Nodes[0])
		if h.Ready && len(h.Peers) == 3 && covers(rs, 6) {
			t.Logf("ready again %s after kill -9: %v", time.Since(start).Round(10*time.Millisecond), rs)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready 60 s after kill -9: peers %d, ranges %v, missing %q", len(h.Peers), rs, h.Missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lists reports whether a node's /health lists the peer.
func lists(h testkit.Health, id string) bool {
	for _, p := range h.Peers {
		if p.PeerID == id {
			return true
		}
	}
	return false
}

// peerIDs returns each node's peer ID, in node order.
func peerIDs(t *testing.T, s *testkit.Swarm) []string {
	t.Helper()
	ids := make([]string, len(s.Nodes))
	for i, n := range s.Nodes {
		h, err := n.Health(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = h.PeerID
	}
	return ids
}

// gossipedSessions checks, for every node i and every other node j, the sessions j's /health
// shows for i: those come from i's announcements, not from j's own stage. It returns whether
// every one satisfies ok, and the views as text for a failure message.
func gossipedSessions(t *testing.T, s *testkit.Swarm, ids []string, ok func(int) bool) (bool, string) {
	t.Helper()
	all := true
	var view []string
	for j, n := range s.Nodes {
		h, err := n.Health(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range h.Peers {
			i := slices.Index(ids, p.PeerID)
			if i < 0 || i == j {
				continue
			}
			view = append(view, fmt.Sprintf("node %d sees node %d with %d", j, i, p.Sessions))
			all = all && ok(p.Sessions)
		}
	}
	return all && len(view) == len(ids)*(len(ids)-1), strings.Join(view, "; ")
}

// TestSessionsGossiped: while a stream holds a session on every stage, each node's /health
// shows the other nodes' sessions, which reach it only by gossip (the periodic re-announce:
// opening a session changes no state), and shows them go back to 0 once the stream is done.
// The injected latency (10 ms per frame) keeps the stream open for seconds.
func TestSessionsGossiped(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := swarmModel(t)
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", twoLayers, "--inject-latency", "10ms"}})
	s.MustReady(t, 3, 30*time.Second)
	settled(t, s.Nodes[0], 3, 6)
	ids := peerIDs(t, s)
	if ok, view := gossipedSessions(t, s, ids, func(n int) bool { return n == 0 }); !ok {
		t.Fatalf("before any request: %s", view)
	}
	var saw bool
	var last string
	chunks := 0
	_, err := stream(context.Background(), client(s.Nodes[0]), chatParams("tell me everything", 200), func(n int) {
		chunks = n
		if n != 3 {
			return
		}
		// The stream stays open while this polls: generation runs on in the swarm.
		deadline := time.Now().Add(30 * time.Second) // a hang guard: the stream ending first fails too
		for !saw && time.Now().Before(deadline) {
			saw, last = gossipedSessions(t, s, ids, func(n int) bool { return n > 0 })
			time.Sleep(100 * time.Millisecond)
		}
	})
	if err != nil {
		t.Fatalf("stream: %v", err)
	}
	if !saw {
		t.Fatalf("within 30 s of the stream's third chunk (of %d), not every node showed the others' sessions: %s", chunks, last)
	}
	t.Logf("mid-stream: %s", last)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, view := gossipedSessions(t, s, ids, func(n int) bool { return n == 0 })
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after the stream ended: %s", view)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDrainAndLeave: SIGTERM to a stage in the middle of a stream. The node stops taking new
// sessions but lets the running one finish, then leaves memberlist gracefully: the stream
// completes, the others drop the node from their view without declaring it failed first
// (failure detection would), take over its layers and keep serving.
func TestDrainAndLeave(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", threeLayers, "--inject-latency", "10ms"}})
	s.MustReady(t, 3, 30*time.Second)
	ids := peerIDs(t, s)
	// The victim must hold layers. Which nodes the plan uses depends on their measured speeds
	// (under load a 3/3 split on two nodes fits as well as 2/2/2), so it is any node but the
	// one streaming that serves a range at the planner's fixed point.
	var victim *testkit.Node
	var victimID string
	for _, i := range []int{2, 1} {
		h, err := s.Nodes[i].Health(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range h.Peers {
			if p.Self && p.Range.End > p.Range.Start && victim == nil {
				victim, victimID = s.Nodes[i], ids[i]
			}
		}
	}
	if victim == nil {
		t.Fatal("neither node 1 nor node 2 serves layers, yet node 0 cannot hold all six")
	}
	// The stream must finish within the drain's 10 s cap after the SIGTERM at chunk 5: 100
	// tokens did not at load average 35 (the victim cut the session at step 95); 60 leave
	// that margin while the 10 ms per frame still keeps it open past the signal.
	params := openai.ChatCompletionNewParams{
		Model:       "tiny-L0-f16-s1",
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("tell me everything")},
		MaxTokens:   openai.Int(60),
		Temperature: openai.Float(0),
	}
	stopped := make(chan error, 1)
	var exitedAt, termAt time.Time
	chunks := 0
	_, err := stream(context.Background(), client(s.Nodes[0]), params, func(n int) {
		chunks = n
		if n == 5 {
			termAt = time.Now()
			go func() {
				err := victim.Stop(30 * time.Second)
				exitedAt = time.Now()
				stopped <- err
			}()
		}
	})
	if err != nil {
		t.Fatalf("the stream broke while a stage drained: %v (after %d chunks)", err, chunks)
	}
	if chunks < 5 {
		t.Fatalf("the stream ended after %d chunks, before the SIGTERM", chunks)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	// Read after the exit: the channel receive orders it after the write. The deadline is a
	// hang guard (a loaded machine gossips late); that the node left rather than failed is
	// what the logs below show.
	deadline := exitedAt.Add(30 * time.Second)
	survivors := []*testkit.Node{}
	for _, n := range s.Nodes {
		if n != victim {
			survivors = append(survivors, n)
		}
	}
	for _, n := range survivors {
		for {
			h, err := n.Health(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if !lists(h, victimID) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d still lists the stopped node 30 s after it exited", n.Index)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("survivors dropped the node within %s of its exit", time.Since(exitedAt).Round(10*time.Millisecond))

	vlog, err := os.ReadFile(victim.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`msg="draining: no new sessions" sessions=1`, `msg="left the swarm"`, `sessions_cut=0`} {
		if !strings.Contains(string(vlog), want) {
			t.Errorf("the stopped node's log lacks %q:%s", want, victim.Tail(20))
		}
	}
	for _, n := range survivors {
		b, err := os.ReadFile(n.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			// Only what followed the SIGTERM: on a loaded machine a node can be suspected, or
			// even declared failed and then refute it, at any time before (seen at load
			// average 35); a lone suspicion is refuted and says nothing about how it left.
			if at, ok := logTime(line); !ok || at.Before(termAt) {
				continue
			}
			if strings.Contains(line, "Marking "+victimID+" as failed") {
				t.Errorf("node %d detected the leaver as failed instead of seeing it leave: %s", n.Index, line)
			}
			if strings.Contains(line, `msg="member gone"`) && strings.Contains(line, victimID) && !strings.Contains(line, "last_state=draining") {
				t.Errorf("node %d saw the leaver go without announcing it drained: %s", n.Index, line)
			}
		}
	}

	s.MustReady(t, 2, 30*time.Second)
	c := client(s.Nodes[0])
	res, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: params.Model, Messages: params.Messages, MaxTokens: openai.Int(5), Temperature: openai.Float(0),
	})
	if err != nil || len(res.Choices) == 0 {
		t.Fatalf("the two survivors do not serve: %v", err)
	}
}

// logTime reads the time= field a node's log line starts with.
func logTime(line string) (time.Time, bool) {
	v, ok := strings.CutPrefix(line, "time=")
	if !ok {
		return time.Time{}, false
	}
	v, _, _ = strings.Cut(v, " ")
	t, err := time.Parse(time.RFC3339Nano, v)
	return t, err == nil
}
