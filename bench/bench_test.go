package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// model70b is the 70b preset's shape as q4_0 (the sizes `strata model info` prints for a
// synthesized one), without a file.
func model70b(layers int) *shard.ModelInfo {
	info := &shard.ModelInfo{Layers: layers, Hidden: 8192, Heads: 64, KVHeads: 8, HeadDim: 128, Vocab: 128256,
		EmbedBytes: 591_003_648, HeadBytes: 591_036_416}
	for range layers {
		info.LayerBytes = append(info.LayerBytes, 481_427_456)
	}
	return info
}

func TestNodeMemoryForcesOneChain(t *testing.T) {
	info := model70b(4)
	mem, ranges, err := NodeMemory(info, 3, 256, 8)
	if err != nil {
		t.Fatal(err)
	}
	shape := Shape(info, 256, 8)
	// Embeddings and head outweigh a layer: the ends hold one layer each, the middle two.
	want := []shard.Range{{Start: 0, End: 1}, {Start: 1, End: 3}, {Start: 3, End: 4}}
	if !slices.Equal(ranges, want) {
		t.Fatalf("ranges %v, want %v", ranges, want)
	}
	if wantMem := shape.HeadBytes + shape.LayerCost(); mem != wantMem {
		t.Fatalf("memory %d, want the head and one layer with its KV cache, %d", mem, wantMem)
	}
	t.Logf("70b, 4 layers, 3 nodes: --max-memory %s, ranges %v", shard.HumanBytes(mem), ranges)

	for _, tc := range []struct{ layers, nodes int }{{4, 1}, {4, 2}, {4, 4}, {80, 3}, {80, 8}, {6, 3}, {7, 5}} {
		info := model70b(tc.layers)
		mem, ranges, err := NodeMemory(info, tc.nodes, 256, 8)
		if err != nil {
			t.Fatalf("%d layers, %d nodes: %v", tc.layers, tc.nodes, err)
		}
		if len(ranges) != tc.nodes || ranges[0].Start != 0 || ranges[len(ranges)-1].End != tc.layers {
			t.Fatalf("%d layers, %d nodes: ranges %v", tc.layers, tc.nodes, ranges)
		}
		for i := 1; i < len(ranges); i++ {
			if ranges[i].Start != ranges[i-1].End {
				t.Fatalf("%d layers, %d nodes: ranges %v do not chain", tc.layers, tc.nodes, ranges)
			}
		}
		// Any less memory and the same nodes no longer form one full chain of them all.
		nodes := make([]shard.NodeCapacity, tc.nodes)
		for i := range nodes {
			nodes[i] = shard.NodeCapacity{ID: fmt.Sprint(i), MemoryBytes: mem - 1, MsPerLayer: 1}
		}
		if plan, err := shard.PlanLayers(Shape(info, 256, 8), nodes); err == nil && plan.Replicas == 1 && len(plan.Chains()[0]) == tc.nodes {
			t.Fatalf("%d layers, %d nodes: %d bytes is not the least memory that works", tc.layers, tc.nodes, mem)
		}
	}
	if _, _, err := NodeMemory(model70b(2), 3, 256, 8); err == nil {
		t.Fatal("3 nodes over 2 layers accepted")
	}
}

func TestPromptsHaveExactTokenCounts(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{2, 7, 32, 128} {
		ps, err := Prompts(tok, n, 8)
		if err != nil {
			t.Fatalf("%d tokens: %v", n, err)
		}
		seen := map[string]bool{}
		for _, p := range ps {
			ids, err := tok.Encode(p, true)
			if err != nil {
				t.Fatal(err)
			}
			if len(ids) != n {
				t.Fatalf("prompt %q is %d tokens, want %d", p, len(ids), n)
			}
			if seen[p] && n >= 16 {
				t.Fatalf("prompt %q repeated", p)
			}
			seen[p] = true
		}
	}
	if _, err := Prompts(tok, 1, 1); err == nil {
		t.Fatal("a 1-token prompt accepted")
	}
}

func TestParseCounter(t *testing.T) {
	text := `# HELP strata_wire_bytes_total Stage protocol bytes.
# TYPE strata_wire_bytes_total counter
strata_wire_bytes_total{direction="in"} 1234
strata_wire_bytes_total{direction="out"} 5.5e+06
strata_requests_total{outcome="ok"} 3
`
	v, err := parseCounters(strings.NewReader(text), []string{`strata_wire_bytes_total{direction="out"}`, `strata_requests_total{outcome="ok"}`})
	if err != nil || v[0] != 5.5e6 || v[1] != 3 {
		t.Fatalf("got %v, %v", v, err)
	}
	if _, err := parseCounters(strings.NewReader(text), []string{"strata_requests_total", "strata_missing_total"}); err == nil {
		t.Fatal("a missing series was found")
	}
}

