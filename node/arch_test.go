package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/api"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// archSwarmFamilies are the families TestArchSwarm serves, one row each: a row is the GGUF
// architecture the synthesizer writes with --arch (its tiny preset, F32 weights), with an
// expert count for llama's Mixtral form.
var archSwarmFamilies = []struct {
	arch    string
	experts int
}{
	{arch: "qwen2"},
	{arch: "qwen3"},
	{arch: "mistral3"},
	{arch: "gemma2"},
	{arch: "gemma3"},
	{arch: "olmo3"},
	{arch: "qwen3moe"},
	{arch: "deepseek2"},
	{arch: "gptoss"},
	{arch: "llama", experts: 8}, // Mixtral
}

// The node defaults the test's memory arithmetic assumes (--context, --max-sessions, an F16
// KV cache), passed explicitly so a change of default cannot skew it.
const archContext, archSessions = 2048, 8

// TestArchSwarm: for each family, three node processes serving its tiny model through the
// official OpenAI client give exactly `strata run`'s text for the family's own chat template,
// and still do when the node serving the middle of the chain is killed -9 mid-stream.
//
// Each node offers the memory of half the model, so the survivors of a kill can always cover
// it again, and the planner splits the model over all three (any layer moved off one node to
// a new one shortens the slowest stage). Whether it does depends on the nodes' measured
// speeds, so the test never assumes the shape: it waits until the swarm sits at the
// planner's fixed point (every node serves what PlanLayers gives for the swarm it reports),
// then kills the middle stage, or the last one when the planner left a node spare.
func TestArchSwarm(t *testing.T) {
	t.Parallel()
	bin := testkit.BuildStrata(t)
	// The rows run in parallel, their in-process generations too: each stage has a CPU
	// backend of its own (engine patch 0005; a shared one gave NaN logits here).
	for _, row := range archSwarmFamilies {
		name := row.arch
		if row.experts > 0 {
			name = fmt.Sprintf("%s-x%d", row.arch, row.experts)
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testArchSwarm(t, bin, row.arch, row.experts)
		})
	}
}

func testArchSwarm(t *testing.T, bin, arch string, experts int) {
	const maxTokens, killAt = 40, 12
	start := time.Now()
	model := testkit.Model(t, testkit.SynthOptions{Arch: arch, Experts: experts, Preset: "tiny", Seed: 1, Type: "f32"})
	info, err := shard.ReadModelInfo(model)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := shard.LoadTokenizer(model)
	if err != nil {
		t.Fatal(err)
	}
	card := pipeline.ModelCard{ChatTemplate: info.ChatTemplate, BOS: tok.BOS, EOS: tok.EOS}
	render := func(user string) string {
		p, err := api.RenderChat(card, []map[string]any{{"role": "user", "content": user}})
		if err != nil && strings.Contains(err.Error(), "Unbalanced parenthesis") {
			// Gemma's template writes (a if b else c) inside an expression, which gonja
			// cannot parse; the api's template rewrite (h-api, api/template_fix.go) makes
			// it render. Until that is merged the row has nothing to test.
			t.Skipf("%s chat template does not parse in gonja without the api's rewrite: %v", arch, err)
		}
		if err != nil {
			t.Fatalf("%s chat template: %v", arch, err)
		}
		return p
	}

	// The stream must outlast the kill: take the first prompt the random model does not end early.
	user, local := func() (string, pipeline.Result) {
		st, err := shard.LoadStage(context.Background(), model, shard.Range{Start: 0, End: info.Layers},
			shard.WithSliceDir(t.TempDir()), shard.WithThreads(1), shard.WithMaxContext(archContext))
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		g := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: []*shard.Stage{st}, Codec: quant.CodecF32})
		var user string
		var local pipeline.Result
		for i := range 20 {
			user = fmt.Sprintf("tell me a story, part %d", i)
			if local, err = g.Generate(context.Background(), pipeline.Request{Prompt: render(user), MaxTokens: maxTokens}, nil); err != nil {
				t.Fatal(err)
			}
			if local.CompletionTokens == maxTokens {
				break
			}
		}
		return user, local
	}()
	if local.CompletionTokens < maxTokens {
		t.Fatalf("no prompt ran %d tokens", maxTokens)
	}
	out, err := exec.Command(bin, "run", "--model", model, "--prompt", render(user), "--max-tokens", fmt.Sprint(maxTokens),
		"--temperature", "0", "--threads", "1").Output()
	if err != nil {
		t.Fatalf("strata run: %v", err)
	}
	want := strings.TrimSuffix(string(out), "\n")
	if want != local.Text {
		t.Fatalf("strata run %q, in-process generation %q", want, local.Text)
	}

	t.Logf("%s: model and `strata run`'s text in %.1fs", arch, time.Since(start).Seconds())
	shape := info.Shape(archContext, archSessions, 2)
	half := shard.Range{Start: 0, End: info.Layers / 2}
	mem := max(shape.RangeBytes(half), shape.RangeBytes(shard.Range{Start: half.End, End: info.Layers}))
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 3, Model: model, Args: []string{
		"--max-memory", fmt.Sprint(mem), "--codec", "f32",
		"--context", fmt.Sprint(archContext), "--max-sessions", fmt.Sprint(archSessions)}})
	byRange := settledPlan(t, s, shape)
	entry, victim := byRange[0], byRange[-1]
	t.Logf("%s: swarm settled at %.1fs: %d stages; entry node %d, victim node %d",
		arch, time.Since(start).Seconds(), len(byRange)-1, entry.Index, victim.Index)

	// /health lists what the node's own layers cost, as the planner budgets them.
	if h, err := nodeHealth(entry); err != nil || h.Range == nil || h.RangeMemory == nil || h.RangeMemory.Range != *h.Range ||
		len(h.RangeMemory.PerLayer) != h.Range.Len() || h.RangeMemory.WeightBytes+h.RangeMemory.KVBytes != shape.RangeBytes(*h.Range) {
		t.Errorf("entry's /health range %v, range memory %+v (%v)", h.Range, h.RangeMemory, err)
	}

	p := chatParams(user, maxTokens)
	p.Model = strings.TrimSuffix(filepath.Base(model), ".gguf")
	got, err := stream(context.Background(), client(entry), p, nil)
	if err != nil || got != jsonText(want) {
		t.Fatalf("stream: %v\n got %q\nwant %q", err, got, want)
	}
	killed, after := false, 0
	got, err = stream(context.Background(), client(entry), p, func(n int) {
		switch {
		case n == killAt:
			victim.Kill()
			killed = true
		case killed:
			after++
		}
	})
	if !killed || after == 0 {
		t.Fatalf("the stream ended before the kill (%d chunks after it; err %v): %q", after, err, got)
	}
	if err != nil {
		t.Fatalf("stream broke after kill -9 of node %d: %v", victim.Index, err)
	}
	if got != jsonText(want) {
		t.Fatalf("stream after kill -9 of node %d:\n got %q\nwant %q", victim.Index, got, want)
	}
	t.Logf("%s: %.1fs in all", arch, time.Since(start).Seconds())
}

