package node_test

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
)

// fetchedLine is the log line a node writes after fetching a slice from its peers.
var fetchedLine = regexp.MustCompile(`msg="fetched slice" layers=(\S+) bytes=(\d+) slice_bytes=(\d+)`)

// node: three nodes of which only the first holds the model file; the others (one started
// with --model swarm, one with --model NAME, the name the swarm serves it under) fetch and
// check only their slices from it, receive at most 1.05x each slice's tensor bytes, show the
// fetch on /health, and the swarm answers chat with exactly `strata run`'s text under the
// same model ID on every node.
func TestSlicesFetchedFromPeers(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := swarmModel(t)
	bin := testkit.BuildStrata(t)
	t0 := time.Now()
	// Three nodes share the cores (NewSwarm would size threads for the one node it starts).
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 1, Model: model, Args: exactArgs, Threads: max(1, runtime.NumCPU()/3)})
	for _, m := range []string{"swarm", modelID} {
		if _, err := s.Add(context.Background(), "--model", m); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("holder and fetching nodes started in %s", time.Since(t0).Round(time.Millisecond))
	start := time.Now()
	s.MustReady(t, 3, 90*time.Second)
	settled(t, s.Nodes[0], 3, 6)
	t.Logf("swarm ready and settled %s after the fetching nodes started", time.Since(start).Round(time.Millisecond))

	out, err := exec.Command(bin, "run", "--model", model, "--prompt", chatPrompt("hello"), "--max-tokens", "24",
		"--temperature", "0", "--codec", "f16", "--threads", "1").Output()
	if err != nil {
		t.Fatalf("strata run: %v", err)
	}
	want := jsonText(strings.TrimSuffix(string(out), "\n"))
	for _, n := range s.Nodes {
		c := client(n)
		models, err := c.Models.List(context.Background())
		if err != nil || len(models.Data) != 1 || models.Data[0].ID != modelID {
			t.Fatalf("node %d /v1/models: %+v, %v; want the one model %s", n.Index, models, err, modelID)
		}
		p := chatParams("hello", 24)
		p.Model = models.Data[0].ID
		resp, err := c.Chat.Completions.New(context.Background(), p)
		if err != nil {
			t.Fatalf("node %d: %v", n.Index, err)
		}
		if got := resp.Choices[0].Message.Content; got != want {
			t.Fatalf("node %d chat %q, strata run %q", n.Index, got, want)
		}
	}

	t.Logf("chat checked %s after start", time.Since(t0).Round(time.Millisecond))
	holder := mustHealth(t, s.Nodes[0]).PeerID
	// Weights come from nodes that hold them: the holder, or a fetching node that has itself
	// fetched and checked a slice before (a re-plan can hand its layers on: node 1 fetched
	// [0,2) after [2,4) once, part of it from node 2, which had fetched [0,2) first).
	sources := map[string]bool{holder: true}
	fetches := 0
	for _, n := range s.Nodes[1:] {
		h := mustHealth(t, n)
		fetches += len(h.Fetches)
		if slices.ContainsFunc(h.Fetches, func(f node.FetchStatus) bool { return f.Done && f.Verified }) {
			sources[h.PeerID] = true
		}
	}
	for _, n := range s.Nodes[1:] {
		log, err := os.ReadFile(n.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		fetches := fetchedLine.FindAllStringSubmatch(string(log), -1)
		if len(fetches) == 0 {
			t.Fatalf("node %d fetched no slice:%s", n.Index, n.Tail(30))
		}
		for _, f := range fetches {
			got, _ := strconv.ParseInt(f[2], 10, 64)
			slice, _ := strconv.ParseInt(f[3], 10, 64)
			t.Logf("node %d fetched %s: %d tensor bytes for a slice of %d (%.3fx)", n.Index, f[1], got, slice, float64(got)/float64(slice))
			if float64(got) > 1.05*float64(slice) {
				t.Fatalf("node %d received %d bytes for a slice of %d", n.Index, got, slice)
			}
		}
		if strings.Contains(string(log), "dropping weights source") {
			t.Fatalf("node %d dropped an honest source:%s", n.Index, n.Tail(30))
		}
		h := mustHealth(t, n)
		if len(h.Fetches) == 0 {
			t.Fatalf("node %d /health lists no fetch", n.Index)
		}
		for _, f := range h.Fetches {
			var fromPeers int64
			for p, b := range f.Peers {
				if !sources[p] {
					t.Fatalf("node %d /health: %d bytes from %s, which holds no slice", n.Index, b, p)
				}
				fromPeers += b
			}
			if !f.Done || !f.Verified || f.From != "peers" || f.Error != "" || fromPeers != f.TensorBytes || f.TensorBytes != f.SliceBytes {
				t.Fatalf("node %d /health fetch %+v", n.Index, f)
			}
		}
	}
	// The dashboard of any node lists every fetch (one a node, more after a re-plan), each
	// from peers, done and verified.
	if rows, ok := node.DashboardPoll(t, s.Nodes[0].API, "the fetches", `(() => {
		const rows = [...document.querySelectorAll('#fetches tbody tr')].map(r => r.textContent);
		return !document.getElementById('fetches-section').hidden && rows.length === `+strconv.Itoa(fetches)+` &&
			rows.every(r => r.includes('done, verified') && r.includes('peers')) ? rows.join(' | ') : '';
	})()`); ok {
		t.Logf("dashboard: %s", rows)
	}
	for i := len(s.Nodes) - 1; i >= 0; i-- {
		t1 := time.Now()
		err := s.Nodes[i].Stop(30 * time.Second)
		t.Logf("node %d stopped in %s (%v)", i, time.Since(t1).Round(time.Millisecond), err)
	}
}

// mustHealth is nodeHealth (arch_test.go) or the test's end.
func mustHealth(t *testing.T, n *testkit.Node) node.Health {
	t.Helper()
	h, err := nodeHealth(n)
	if err != nil {
		t.Fatalf("node %d /health: %v", n.Index, err)
	}
	return h
}

var (
	hubFetchLine = regexp.MustCompile(`msg="fetched slice from the hub" layers=\S+ bytes=(\d+) slice_bytes=(\d+) header_bytes=(\d+)`)
	hubStartLine = regexp.MustCompile(`msg="reading only this node's slices of the model from the hub".* header_bytes=(\d+)`)
)

// node: with --slices-only and an hf:// model, nodes read the GGUF header and then only their
// slices from the hub with Range requests (the hub server counts what it sends), and the swarm
// answers with exactly `strata run`'s text. A restarted node reads nothing from the hub; once
// a node holding the whole file joins, the others check the hub's header and slices against
// its manifest.
func TestSlicesFromHub(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := swarmModel(t)
	url, served := testkit.ServeHubCounted(t, map[string]string{"owner/repo/resolve/main/tiny.gguf": model})
	bin := testkit.BuildStrata(t)
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 3, Model: "hf://owner/repo/tiny.gguf", Env: []string{"HF_ENDPOINT=" + url},
		Args: append([]string{"--slices-only"}, exactArgs...)})
	s.MustReady(t, 3, 90*time.Second)
	settled(t, s.Nodes[0], 3, 6)

	out, err := exec.Command(bin, "run", "--model", model, "--prompt", chatPrompt("hello"), "--max-tokens", "24",
		"--temperature", "0", "--codec", "f16", "--threads", "1").Output()
	if err != nil {
		t.Fatalf("strata run: %v", err)
	}
	want := jsonText(strings.TrimSuffix(string(out), "\n"))
	c := client(s.Nodes[1])
	p := chatParams("hello", 24)
	p.Model = "tiny"
	resp, err := c.Chat.Completions.New(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Choices[0].Message.Content; got != want {
		t.Fatalf("chat %q, strata run %q", got, want)
	}

	st, _ := os.Stat(model)
	var accounted, tensors int64
	for _, n := range s.Nodes {
		log, err := os.ReadFile(n.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range hubStartLine.FindAllStringSubmatch(string(log), -1) {
			hb, _ := strconv.ParseInt(m[1], 10, 64)
			accounted += hb + 1 // and the one-byte request that names the file's size and sha256
		}
		for _, m := range hubFetchLine.FindAllStringSubmatch(string(log), -1) {
			got, _ := strconv.ParseInt(m[1], 10, 64)
			slice, _ := strconv.ParseInt(m[2], 10, 64)
			hb, _ := strconv.ParseInt(m[3], 10, 64)
			accounted += got + hb
			tensors += got
			t.Logf("node %d read %d tensor bytes for a slice of %d and %d header bytes", n.Index, got, slice, hb)
			if float64(got) > 1.05*float64(slice) {
				t.Fatalf("node %d read %d tensor bytes for a slice of %d", n.Index, got, slice)
			}
		}
	}
	t.Logf("hub served %d bytes in all (%d tensor bytes) for a %d-byte model on 3 nodes", served.Load(), tensors, st.Size())
	if served.Load() != accounted || tensors == 0 {
		t.Fatalf("hub served %d bytes, the nodes account for %d", served.Load(), accounted)
	}

	// A restart needs no network: the header and the slice come from the node's cache. (The
	// other two cannot hold the model without it, so the plan waits for it and gives it back
	// its range.)
	before, t1 := served.Load(), time.Now()
	n2 := s.Nodes[2]
	if err := n2.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := s.Restart(context.Background(), n2); err != nil {
		t.Fatal(err)
	}
	s.MustReady(t, 3, 90*time.Second)
	settled(t, s.Nodes[0], 3, 6)
	log, _ := os.ReadFile(n2.LogPath)
	if !strings.Contains(string(log), "using the model's header cached by an earlier start") ||
		!regexp.MustCompile(`msg="using the cached slice" slice=\S+ from=hub verified=false`).Match(log) {
		t.Fatalf("the restarted node did not use its cached header and slice:%s", n2.Tail(30))
	}
	if got := served.Load() - before; got != 0 {
		t.Fatalf("the restart cost the hub %d bytes", got)
	}
	t.Logf("node 2 restarted from its cache, no hub bytes, swarm settled again in %s", time.Since(t1).Round(time.Millisecond))
	t1 = time.Now()

	// A node holding the whole file joins: the others get the manifest from it and check what
	// they read from the hub alone, the header and their slices.
	if _, err := s.Add(context.Background(), "--model", model, "--slices-only=false"); err != nil {
		t.Fatal(err)
	}
	for _, n := range s.Nodes[:3] {
		waitLog(t, n, "model header read from the hub matches the swarm's manifest")
		waitLog(t, n, "slice read from the hub matches the swarm's manifest")
	}
	t.Logf("a holder joined and the hub nodes checked their header and slices against its manifest in %s", time.Since(t1).Round(time.Millisecond))
	for _, f := range mustHealth(t, s.Nodes[0]).Fetches {
		if f.From == "hub" && (!f.Verified || f.Error != "") {
			t.Fatalf("node 0's hub fetch after the check: %+v", f)
		}
	}
}

// waitLog waits for a line in a node's log (a hang guard, not a timing).
func waitLog(t *testing.T, n *testkit.Node, line string) {
	t.Helper()
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if b, _ := os.ReadFile(n.LogPath); strings.Contains(string(b), line) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %d never logged %q:%s", n.Index, line, n.Tail(30))
		}
	}
}