func TestProcReadings(t *testing.T) {
	m, err := ReadProcMemory("self")
	if err != nil {
		t.Skip("no /proc:", err)
	}
	if m.Peak < m.RSS || m.RSS <= 0 {
		t.Fatalf("peak %d, rss %d", m.Peak, m.RSS)
	}
	if _, err := WrittenBytes("self"); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadProcMemory("999999999"); err == nil {
		t.Fatal("a missing process was read")
	}
	if bw := CopyBandwidth(8<<20, 2); bw <= 0 {
		t.Fatalf("bandwidth %v", bw)
	}
}

func TestLevelSummary(t *testing.T) {
	l := &Level{Concurrency: 2, WireBytes: 3000, Streams: []Stream{
		{PromptTokens: 10, CompletionTokens: 11, TTFT: time.Second, Total: 2 * time.Second},
		{PromptTokens: 10, CompletionTokens: 11, TTFT: 2 * time.Second, Total: 4 * time.Second},
	}}
	l.summarize(1e9, 10e9)
	check := func(name string, got, want float64) {
		t.Helper()
		if d := got - want; d > 1e-9 || d < -1e-9 {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	check("prefill", l.PrefillRate, 20.0/2)    // 20 prompt tokens by the last first token
	check("decode", l.DecodeRate, 10.0+10.0/2) // 10 tokens in 1 s plus 10 in 2 s
	check("per stream", l.PerStream, 15.0/2)   //
	check("limit", l.Limit, 2*10e9/1e9)        // two streams per weight pass
	check("wire", l.WirePerToken, 3000.0/42)   //
	check("ttft", l.TTFTMean, 1.5)             //
}

// TestRunTiny runs the whole benchmark on the tiny model: a whole-model baseline, a 2-node
// swarm and a run with 10 ms injected, all through the real binary and the OpenAI API.
func TestRunTiny(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	if testing.Short() {
		t.Skip("starts node processes")
	}
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
	dir := t.TempDir()
	var progress bytes.Buffer
	rep, err := Run(context.Background(), Config{
		Model: path, Nodes: 2, Concurrency: []int{2, 1}, Tokens: 8, PromptTokens: 16, Codec: quant.CodecF32,
		Latency: 10 * time.Millisecond, Cores: 2, WholeAll: true, Paired: 2, DataDir: dir, Binary: testkit.BuildStrata(t), Progress: &progress,
	})
	t.Log("\n" + progress.String())
	if err != nil {
		t.Fatal(err)
	}
	var md bytes.Buffer
	rep.Markdown(&md)
	t.Log("\n" + md.String())
	if err := rep.WriteJSON(filepath.Join(dir, "bench.json")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "bench.json")); err != nil || !bytes.Contains(b, []byte(`"decode_tok_s"`)) {
		t.Fatalf("JSON report: %v %.200s", err, b)
	}
	if len(rep.Runs) != 3 {
		t.Fatalf("%d runs, want whole, swarm and swarm with latency", len(rep.Runs))
	}
	whole, swarm, slow := rep.Runs[0], rep.Runs[1], rep.Runs[2]
	if whole.Swarm || !swarm.Swarm || !slow.Swarm || slow.Latency != 0.01 {
		t.Fatalf("runs in the wrong order: %+v", rep.Runs)
	}
	if len(whole.Levels) != 2 || len(swarm.Levels) != 2 || len(slow.Levels) != 1 {
		t.Fatalf("levels: whole %d, swarm %d, latency %d", len(whole.Levels), len(swarm.Levels), len(slow.Levels))
	}
	for _, r := range rep.Runs {
		for _, l := range r.Levels {
			if l.PromptTokens != 16*l.Concurrency || l.DecodeRate <= 0 || l.PrefillRate <= 0 {
				t.Fatalf("%s, %d streams: %+v", r.Name, l.Concurrency, l)
			}
		}
	}
	// f32 on the wire: a lone stream's greedy text through the swarm is the whole model's.
	// Concurrent streams are only logged: sessions share a stage's KV cache, whose cells
	// interleave as the timing falls, and that changes attention's summation order.
	for _, l := range swarm.Levels {
		switch {
		case l.Concurrency == 1 && l.SameAsWhole != 1:
			t.Errorf("1 stream: its text differs from the whole model's")
		case l.SameAsWhole != l.Concurrency:
			t.Logf("%d concurrent streams: %d texts equal the whole model's", l.Concurrency, l.SameAsWhole)
		}
		if l.WirePerToken <= 0 {
			t.Errorf("%d streams: no bytes on the wire counted", l.Concurrency)
		}
	}
	// Where the time went: every stage's compute loop, read from the nodes' /metrics.
	for _, r := range []*RunResult{whole, swarm} {
		for _, l := range r.Levels {
			if len(l.Stages) != r.Nodes {
				t.Fatalf("%s, %d streams: %d stage timings, want %d", r.Name, l.Concurrency, len(l.Stages), r.Nodes)
			}
			for _, st := range l.Stages {
				if st.DecodeBatches <= 0 || st.DecodeSteps < st.DecodeBatches || st.DecodeCompute <= 0 || st.Compute < st.DecodeCompute {
					t.Errorf("%s, %d streams, %s: %+v", r.Name, l.Concurrency, st.Name, st)
				}
			}
		}
	}
	if one := swarm.level(1); len(one.Paired) != 2 || one.Paired[0].Whole <= 0 || one.Paired[1].Swarm <= 0 {
		t.Errorf("paired rounds %+v, want 2 with both speeds", one.Paired)
	}
	if swarm.Links < 2 || len(swarm.Memory) != 2 || len(whole.Memory) != 1 {
		t.Fatalf("links %d, memory rows %d and %d", swarm.Links, len(swarm.Memory), len(whole.Memory))
	}
	for _, p := range swarm.Memory {
		if p.Peak <= 0 || p.Weights <= 0 || p.Range.Empty() {
			t.Fatalf("memory row %+v", p)
		}
	}
	// Each decode step waits Links x 10 ms at least.
	if s := slow.Levels[0]; s.PerStream > 1/(float64(swarm.Links)*0.01) {
		t.Errorf("with 10 ms per link, %d links: %.1f tok/s", swarm.Links, s.PerStream)
	}
	// Five targets always; a sixth (decode while every stream decodes) only when the streams'
	// decode phases overlapped, which depends on the machine's speed and load.
	want := 5
	if top := swarm.Levels[len(swarm.Levels)-1]; top.SteadyDecode > 0 {
		want = 6
	}
	if len(rep.Targets) != want {
		var names []string
		for _, tg := range rep.Targets {
			names = append(names, tg.Name)
		}
		t.Errorf("%d targets reported, want %d: %q", len(rep.Targets), want, names)
	}
	if !strings.Contains(md.String(), "| run | streams |") {
		t.Error("no table in the markdown")
	}
}

func TestConfigRefusals(t *testing.T) {
	for _, c := range []Config{
		{Nodes: -1},
		{Tokens: 1},
		{Concurrency: []int{0}},
		{Latency: -time.Second},
		{API: "127.0.0.1:1"},
	} {
		c.DataDir, c.Binary = t.TempDir(), "strata"
		if _, err := Run(context.Background(), c); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}

// TestSteadyDecode: only the chunks produced while every stream decodes count, over that window.
func TestSteadyDecode(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	streams := []Stream{
		// decodes from 1 s; the other stream's prefill ends at 2 s; this one ends at 4 s
		{TTFT: time.Second, Total: 4 * time.Second, Chunks: ms(1000, 1500, 2100, 2600, 3100, 3600, 4000)},
		{TTFT: 2 * time.Second, Total: 5 * time.Second, Chunks: ms(2000, 2500, 3000, 3500, 4000, 4500, 5000)},
	}
	// window (2 s, 4 s]: 5 chunks of the first stream, 4 of the second
	if got := steadyDecode(streams); got != 9.0/2 {
		t.Fatalf("steady decode %v, want 4.5", got)
	}
	streams[0].Total = 2500 * time.Millisecond // overlap under a second: no measurement
	if got := steadyDecode(streams); got != 0 {
		t.Fatalf("short window gave %v", got)
	}
}

// TestTargetsSayWhyTheyMiss: a missed goal says by how much and where the step's time went,
// from the levels' stage timings; the batching goal's single stream is the median of every
// single-stream measurement of the swarm.
func TestTargetsSayWhyTheyMiss(t *testing.T) {
	stage := func(batches, steps, compute float64) StageTime {
		return StageTime{DecodeBatches: batches, DecodeSteps: steps, DecodeCompute: compute}
	}
	whole := &RunResult{Name: "whole", Levels: []*Level{
		{Concurrency: 1, DecodeRate: 10, Stages: []StageTime{stage(64, 64, 6.08)}},                  // 95 ms of 100
		{Concurrency: 8, DecodeRate: 20, SteadyDecode: 24, Stages: []StageTime{stage(10, 80, 2.4)}}, // 30 ms a token
	}}
	swarm := &RunResult{Name: "swarm", Swarm: true, Nodes: 3, Levels: []*Level{
		{Concurrency: 1, DecodeRate: 8, OtherCores: 0.5, // 125 ms: 120 in the stages, 5 outside
			Stages: []StageTime{stage(64, 64, 2.56), stage(64, 64, 2.56), stage(64, 64, 2.56)},
			Paired: []PairedRound{{Whole: 10, Swarm: 8.2}, {Whole: 10, Swarm: 8}, {Whole: 10, Swarm: 7.9}}},
		{Concurrency: 8, DecodeRate: 14, SteadyDecode: 16, PromptTokens: 1024, PrefillRate: 60,
			Stages: []StageTime{stage(10, 60, 1.5), stage(10, 60, 1.5), stage(10, 60, 1.5)}}, // 25 ms a token each
	}}
	rep := &Report{Runs: []*RunResult{whole, swarm}}
	rep.evaluate()
	want := map[string][]string{
		"3-node split decode vs whole, 1 stream": {"0.80x, median of 3", "missed by 11%", "computed 120.0 ms a token against the whole model's 95.0 (1.26x)",
			"5.0 ms a token went outside them", "other processes kept 0.50 cores"},
		"swarm: 8 streams vs 1, aggregate decode": {"1.75x (14.00 vs 8.00 tok/s, 1 stream the median of the swarm's 4", "missed by 27%", "1024 prompt tokens at 60.0 tok/s"},
		"swarm: 8 streams vs 1, decode while all 8 decode (no prefill between)": {"2.00x (16.00 vs 8.00", "missed by 17%",
			"from 120.0 ms for one stream to 75.0 ms (1.60x), in batches of 6.0/6.0/6.0 steps of 8", "the whole model's: 95.0 to 30.0 ms, 3.17x", "5.0 ms a token outside"},
	}
	for _, tg := range rep.Targets {
		t.Log(tg.Detail)
		for _, w := range want[tg.Name] {
			if !strings.Contains(tg.Detail, w) {
				t.Errorf("%s: %q lacks %q", tg.Name, tg.Detail, w)
			}
		}
		if _, ok := want[tg.Name]; ok && tg.Met {
			t.Errorf("%s: met at %v", tg.Name, tg.Value)
		}
		delete(want, tg.Name)
	}
	for name := range want {
		t.Errorf("no target %q", name)
	}
}

// TestBaselineBinary: --whole-only --baseline-binary measures the whole model with this build
// and with another binary (here the same one) and reports the two ratios issue 20 set.
func TestBaselineBinary(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	if testing.Short() {
		t.Skip("starts a strata process")
	}
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
	var progress bytes.Buffer
	rep, err := Run(context.Background(), Config{
		Model: path, Concurrency: []int{1}, Tokens: 4, PromptTokens: 8, Cores: 2, WholeOnly: true,
		BaselineBinary: testkit.BuildStrata(t), BaselineFirst: true, Paired: 2, DataDir: t.TempDir(), Progress: &progress,
	})
	t.Log("\n" + progress.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Runs) != 2 || !rep.Runs[0].Baseline || rep.Runs[1].Baseline || rep.Runs[1].Swarm {
		t.Fatalf("want the baseline binary's whole run, then this build's: %+v", rep.Runs)
	}
	if rep.Runs[1].Weights == "" || rep.Runs[0].Weights == "" {
		t.Errorf("runs do not name their weights' buffer types: %q, %q", rep.Runs[0].Weights, rep.Runs[1].Weights)
	}
	if len(rep.Targets) != 2 || rep.Targets[0].Value <= 0 || rep.Targets[1].Value <= 0 {
		t.Fatalf("targets %+v, want decode and prefill ratios", rep.Targets)
	}
	// The ratios are the medians of rounds taken in turn, this build's whole model kept loaded.
	rounds := rep.Runs[1].level(1).BaselineRounds
	if len(rounds) != 2 || !strings.Contains(rep.Targets[0].Detail, "median of 2 rounds in turn") {
		t.Fatalf("baseline rounds %+v, decode target %q: want 2 rounds and their median", rounds, rep.Targets[0].Detail)
	}
	for _, r := range rounds {
		if r.Decode <= 0 || r.Prefill <= 0 || r.BaselineDecode <= 0 || r.BaselinePrefill <= 0 {
			t.Fatalf("round %+v lacks a speed", r)
		}
	}
}
