package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/strata-llm/strata/shard"
)

// Report is everything one benchmark measured.
type Report struct {
	Started  time.Time    `json:"started"`
	Elapsed  float64      `json:"elapsed_s"`
	Machine  Machine      `json:"machine"`
	Model    ModelSummary `json:"model"`
	Settings Settings     `json:"settings"`
	Runs     []*RunResult `json:"runs"`
	Targets  []Target     `json:"targets"`
	Notes    []string     `json:"notes,omitempty"`
}

// ModelSummary is the model measured.
type ModelSummary struct {
	Path   string `json:"path"`
	Name   string `json:"name"`
	Type   string `json:"type"`
	Layers int    `json:"layers"`
	Hidden int    `json:"hidden"`
	Vocab  int    `json:"vocab"`
	Bytes  int64  `json:"weight_bytes"`
	// Mixture of experts: experts per layer and per token, and whether --experts set the
	// count below the real model's (each expert keeps its real size).
	Experts         int  `json:"experts,omitempty"`
	ExpertsUsed     int  `json:"experts_used,omitempty"`
	ExpertsOverride bool `json:"experts_override,omitempty"`
	// DecodeBytes is what one decode step reads: every layer (of a MoE layer, the experts one
	// token uses) and the LM head (the embedding lookup reads one row).
	DecodeBytes int64 `json:"decode_read_bytes"`
}

// Settings are the knobs the runs shared.
type Settings struct {
	Nodes           int           `json:"nodes"`
	Concurrency     []int         `json:"concurrency"`
	Codec           string        `json:"codec"`
	Tokens          int           `json:"tokens"`
	PromptTokens    int           `json:"prompt_tokens"`
	Context         int           `json:"context"`
	Sessions        int           `json:"sessions"`
	NodeMemory      int64         `json:"node_max_memory_bytes"`
	Ranges          []shard.Range `json:"planned_ranges"`
	ThreadsPerNode  int           `json:"threads_per_node"`
	WholeThreads    int           `json:"whole_threads"`
	Latency         float64       `json:"injected_latency_s"`
	Bandwidth       float64       `json:"injected_bandwidth_bytes_per_s"`
	HopPayloadBytes int           `json:"hop_payload_bytes_per_token"` // one token's activations on one hop, in the codec
}

// RunResult is one system measured at every concurrency: the whole model, or a swarm.
type RunResult struct {
	Name    string  `json:"name"`
	Swarm   bool    `json:"swarm"`
	Nodes   int     `json:"nodes"`
	Threads int     `json:"threads"` // per process
	Links   int     `json:"links"`   // network crossings of one decode step (there and back)
	Latency float64 `json:"injected_latency_s"`
	// Baseline marks the whole model measured by --baseline-binary (another build of strata,
	// e.g. one with the unpatched engine), for the ratio of this build to that one.
	Baseline bool `json:"baseline_binary,omitempty"`
	// Weights names the ggml buffer types the whole model's weights landed in.
	Weights string          `json:"weights,omitempty"`
	Levels  []*Level        `json:"levels"`
	Memory  []ProcessMemory `json:"memory"`
}

// Level is one concurrency of one run.
type Level struct {
	Concurrency      int      `json:"concurrency"`
	Streams          []Stream `json:"streams"`
	PromptTokens     int      `json:"prompt_tokens"`
	CompletionTokens int      `json:"completion_tokens"`
	Wall             float64  `json:"wall_s"`
	TTFTMean         float64  `json:"ttft_mean_s"`
	TTFTMax          float64  `json:"ttft_max_s"`
	// PrefillRate is every stream's prompt tokens over the time until the last first token.
	PrefillRate float64 `json:"prefill_tok_s"`
	// DecodeRate is the aggregate decode speed: the sum of each stream's tokens after its
	// first over the time after it.
	DecodeRate float64 `json:"decode_tok_s"`
	// SteadyDecode is the aggregate decode speed while every stream decodes: the tokens all
	// streams produced after the last first token and before the first stream ended, over
	// that window; 0 when the window is under a second. DecodeRate also counts the time a
	// stream's decode waits behind the other streams' prefills; this does not.
	SteadyDecode float64 `json:"steady_decode_tok_s"`
	// PerStream is the mean of each stream's decode speed.
	PerStream float64 `json:"decode_tok_s_per_stream"`
	// Limit is the decode speed memory bandwidth allows: concurrency x copy bandwidth /
	// bytes read per step (a batched step reads the weights once for every stream).
	Limit float64 `json:"limit_tok_s"`
	// WireBytes is what every node sent during the level (WireSource says how it was
	// counted); WirePerToken divides it by the tokens processed (prompt and completion).
	WireBytes    float64 `json:"wire_bytes"`
	WireSource   string  `json:"wire_source,omitempty"`
	WirePerToken float64 `json:"wire_bytes_per_token"`
	SameAsWhole  int     `json:"same_text_as_whole"` // streams whose text equals the whole model's; -1: not compared
	// OtherCores is how many cores other processes kept busy meanwhile: on a shared machine
	// they slow multi-threaded ggml down far more than their share (its threads spin at barriers).
	OtherCores float64 `json:"other_processes_cores"`
	// Stages is where each stage's compute loop spent the level's time, in pipeline order.
	Stages []StageTime `json:"stages,omitempty"`
	// Paired are single-stream rounds of the whole model and this swarm taken in turn
	// (Config.Paired), decode tok/s each.
	Paired []PairedRound `json:"paired,omitempty"`
	// BaselineRounds are single streams on this build's whole model and the baseline binary's
	// taken in turn (Config.Paired with BaselineBinary).
	BaselineRounds []BaselineRound `json:"baseline_rounds,omitempty"`
}