// settledPlan waits until every node of s is ready and the swarm is at the planner's fixed
// point in each node's view: every node a member, none loading or moving, and each serving
// exactly the range shard.PlanLayers gives for the memory, speed and ranges the swarm
// reports, which is what every node computes, so no node moves again. It returns the nodes by
// the first layer they serve, and under -1 the one to kill: the middle stage's, or the last
// stage's when the plan has only two.
func settledPlan(t *testing.T, s *testkit.Swarm, shape shard.ModelShape) map[int]*testkit.Node {
	t.Helper()
	var last string
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		byRange, why := planFixedPoint(s, shape)
		if byRange != nil {
			t.Logf("settled: %s", why)
			return byRange
		}
		last = why
	}
	t.Fatalf("the swarm never settled: %s", last)
	return nil
}

func planFixedPoint(s *testkit.Swarm, shape shard.ModelShape) (map[int]*testkit.Node, string) {
	byPeer := map[string]*testkit.Node{}
	var views []node.Health
	for _, n := range s.Nodes {
		h, err := nodeHealth(n)
		if err != nil {
			return nil, fmt.Sprintf("node %d: %v", n.Index, err)
		}
		if !h.Ready {
			return nil, fmt.Sprintf("node %d not ready: %s", n.Index, h.Missing)
		}
		byPeer[h.PeerID] = n
		views = append(views, h)
	}
	byRange := map[int]*testkit.Node{}
	for _, h := range views {
		var caps []shard.NodeCapacity
		for _, p := range h.Peers {
			switch {
			case p.State != "serving" && p.State != "idle":
				return nil, fmt.Sprintf("peer %s is %s", p.PeerID, p.State)
			case p.Next != nil:
				return nil, fmt.Sprintf("peer %s moves to %s", p.PeerID, p.Next)
			}
			c := shard.NodeCapacity{ID: p.PeerID, MemoryBytes: p.Memory, MsPerLayer: float64(p.MsPerLayer), CurrentChain: p.Chain}
			if !p.Range.Empty() {
				c.Current = p.Range
			}
			caps = append(caps, c)
		}
		if len(caps) != len(s.Nodes) {
			return nil, fmt.Sprintf("node %s sees %d of %d members", h.PeerID, len(caps), len(s.Nodes))
		}
		plan, err := shard.PlanLayers(shape, caps)
		if err != nil {
			return nil, fmt.Sprintf("plan: %v", err)
		}
		for _, c := range caps {
			if a, _ := plan.Lookup(c.ID); a.Range != c.Current {
				return nil, fmt.Sprintf("peer %s serves %s, the plan gives it %s", c.ID, c.Current, a.Range)
			}
			if n := byPeer[c.ID]; n != nil && !c.Current.Empty() {
				byRange[c.Current.Start] = n
				if c.Current.Start > 0 && (c.Current.End < shape.Layers || byRange[-1] == nil) {
					byRange[-1] = n
				}
			}
		}
	}
	if byRange[0] == nil || byRange[-1] == nil {
		return nil, "no entry or no victim"
	}
	var peers []string
	for _, p := range views[0].Peers {
		peers = append(peers, fmt.Sprintf("%s %s %.3gms/layer %s", p.PeerID[len(p.PeerID)-6:], p.Range, p.MsPerLayer, shard.HumanBytes(p.Memory)))
	}
	return byRange, strings.Join(peers, "; ")
}

// nodeHealth is n's whole /health.
func nodeHealth(n *testkit.Node) (node.Health, error) {
	var h node.Health
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.API+"/health", nil)
	if err != nil {
		return h, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	return h, json.NewDecoder(resp.Body).Decode(&h)
}
