package node_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
)

// scrapeMetrics reads a node's /metrics with Prometheus's own text parser.
func scrapeMetrics(t *testing.T, api string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + api + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("/metrics: %s %q: %.300s", resp.Status, resp.Header.Get("Content-Type"), b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// metricValue sums a counter's or gauge's series whose labels include want (name=value pairs).
func metricValue(fams map[string]*dto.MetricFamily, name string, want ...string) float64 {
	var sum float64
	for _, m := range matchSeries(fams, name, want) {
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		}
	}
	return sum
}

// histSamples sums a histogram's sample counts (and sums) over its series matching want.
func histSamples(fams map[string]*dto.MetricFamily, name string, want ...string) (uint64, float64) {
	var n uint64
	var s float64
	for _, m := range matchSeries(fams, name, want) {
		n += m.GetHistogram().GetSampleCount()
		s += m.GetHistogram().GetSampleSum()
	}
	return n, s
}

func matchSeries(fams map[string]*dto.MetricFamily, name string, want []string) []*dto.Metric {
	f := fams[name]
	if f == nil {
		return nil
	}
	var out []*dto.Metric
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(want); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == want[i] && l.GetValue() == want[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		out = append(out, m)
	}
	return out
}

type sseUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

// sseChat streams one chat completion with plain HTTP, the way the dashboard does, and
// returns the text, the number of content chunks and the usage.
func sseChat(t *testing.T, api, model, user string, maxTokens int) (string, int, sseUsage) {
	t.Helper()
	text, chunks, usage, err := sseChatEach(api, model, user, maxTokens, nil)
	if err != nil {
		t.Fatal(err)
	}
	return text, chunks, usage
}

// sseChatEach is sseChat calling onChunk after each content chunk (numbered from 1).
func sseChatEach(api, model, user string, maxTokens int, onChunk func(n int)) (string, int, sseUsage, error) {
	body, _ := json.Marshal(map[string]any{
		"model": model, "messages": []map[string]string{{"role": "user", "content": user}},
		"stream": true, "stream_options": map[string]bool{"include_usage": true},
		"max_tokens": maxTokens, "temperature": 0,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+api+"/v1/chat/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", 0, sseUsage{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return "", 0, sseUsage{}, fmt.Errorf("chat: %s: %s", resp.Status, b)
	}
	var text strings.Builder
	var usage sseUsage
	chunks := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var ev struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
			Usage *sseUsage `json:"usage"`
			Error any       `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			return text.String(), chunks, usage, fmt.Errorf("bad SSE event %q: %w", data, err)
		}
		if ev.Error != nil {
			return text.String(), chunks, usage, fmt.Errorf("chat failed mid-stream: %v", ev.Error)
		}
		for _, c := range ev.Choices {
			if c.Delta.Content != "" {
				chunks++
				text.WriteString(c.Delta.Content)
				if onChunk != nil {
					onChunk(chunks)
				}
			}
		}
		if ev.Usage != nil {
			usage = *ev.Usage
		}
	}
	return text.String(), chunks, usage, sc.Err()
}

func fetchJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

// TestMetricsThreeNodeSwarm: a chat through a three-node swarm moves every counter it should,
// on the entry and on each stage, by amounts that agree with each other: each route step
// is one step on each of the three stages and one hop sample per hop, bytes sent are bytes
// received, and /strata/swarm reports the same totals. Then a client leaving mid-stream frees
// its session on every stage.
func TestMetricsThreeNodeSwarm(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	mpath := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: mpath, Args: []string{"--max-memory", "5MiB"}})
	s.MustReady(t, 3, 30*time.Second)
	entry := s.Nodes[0]
	var h node.Health
	fetchJSON(t, "http://"+entry.API+"/health", &h)

	before := scrapeMetrics(t, entry.API)
	for _, name := range []string{"strata_requests_total", "strata_generated_tokens_total", "strata_wire_bytes_total",
		"strata_stage_steps_total", "strata_swarm_ready", "process_resident_memory_bytes", "go_goroutines"} {
		if before[name] == nil {
			t.Errorf("/metrics has no %s before any request", name)
		}
	}
	if v := metricValue(before, "strata_generated_tokens_total"); v != 0 {
		t.Fatalf("tokens generated before any request: %v", v)
	}

	const maxTokens = 24
	text, chunks, usage := sseChat(t, entry.API, h.Model, "Tell me about the swarm.", maxTokens)
	if usage.CompletionTokens == 0 || chunks == 0 {
		t.Fatalf("no answer: %d tokens, %d chunks, %q", usage.CompletionTokens, chunks, text)
	}

	fams := scrapeMetrics(t, entry.API)
	check := func(what string, got, want float64) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %v, want %v", what, got, want)
		}
	}
	check("requests ok", metricValue(fams, "strata_requests_total", "outcome", "ok"), 1)
	check("requests failed", metricValue(fams, "strata_requests_total", "outcome", "error"), 0)
	check("active generations", metricValue(fams, "strata_active_generations"), 0)
	check("tokens generated", metricValue(fams, "strata_generated_tokens_total"), float64(usage.CompletionTokens))
	check("prompt tokens", metricValue(fams, "strata_prompt_tokens_total"), float64(usage.PromptTokens))
	ttftN, ttft := histSamples(fams, "strata_time_to_first_token_seconds")
	check("TTFT samples", float64(ttftN), 1)
	prefillN, prefill := histSamples(fams, "strata_route_step_seconds", "phase", "prefill")
	decodeN, decode := histSamples(fams, "strata_route_step_seconds", "phase", "decode")
	if prefillN == 0 {
		t.Errorf("no prefill step observed")
	}
	// The first token comes from the prefill; every later one from a decode step.
	check("decode steps", float64(decodeN), float64(usage.CompletionTokens-1))
	steps := prefillN + decodeN

	// The route is entry -> stage 0 -> stage 1 -> stage 2. The entry observes its first hop,
	// stages 0 and 1 the hop after them: three hop samples per step, one step on each stage.
	var hopN uint64
	var wireIn, wireOut, stageSteps, opened, layers float64
	perHop := map[string]string{}
	for _, n := range s.Nodes {
		f := scrapeMetrics(t, n.API)
		if n == entry {
			f = fams
		}
		hn, _ := histSamples(f, "strata_hop_step_seconds")
		hopN += hn
		for _, m := range f["strata_hop_step_seconds"].GetMetric() {
			c := m.GetHistogram().GetSampleCount()
			perHop[fmt.Sprintf("node%d->%s", n.Index, shortPeer(m.GetLabel()[0].GetValue()))] = fmt.Sprintf("%d steps, mean %.2f ms", c, 1000*m.GetHistogram().GetSampleSum()/float64(max(c, 1)))
		}
		wireIn += metricValue(f, "strata_wire_bytes_total", "direction", "in")
		wireOut += metricValue(f, "strata_wire_bytes_total", "direction", "out")
		stageSteps += metricValue(f, "strata_stage_steps_total")
		opened += metricValue(f, "strata_stage_sessions_opened_total")
		layers += metricValue(f, "strata_layers_served")
		check(fmt.Sprintf("node %d ready", n.Index), metricValue(f, "strata_swarm_ready"), 1)
		if r := metricValue(f, "strata_stage_refused_total"); r != 0 {
			t.Errorf("node %d refused %v frames: %v", n.Index, r, f["strata_stage_refused_total"])
		}
	}
	// Each stage counted every decode step it ran for its speed estimate (speed.go): timed
	// alone, batched, or run while its view of the swarm was still moving; and its estimate
	// started from its self-benchmark.
	for _, n := range s.Nodes {
		var nh node.Health
		fetchJSON(t, "http://"+n.API+"/health", &nh)
		if sp := nh.Speed; sp == nil || sp.Steps+sp.Batched+sp.Skipped != decodeN || sp.StartMs <= 0 || sp.AnnouncedMs <= 0 {
			t.Errorf("node %d's speed %+v: want its %d decode steps timed and a self-benchmark", n.Index, sp, decodeN)
		}
	}
	check("hop latency samples", float64(hopN), float64(3*steps))
	check("steps served by the stages", stageSteps, float64(3*steps))
	check("stage sessions opened", opened, 3)
	check("layers served", layers, 6)
	if wireIn == 0 || wireOut == 0 {
		t.Errorf("bytes on the wire: in %v, out %v; want both > 0", wireIn, wireOut)
	}
	if wireIn != wireOut {
		t.Errorf("bytes on the wire: the swarm read %v and wrote %v", wireIn, wireOut)
	}

	// Stage sessions close as the route closes, possibly a moment after the answer ended.
	deadline := time.Now().Add(30 * time.Second) // a hang guard
	for {
		open := 0.0
		for _, n := range s.Nodes {
			open += metricValue(scrapeMetrics(t, n.API), "strata_stage_sessions")
		}
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v stage sessions still open after the answer", open)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The dashboard's JSON agrees with /metrics and reaches every node.
	// The entry fetches each peer's counters with a short timeout, which a loaded machine can
	// miss (seen at load average 40): the peer is then listed unreachable for that view, so
	// ask again until a view reaches all three; the deadline is a hang guard.
	var v node.SwarmView
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		v = node.SwarmView{}
		fetchJSON(t, "http://"+entry.API+"/strata/swarm", &v)
		if len(v.Nodes) == 3 && len(v.Unreachable) == 0 && len(v.Health.Peers) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/strata/swarm: %d nodes with counters, unreachable %v, %d peers", len(v.Nodes), v.Unreachable, len(v.Health.Peers))
		}
	}
	if es := v.Nodes[h.PeerID]; es == nil || es.Tokens != float64(usage.CompletionTokens) || es.TTFTCount != 1 {
		t.Errorf("/strata/swarm entry counters: %+v", es)
	}
	var total float64
	for _, ns := range v.Nodes {
		total += ns.StageSteps
	}
	check("/strata/swarm steps served", total, float64(3*steps))

	t.Logf("%d prompt + %d completion tokens in %d chunks; TTFT %.1f ms; prefill step %.1f ms (%d); decode step mean %.2f ms (%d)",
		usage.PromptTokens, usage.CompletionTokens, chunks, 1000*ttft, 1000*prefill/float64(prefillN), prefillN,
		1000*decode/float64(max(decodeN, 1)), decodeN)
	t.Logf("hop step round trips: %v", perHop)
	t.Logf("stage bytes on the wire: %.0f (%.0f per route step)", wireOut, wireOut/float64(steps))

	// On the same swarm (it was TestDisconnectFreesEveryStage, with a swarm of its own): a
	// client that goes away mid-stream cancels its session on every stage, so no stage keeps
	// KV cache for an answer nobody reads.
	live := func() int {
		total := 0
		for _, n := range s.Nodes {
			h, err := n.Health(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range h.Peers {
				if p.Self {
					total += p.Sessions
				}
			}
		}
		return total
	}
	ctx, cancel := context.WithCancel(context.Background())
	sawLive := 0
	_, _ = stream(ctx, client(entry), chatParams("tell me everything", 1500), func(n int) {
		if n == 20 {
			sawLive = live()
			cancel()
		}
	})
	if sawLive != 3 {
		t.Fatalf("mid-stream, the stages held %d sessions, want 3", sawLive)
	}
	deadline = time.Now().Add(30 * time.Second) // a hang guard
	for live() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("30 s after the client left, the stages still hold %d sessions", live())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func shortPeer(id string) string { return id[max(0, len(id)-6):] }