// BaselineRound is one stream on this build's whole model and one on the baseline binary's,
// back to back, tok/s each.
type BaselineRound struct {
	Decode          float64 `json:"decode_tok_s"`
	Prefill         float64 `json:"prefill_tok_s"`
	BaselineDecode  float64 `json:"baseline_decode_tok_s"`
	BaselinePrefill float64 `json:"baseline_prefill_tok_s"`
}

// baselineRatios are the medians over the rounds of this build's decode and prefill speeds
// against the baseline's, with the rounds as text; ok is false without rounds.
func (l *Level) baselineRatios() (decode, prefill float64, detail string, ok bool) {
	var ds, ps []float64
	var parts []string
	for _, r := range l.BaselineRounds {
		if r.BaselineDecode > 0 && r.BaselinePrefill > 0 {
			ds = append(ds, r.Decode/r.BaselineDecode)
			ps = append(ps, r.Prefill/r.BaselinePrefill)
			parts = append(parts, fmt.Sprintf("%.2f/%.2f, %.1f/%.1f", r.Decode, r.BaselineDecode, r.Prefill, r.BaselinePrefill))
		}
	}
	if len(ds) == 0 {
		return 0, 0, "", false
	}
	return median(ds), median(ps), strings.Join(parts, "; "), true
}

// median is the middle of v, the mean of the middle two for an even count.
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// PairedRound is one stream on the whole model and one on the swarm, back to back.
type PairedRound struct {
	Whole float64 `json:"whole_decode_tok_s"`
	Swarm float64 `json:"swarm_decode_tok_s"`
}

// pairedRatio is the median over the rounds of the swarm's decode speed against the whole
// model's; ok is false without rounds.
func (l *Level) pairedRatio() (ratio float64, detail string, ok bool) {
	var rs []float64
	var parts []string
	for _, r := range l.Paired {
		if r.Whole > 0 {
			rs = append(rs, r.Swarm/r.Whole)
			parts = append(parts, fmt.Sprintf("%.2f/%.2f", r.Swarm, r.Whole))
		}
	}
	if len(rs) == 0 {
		return 0, "", false
	}
	return median(rs), strings.Join(parts, ", "), true
}

// ProcessMemory is one process's peak memory against what its slice should need.
type ProcessMemory struct {
	Name      string      `json:"name"`
	PID       int         `json:"pid"`
	Range     shard.Range `json:"range"`
	Weights   int64       `json:"weight_bytes"`
	KV        int64       `json:"kv_bytes"`
	LoadPeak  int64       `json:"load_peak_rss_bytes"` // peak until the stage was loaded (cutting the slice included)
	Peak      int64       `json:"peak_rss_bytes"`      // peak while serving the benchmark
	Budget    int64       `json:"budget_bytes"`        // weights + KV + overhead allowance
	Ratio     float64     `json:"peak_over_budget"`
	LoadRatio float64     `json:"load_peak_over_budget"`
	// GoSys is the memory the Go runtime holds from the OS at the end (the rest of the RSS is
	// ggml's: weights, KV cache, compute buffers).
	GoSys int64 `json:"go_runtime_bytes"`
}

