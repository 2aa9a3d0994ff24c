package node_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

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

// TestSwarmPlansHealsAndGrows: three node processes join through --join and split the model
// so that every layer is served; a fourth joining takes layers without a gap in coverage;
// after kill -9 of one, the others re-plan within 5 s and are ready again.
func TestSwarmPlansHealsAndGrows(t *testing.T) {
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", twoLayers}})
	s.MustReady(t, 3, 30*time.Second)
	rs, _ := coverage(t, s.Nodes[1])
	if !covers(rs, 6) || len(rs) != 3 {
		t.Fatalf("three nodes serve %v, want three ranges covering 6 layers", rs)
	}
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
	s.MustReady(t, 4, 30*time.Second)
	time.Sleep(time.Second) // let the planner settle
	close(stop)
	for g := range gaps {
		t.Errorf("coverage gap while a node joined: %s", g)
	}
	rs, _ = coverage(t, s.Nodes[0])
	t.Logf("4 nodes: %v", rs)
	if !covers(rs, 6) {
		t.Fatalf("after a join: %v", rs)
	}

	// kill -9 one node: the other three re-plan and serve everything again.
	victim := s.Nodes[2]
	start := time.Now()
	victim.Kill()
	deadline := time.Now().Add(5 * time.Second)
	for {
		rs, h := coverage(t, s.Nodes[0])
		if h.Ready && len(h.Peers) == 3 && covers(rs, 6) {
			t.Logf("ready again %s after kill -9: %v", time.Since(start).Round(10*time.Millisecond), rs)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready 5 s after kill -9: peers %d, ranges %v, missing %q", len(h.Peers), rs, h.Missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSwarmSaysWhatIsMissing: when the survivors cannot hold the model, /health says how much
// memory is missing instead of pretending.
func TestSwarmSaysWhatIsMissing(t *testing.T) {
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", twoLayers}})
	s.MustReady(t, 3, 30*time.Second)
	s.Nodes[1].Kill()
	deadline := time.Now().Add(5 * time.Second)
	for {
		h, err := s.Nodes[0].Health(context.Background())
		if err == nil && !h.Ready && strings.Contains(h.Missing, "memory") {
			t.Logf("after kill -9: %s", h.Missing)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("5 s after kill -9: ready=%v missing=%q err=%v", h.Ready, h.Missing, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