// RuntimeOverhead is the allowance for everything but weights and KV cache in a node's
// memory target: the Go runtime, libp2p, ggml's compute buffers.
const RuntimeOverhead = 300 << 20

// Target is one of the goals the benchmark reports on. They are measurements, not asserts.
type Target struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Goal   string  `json:"goal"`
	Met    bool    `json:"met"`
	Detail string  `json:"detail"`
}

func (l *Level) summarize(decodeBytes int64, bandwidth float64) {
	var ttftSum, ttftMax float64
	l.PromptTokens, l.CompletionTokens, l.DecodeRate = 0, 0, 0
	for _, s := range l.Streams {
		l.PromptTokens += s.PromptTokens
		l.CompletionTokens += s.CompletionTokens
		t := s.TTFT.Seconds()
		ttftSum += t
		ttftMax = max(ttftMax, t)
		l.DecodeRate += s.DecodeRate()
	}
	if n := len(l.Streams); n > 0 {
		l.TTFTMean = ttftSum / float64(n)
		l.PerStream = l.DecodeRate / float64(n)
	}
	l.SteadyDecode = steadyDecode(l.Streams)
	l.TTFTMax = ttftMax
	if ttftMax > 0 {
		l.PrefillRate = float64(l.PromptTokens) / ttftMax
	}
	if decodeBytes > 0 {
		l.Limit = float64(l.Concurrency) * bandwidth / float64(decodeBytes)
	}
	if tok := l.PromptTokens + l.CompletionTokens; tok > 0 && l.WireBytes > 0 {
		l.WirePerToken = l.WireBytes / float64(tok)
	}
}

// steadyDecode is the tokens all streams produced while every one of them was decoding, over
// that window. The streams' clocks start within microseconds of each other, at their requests.
func steadyDecode(streams []Stream) float64 {
	if len(streams) == 1 {
		return streams[0].DecodeRate()
	}
	var lo, hi time.Duration
	for i, s := range streams {
		lo = max(lo, s.TTFT)
		if i == 0 || s.Total < hi {
			hi = s.Total
		}
	}
	if hi-lo < time.Second {
		return 0
	}
	n := 0
	for _, s := range streams {
		for _, t := range s.Chunks {
			if t > lo && t <= hi {
				n++
			}
		}
	}
	return float64(n) / (hi - lo).Seconds()
}

func (r *RunResult) level(c int) *Level {
	for _, l := range r.Levels {
		if l.Concurrency == c {
			return l
		}
	}
	return nil
}

// Markdown writes the report as markdown tables.
func (rep *Report) Markdown(w io.Writer) {
	m := rep.Machine
	fmt.Fprintf(w, "machine: %d x %s (%s), %s RAM, kernel %s, %s; memory copy %.1f GB/s; load average %.2f at start, %.2f at end\n",
		m.CPUs, m.CPUModel, m.Flags, shard.HumanBytes(m.RAMBytes), m.Kernel, m.GoVer, m.CopyBandwidth/1e9, m.LoadAvg, m.LoadAvgEnd)
	md := rep.Model
	fmt.Fprintf(w, "model: %s (%s, %d layers, hidden %d, vocabulary %d), %s of weights, %s read per decode step\n",
		md.Name, md.Type, md.Layers, md.Hidden, md.Vocab, shard.HumanBytes(md.Bytes), shard.HumanBytes(md.DecodeBytes))
	if md.Experts > 0 {
		over := ""
		if md.ExpertsOverride {
			over = " (--experts override: fewer than the real model's, each of real size)"
		}
		fmt.Fprintf(w, "experts: %d per layer%s, %d per token\n", md.Experts, over, md.ExpertsUsed)
	}
	s := rep.Settings
	fmt.Fprintf(w, "settings: %d nodes x %d threads (whole: %d threads), --max-memory %s each, ranges %v, context %d x %d sessions, codec %s (%d B/token/hop), prompts %d tokens, %d new tokens\n\n",
		s.Nodes, s.ThreadsPerNode, s.WholeThreads, shard.HumanBytes(s.NodeMemory), s.Ranges, s.Context, s.Sessions, s.Codec, s.HopPayloadBytes, s.PromptTokens, s.Tokens)

	whole := rep.whole()
	fmt.Fprintln(w, "| run | streams | TTFT s (mean/max) | prefill tok/s | decode tok/s | all decoding | per stream | limit tok/s | vs whole | wire B/token | text = whole | other load |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rep.Runs {
		for _, l := range r.Levels {
			vs, same, wire := "-", "-", "-"
			if whole != nil && r != whole {
				if wl := whole.level(l.Concurrency); wl != nil && wl.DecodeRate > 0 {
					vs = fmt.Sprintf("%.2fx", l.DecodeRate/wl.DecodeRate)
				}
			}
			if l.SameAsWhole >= 0 {
				same = fmt.Sprintf("%d/%d", l.SameAsWhole, len(l.Streams))
			}
			if l.WirePerToken > 0 {
				wire = fmt.Sprintf("%.0f", l.WirePerToken)
				if l.WireSource == "wchar" {
					wire += " (syscalls)"
				}
			}
			steady := "-"
			if l.SteadyDecode > 0 {
				steady = fmt.Sprintf("%.2f", l.SteadyDecode)
			}
			fmt.Fprintf(w, "| %s | %d | %.2f / %.2f | %.1f | %.2f | %s | %.2f | %.2f | %s | %s | %s | %.2f cores |\n",
				r.Name, l.Concurrency, l.TTFTMean, l.TTFTMax, l.PrefillRate, l.DecodeRate, steady, l.PerStream, l.Limit, vs, wire, same, l.OtherCores)
		}
	}
	rep.timingTable(w)
	var all []ProcessMemory
	for _, r := range rep.Runs {
		if r.Latency == 0 {
			all = append(all, r.Memory...)
		}
	}
	if len(all) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "| process | layers | weights | KV cache | weights + KV + %s | peak RSS loading | ratio | peak RSS serving | ratio | Go runtime |\n", shard.HumanBytes(RuntimeOverhead))
		fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|")
		for _, p := range all {
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %.2f | %s | %.2f | %s |\n", p.Name, p.Range, shard.HumanBytes(p.Weights),
				shard.HumanBytes(p.KV), shard.HumanBytes(p.Budget), shard.HumanBytes(p.LoadPeak), p.LoadRatio, shard.HumanBytes(p.Peak), p.Ratio,
				shard.HumanBytes(p.GoSys))
		}
	}
	if len(rep.Targets) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| target | goal | measured | met |")
		fmt.Fprintln(w, "|---|---|---|---|")
		for _, t := range rep.Targets {
			met := "no"
			if t.Met {
				met = "yes"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s |\n", t.Name, t.Goal, t.Detail, met)
		}
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(w, "\nnote: %s", n)
	}
	if len(rep.Notes) > 0 {
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\nelapsed %.0f s\n", rep.Elapsed)
}

// timingTable says where a decode step's time went, per stage: computing, waiting for the
// CPU lock, holding steps back for a batch; for one stream, what is left of the wall time is
// outside every stage's compute loop (sampling, HTTP, the wire, the scheduler).
func (rep *Report) timingTable(w io.Writer) {
	header := false
	for _, r := range rep.Runs {
		for _, l := range r.Levels {
			if len(l.Stages) == 0 {
				continue
			}
			if !header {
				fmt.Fprintln(w)
				fmt.Fprintln(w, "| run | streams | wall ms per decode step | compute ms per decode step, each stage | compute, all stages | CPU lock wait ms/step | batch wait ms/step | outside the stages ms/step |")
				fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
				header = true
			}
			t, _ := l.stepTime()
			wall, outside := "-", "-"
			if o, ok := l.outside(t); ok {
				wall = fmt.Sprintf("%.1f", 1e3/l.DecodeRate)
				outside = fmt.Sprintf("%.1f", o)
			}
			fmt.Fprintf(w, "| %s | %d | %s | %s | %.1f | %.1f | %.1f | %s |\n", r.Name, l.Concurrency, wall, strings.Join(t.each, ", "), t.compute, t.lock, t.batch, outside)
		}
	}
}

// WriteJSON writes the report to path.
func (rep *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encode report: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// whole is this build's whole-model run, nil when there is none.
func (rep *Report) whole() *RunResult {
	var whole *RunResult
	for _, r := range rep.Runs {
		if !r.Swarm && !r.Baseline {
			whole = r
		}
	}
	return whole
}

// evaluate fills the targets from the runs.
func (rep *Report) evaluate() {
	var swarm, slow, base *RunResult
	whole := rep.whole()
	for _, r := range rep.Runs {
		switch {
		case !r.Swarm:
			if r.Baseline {
				base = r
			}
		case r.Latency == 0 && swarm == nil:
			swarm = r
		case r.Latency > 0 && slow == nil:
			slow = r
		}
	}
	if whole != nil && base != nil {
		// The issue's goals for the repacked engine against the plain one (issue 20).
		if w, b := whole.level(1), base.level(1); w != nil && b != nil && b.DecodeRate > 0 && b.PrefillRate > 0 {
			d, p := w.DecodeRate/b.DecodeRate, w.PrefillRate/b.PrefillRate
			dd := fmt.Sprintf("%.2fx (%.2f vs %.2f tok/s)", d, w.DecodeRate, b.DecodeRate)
			pd := fmt.Sprintf("%.2fx (%.1f vs %.1f tok/s)", p, w.PrefillRate, b.PrefillRate)
			if rd, rp, rounds, ok := w.baselineRatios(); ok {
				// Rounds in turn see the same machine; the levels ran a minute or more apart.
				of := fmt.Sprintf("median of %d rounds in turn (this build/baseline decode, prefill tok/s: %s); the levels above, a minute apart: ", len(w.BaselineRounds), rounds)
				dd = fmt.Sprintf("%.2fx, %s%s", rd, of, dd)
				pd = fmt.Sprintf("%.2fx, median of the same rounds; the levels above: %s", rp, pd)
				d, p = rd, rp
			}
			if d < 1.5 {
				dd += fmt.Sprintf("; missed by %.0f%%", (1-d/1.5)*100) + repackWhy(w, b, true)
			}
			if p < 2.5 {
				pd += fmt.Sprintf("; missed by %.0f%%", (1-p/2.5)*100) + repackWhy(w, b, false)
			}
			rep.Targets = append(rep.Targets,
				Target{Name: "whole model, this build vs the baseline binary: decode, 1 stream", Value: d, Goal: ">= 1.5x", Met: d >= 1.5, Detail: dd},
				Target{Name: "whole model, this build vs the baseline binary: prefill, 1 stream", Value: p, Goal: ">= 2.5x", Met: p >= 2.5, Detail: pd})
		}
	}
	if whole != nil && swarm != nil {
		if w, s := whole.level(1), swarm.level(1); w != nil && s != nil && w.DecodeRate > 0 {
			v := s.DecodeRate / w.DecodeRate
			detail := fmt.Sprintf("%.2fx (%.2f vs %.2f tok/s)", v, s.DecodeRate, w.DecodeRate)
			if p, rounds, ok := s.pairedRatio(); ok {
				// Rounds taken in turn see the same memory bus; the two levels above ran a
				// minute or more apart.
				detail = fmt.Sprintf("%.2fx, median of %d rounds in turn (swarm/whole tok/s: %s); the levels above, a minute apart: %s", p, len(s.Paired), rounds, detail)
				v = p
			}
			if v < 0.9 {
				detail += splitWhy(w, s, v/0.9)
			}
			rep.Targets = append(rep.Targets, Target{Name: fmt.Sprintf("%d-node split decode vs whole, 1 stream", swarm.Nodes),
				Value: v, Goal: ">= 0.9x", Met: v >= 0.9, Detail: detail})
		}
	}
	if swarm != nil && len(swarm.Levels) > 1 {
		one, top := swarm.level(1), swarm.Levels[len(swarm.Levels)-1]
		if one != nil && one.DecodeRate > 0 && top.Concurrency > 1 {
			// The single stream is every 1-stream measurement of this swarm (its level and the
			// paired rounds'): one of them alone moves with this machine's drift.
			base, n := one.singleStream()
			of := ""
			if n > 1 {
				of = fmt.Sprintf(", 1 stream the median of the swarm's %d single-stream measurements", n)
			}
			var w1, wt *Level
			if whole != nil {
				w1, wt = whole.level(1), whole.level(top.Concurrency)
			}
			goal := 2.4 * float64(top.Concurrency) / 8 // the issue's 2.4x is for 8 streams
			v := top.DecodeRate / base
			detail := fmt.Sprintf("%.2fx (%.2f vs %.2f tok/s%s)", v, top.DecodeRate, base, of)
			if w1 != nil && wt != nil && w1.DecodeRate > 0 {
				// What batching alone gives on this machine: the ceiling the swarm's gain has.
				detail += fmt.Sprintf("; the whole model in one process: %.2fx", wt.DecodeRate/w1.DecodeRate)
			}
			if v < goal && top.PrefillRate > 0 {
				detail += fmt.Sprintf("; missed by %.0f%%: this counts the time a stream's decode waits behind the other streams' prompts (%d prompt tokens at %.1f tok/s); the next target leaves them out",
					(1-v/goal)*100, top.PromptTokens, top.PrefillRate)
			}
			rep.Targets = append(rep.Targets, Target{Name: fmt.Sprintf("swarm: %d streams vs 1, aggregate decode", top.Concurrency),
				Value: v, Goal: fmt.Sprintf(">= %.1fx", goal), Met: v >= goal, Detail: detail})
			if top.SteadyDecode > 0 {
				sv := top.SteadyDecode / base
				sd := fmt.Sprintf("%.2fx (%.2f vs %.2f tok/s%s)", sv, top.SteadyDecode, base, of)
				if w1 != nil && wt != nil && w1.DecodeRate > 0 && wt.SteadyDecode > 0 {
					sd += fmt.Sprintf("; the whole model in one process: %.2fx", wt.SteadyDecode/w1.DecodeRate)
				}
				if sv < goal {
					sd += batchWhy(one, top, w1, wt, sv/goal)
				}
				rep.Targets = append(rep.Targets, Target{Name: fmt.Sprintf("swarm: %d streams vs 1, decode while all %d decode (no prefill between)", top.Concurrency, top.Concurrency),
					Value: sv, Goal: fmt.Sprintf(">= %.1fx", goal), Met: sv >= goal, Detail: sd})
			}
		}
	}
	if swarm != nil && len(swarm.Memory) > 0 {
		worst := swarm.Memory[0]
		for _, p := range swarm.Memory {
			if p.Ratio > worst.Ratio {
				worst = p
			}
		}
		worstLoad := swarm.Memory[0]
		for _, p := range swarm.Memory {
			if p.LoadRatio > worstLoad.LoadRatio {
				worstLoad = p
			}
		}
		rep.Targets = append(rep.Targets, Target{Name: "node peak RSS while serving vs weights + KV + 300 MiB (worst node)",
			Value: worst.Ratio, Goal: "<= 1.1x", Met: worst.Ratio <= 1.1,
			Detail: fmt.Sprintf("%.2fx (%s: %s vs %s)", worst.Ratio, worst.Name, shard.HumanBytes(worst.Peak), shard.HumanBytes(worst.Budget))},
			Target{Name: "node peak RSS while cutting and loading its slice, same budget (worst node)",
				Value: worstLoad.LoadRatio, Goal: "<= 1.1x", Met: worstLoad.LoadRatio <= 1.1,
				Detail: fmt.Sprintf("%.2fx (%s: %s vs %s)", worstLoad.LoadRatio, worstLoad.Name, shard.HumanBytes(worstLoad.LoadPeak), shard.HumanBytes(worstLoad.Budget))})
	}
	if swarm != nil && slow != nil {
		s, l := swarm.level(1), slow.level(1)
		if s != nil && l != nil && s.DecodeRate > 0 && l.DecodeRate > 0 {
			compute := 1 / s.DecodeRate
			wire := float64(slow.Links) * slow.Latency
			if rep.Settings.Bandwidth > 0 {
				wire += float64(max(slow.Nodes-1, 0)*rep.Settings.HopPayloadBytes) / rep.Settings.Bandwidth
			}
			pred := 1 / (compute + wire)
			v := l.DecodeRate / pred
			rep.Targets = append(rep.Targets, Target{Name: fmt.Sprintf("decode with %s one-way latency vs 1/(compute + %d links x latency)", time.Duration(slow.Latency*1e9), slow.Links),
				Value: v, Goal: "within 10%", Met: math.Abs(v-1) <= 0.10,
				Detail: fmt.Sprintf("%.2f tok/s vs predicted %.2f (compute %.1f ms + wire %.1f ms): %.2fx", l.DecodeRate, pred, compute*1e3, wire*1e3, v)})
		}
	}
}

// singleStream is the median decode speed over a swarm's 1-stream level and its paired
// rounds, and how many measurements that is.
func (l *Level) singleStream() (float64, int) {
	rs := []float64{l.DecodeRate}
	for _, r := range l.Paired {
		if r.Swarm > 0 {
			rs = append(rs, r.Swarm)
		}
	}
	return median(rs), len(rs)
}

// splitWhy says why the split missed its goal (got is the fraction of it reached): where the
// two 1-stream levels' decode steps went, and what else ran on the cores meanwhile.
func splitWhy(whole, swarm *Level, got float64) string {
	out := fmt.Sprintf("; missed by %.0f%%", (1-got)*100)
	wt, wok := whole.stepTime()
	st, sok := swarm.stepTime()
	wo, ook := whole.outside(wt)
	so, sook := swarm.outside(st)
	if !wok || !sok || !ook || !sook || wt.compute <= 0 {
		return out
	}
	out += fmt.Sprintf(": at the 1-stream levels the stages computed %.1f ms a token against the whole model's %.1f (%.2fx), "+
		"and %.1f ms a token went outside them (the wire, the CPU lock's handovers, sampling; whole model: %.1f)",
		st.compute, wt.compute, st.compute/wt.compute, so, wo)
	if others := max(whole.OtherCores, swarm.OtherCores); others >= 0.2 {
		// README, "Where the swarm's time goes": a preempted ggml thread stalls its partner at
		// the next barrier, and the swarm starts three graphs a token where the whole starts one.
		out += fmt.Sprintf("; other processes kept %.2f cores busy (whole model's level: %.2f), which stalls ggml's threads at their barriers, and the swarm starts three graphs a token to the whole model's one",
			swarm.OtherCores, whole.OtherCores)
	}
	return out
}

// batchWhy says why batching missed its goal (got is the fraction of it reached): how far the
// stages' compute per token fell from one stream to many, against the whole model's.
func batchWhy(one, top, whole1, wholeTop *Level, got float64) string {
	out := fmt.Sprintf("; missed by %.0f%%", (1-got)*100)
	t1, ok1 := one.stepTime()
	tt, okt := top.stepTime()
	if !ok1 || !okt || tt.perToken <= 0 {
		return out
	}
	steps := make([]string, len(tt.steps))
	for i, s := range tt.steps {
		steps[i] = fmt.Sprintf("%.1f", s)
	}
	out += fmt.Sprintf(": the stages' compute per token fell from %.1f ms for one stream to %.1f ms (%.2fx), in batches of %s steps of %d",
		t1.perToken, tt.perToken, t1.perToken/tt.perToken, strings.Join(steps, "/"), top.Concurrency)
	if whole1 != nil && wholeTop != nil {
		if w1, ok := whole1.stepTime(); ok && w1.perToken > 0 {
			if wt, ok := wholeTop.stepTime(); ok && wt.perToken > 0 {
				out += fmt.Sprintf(" (the whole model's: %.1f to %.1f ms, %.2fx, what batching gives on this machine)", w1.perToken, wt.perToken, w1.perToken/wt.perToken)
			}
		}
	}
	if o, ok := one.outside(t1); ok {
		out += fmt.Sprintf("; one stream also spends %.1f ms a token outside the stages, which batches share", o)
	}
	if top.OtherCores >= 0.2 {
		out += fmt.Sprintf("; other processes kept %.2f cores busy", top.OtherCores)
	}
	return out
}

// Issue 20's figures for the 70B-shaped 4-layer q4_0 model on its 2-core AMD EPYC (AVX-512,
// VNNI), 2 threads: llama.cpp with its repacked kernels, and Strata's plain engine then.
const (
	llamaDecode, llamaPrefill       = 13.2, 82.0
	issuePlainDecode, issuePlainPre = 8.35, 25.5
)

// repackWhy puts a missed repacked-vs-plain ratio beside issue 20's figures: llama.cpp runs
// the same ggml kernels, so its speed is the ceiling, and the plain build has since gained
// Strata's own improvements, which shrink the ratio without slowing this build.
func repackWhy(build, base *Level, decode bool) string {
	b, p, llama, then, what := build.DecodeRate, base.DecodeRate, llamaDecode, issuePlainDecode, "decode"
	if !decode {
		b, p, llama, then, what = build.PrefillRate, base.PrefillRate, llamaPrefill, issuePlainPre, "prefill"
	}
	return fmt.Sprintf(": this build's %s is %.2fx llama.cpp's on the CPU issue 20 measured (%.1f vs %.1f tok/s, the same ggml kernels), "+
		"and %.2fx the plain engine's then (%.1f); the plain build now runs Strata's and the bench's own changes since (a full-length warm-up among them), at %.1f tok/s (these figures are for the 70B-shaped 4-layer q4_0 model, 2 threads)",
		what, b/llama, b, llama, b/then, then, p)
}
