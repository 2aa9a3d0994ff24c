package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

// metrics are one node's Prometheus collectors, in a registry of its own: two nodes in one
// process (tests) must not share counters, and nothing registers into the global default.
//
// It observes both sides of a node: as an entry (pipeline.Observer: requests, tokens, time to
// first token, route steps, re-routes) and as a stage host (p2p.Observer: latency to the next
// hop, bytes on the wire); the stage counters p2p keeps itself are read at scrape time.
type metrics struct {
	n   *Node
	reg *prometheus.Registry

	requests     *prometheus.CounterVec
	active       prometheus.Gauge
	promptTokens prometheus.Counter
	tokens       prometheus.Counter
	ttft         prometheus.Histogram
	routeStep    *prometheus.HistogramVec
	hopStep      *prometheus.HistogramVec
	reroutes     *prometheus.CounterVec
	wire         *prometheus.CounterVec
	wireIn       prometheus.Counter
	wireOut      prometheus.Counter
}

// stepBuckets: step latencies on a LAN run from well under a millisecond (one decode step
// of a small slice) to seconds (a long prefill chunk on a slow CPU).
func stepBuckets() []float64 { return prometheus.ExponentialBuckets(0.0005, 2, 16) } // 0.5 ms .. 16 s

func newMetrics(n *Node) *metrics {
	m := &metrics{
		n:   n,
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_requests_total",
			Help: "Generations this node ran as the entry, by outcome (ok, error, cancelled).",
		}, []string{"outcome"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_active_generations",
			Help: "Generations running now with this node as the entry.",
		}),
		promptTokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_prompt_tokens_total",
			Help: "Prompt tokens of the generations this node ran as the entry.",
		}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_generated_tokens_total",
			Help: "Completion tokens sampled for the generations this node ran as the entry.",
		}),
		ttft: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "strata_time_to_first_token_seconds",
			Help:    "From a request's start to its first sampled token (tokenizing, opening the route, prefill).",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5 ms .. 41 s
		}),
		routeStep: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "strata_route_step_seconds",
			Help:    "One step through the whole route as the entry sees it; phase is prefill (several positions) or decode (one).",
			Buckets: stepBuckets(),
		}, []string{"phase"}),
		hopStep: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "strata_hop_step_seconds",
			Help: "From sending a step to the next hop (peer) until its result came back, including every stage after it. " +
				"The entry observes its route's first stage, each stage the stage after it.",
			Buckets: stepBuckets(),
		}, []string{"peer"}),
		reroutes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_reroutes_total",
			Help: "Routes rebuilt mid-generation because a stage failed, by the peer that failed.",
		}, []string{"peer"}),
		wire: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_wire_bytes_total",
			Help: "Stage protocol bytes this node read (in) and wrote (out) on libp2p streams.",
		}, []string{"direction"}),
	}
	m.wireIn = m.wire.WithLabelValues("in")
	m.wireOut = m.wire.WithLabelValues("out")
	m.requests.WithLabelValues("ok") // present at 0, so rates work from the first request
	m.reg.MustRegister(
		m.requests, m.active, m.promptTokens, m.tokens, m.ttft, m.routeStep, m.hopStep, m.reroutes, m.wire,
		newStageCollector(n),
		newQueueCollector(n),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Registry is the node's own Prometheus registry, served at /metrics.
func (n *Node) Registry() *prometheus.Registry { return n.metricsOrNew().reg }

// metricsOrNew returns the node's metrics; a node built without them (no hooks installed)
// still gets a registry with its stage counters.
func (n *Node) metricsOrNew() *metrics {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.metrics == nil {
		n.metrics = newMetrics(n)
	}
	return n.metrics
}

// pipeline.Observer

func (m *metrics) Started() { m.active.Inc() }

func (m *metrics) Step(positions int, d time.Duration, err error) {
	if err != nil {
		return // a failed step's time says nothing about the route's speed
	}
	phase := "decode"
	if positions > 1 {
		phase = "prefill"
	}
	m.routeStep.WithLabelValues(phase).Observe(d.Seconds())
}

func (m *metrics) Token(i int, elapsed time.Duration) {
	m.tokens.Inc()
	if i == 0 {
		m.ttft.Observe(elapsed.Seconds())
	}
}

func (m *metrics) Rerouted(peer string) { m.reroutes.WithLabelValues(peer).Inc() }

func (m *metrics) Done(res pipeline.Result, err error) {
	m.active.Dec()
	m.promptTokens.Add(float64(res.PromptTokens))
	outcome := "ok"
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		outcome = "cancelled"
	case err != nil:
		outcome = "error"
	}
	m.requests.WithLabelValues(outcome).Inc()
}

// p2p.Observer

func (m *metrics) HopStep(next peer.ID, d time.Duration) {
	m.hopStep.WithLabelValues(next.String()).Observe(d.Seconds())
}

func (m *metrics) WireBytes(in, out int) {
	if in > 0 {
		m.wireIn.Add(float64(in))
	}
	if out > 0 {
		m.wireOut.Add(float64(out))
	}
}

// stageCollector reads the counters the p2p host keeps for the stages it serves, at scrape
// time, so the hot path pays nothing twice.
type stageCollector struct {
	n                                               *Node
	sessions, opened, steps, refused, layers, ready *prometheus.Desc
	timing                                          []*prometheus.Desc // one per stageTimingSeries entry
}

// stageTimingSeries are the served stage's compute-loop counters (shard.Timing), which say
// where a slow pipeline's time goes (strata bench reads them).
var stageTimingSeries = []struct {
	name, help string
	value      func(shard.Timing) float64
}{
	{"strata_stage_batches_total", "Graphs the stage served now computed (each a batch of sessions' steps).",
		func(t shard.Timing) float64 { return float64(t.Batches) }},
	{"strata_stage_compute_seconds_total", "Time the stage served now spent in the engine's forward pass.",
		func(t shard.Timing) float64 { return t.Compute.Seconds() }},
	{"strata_stage_lock_wait_seconds_total", "Time the stage served now waited for the machine's shared CPU lock (--cpu-lock).",
		func(t shard.Timing) float64 { return t.LockWait.Seconds() }},
	{"strata_stage_batch_wait_seconds_total", "Time the stage served now held steps back for the rest of their batch.",
		func(t shard.Timing) float64 { return t.BatchWait.Seconds() }},
	{"strata_stage_decode_batches_total", "Graphs of single-token steps (decoding, no prompt chunk) the stage served now computed.",
		func(t shard.Timing) float64 { return float64(t.DecodeBatches) }},
	{"strata_stage_decode_steps_total", "Single-token steps in those graphs (sessions decoding together share one graph).",
		func(t shard.Timing) float64 { return float64(t.DecodeSteps) }},
	{"strata_stage_decode_compute_seconds_total", "Time the stage served now spent in the engine's forward pass on graphs of single-token steps.",
		func(t shard.Timing) float64 { return t.DecodeCompute.Seconds() }},
}

func newStageCollector(n *Node) *stageCollector {
	c := &stageCollector{
		n: n,
		sessions: prometheus.NewDesc("strata_stage_sessions",
			"Sessions open now on the stages this node serves.", nil, nil),
		opened: prometheus.NewDesc("strata_stage_sessions_opened_total",
			"Sessions opened on the stages this node serves.", nil, nil),
		steps: prometheus.NewDesc("strata_stage_steps_total",
			"Steps the stages on this node completed (forwarded downstream and answered, or sampled).", nil, nil),
		refused: prometheus.NewDesc("strata_stage_refused_total",
			"Frames and sessions the stages on this node refused, by reason (p2p error code; reset = stream died).", []string{"reason"}, nil),
		layers: prometheus.NewDesc("strata_layers_served",
			"Layers this node serves now.", nil, nil),
		ready: prometheus.NewDesc("strata_swarm_ready",
			"1 when this node sees a route through every layer of the model.", nil, nil),
	}
	for _, ts := range stageTimingSeries {
		c.timing = append(c.timing, prometheus.NewDesc(ts.name, ts.help, nil, nil))
	}
	return c
}

func (c *stageCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range append([]*prometheus.Desc{c.sessions, c.opened, c.steps, c.refused, c.layers, c.ready}, c.timing...) {
		ch <- d
	}
}

func (c *stageCollector) Collect(ch chan<- prometheus.Metric) {
	n := c.n
	if n.host == nil {
		return
	}
	st := n.host.Stats()
	ch <- prometheus.MustNewConstMetric(c.sessions, prometheus.GaugeValue, float64(st.Sessions))
	ch <- prometheus.MustNewConstMetric(c.opened, prometheus.CounterValue, float64(st.Opened))
	ch <- prometheus.MustNewConstMetric(c.steps, prometheus.CounterValue, float64(st.Steps))
	for reason, v := range st.Rejected {
		ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(v), reason)
	}
	layers := 0
	var tm shard.Timing
	n.mu.Lock()
	if n.stage != nil {
		r := n.stage.Info().Range
		layers = r.End - r.Start
		tm = n.stage.Timing()
	}
	n.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(c.layers, prometheus.GaugeValue, float64(layers))
	for i, ts := range stageTimingSeries {
		ch <- prometheus.MustNewConstMetric(c.timing[i], prometheus.CounterValue, ts.value(tm))
	}
	if n.router != nil && n.members != nil {
		ready := 0.0
		if _, err := n.router.route(0, nil); err == nil {
			ready = 1
		}
		ch <- prometheus.MustNewConstMetric(c.ready, prometheus.GaugeValue, ready)
	}
}

// NodeStats is a summary of one node's metrics for the dashboard (GET /strata/node): totals
// since start, from which the page computes rates between two polls.
type NodeStats struct {
	PeerID          string             `json:"peer_id"`
	TimeMs          int64              `json:"time_ms"`
	Requests        float64            `json:"requests"`
	Active          float64            `json:"active"`
	PromptTokens    float64            `json:"prompt_tokens"`
	Tokens          float64            `json:"tokens"`
	TTFTCount       uint64             `json:"ttft_count"`
	TTFTSum         float64            `json:"ttft_seconds_sum"`
	DecodeCount     uint64             `json:"decode_steps"`
	DecodeSum       float64            `json:"decode_seconds_sum"`
	StageSessions   float64            `json:"stage_sessions"`
	StageSteps      float64            `json:"stage_steps"`
	WireIn          float64            `json:"wire_in_bytes"`
	WireOut         float64            `json:"wire_out_bytes"`
	Reroutes        float64            `json:"reroutes"`
	Refused         map[string]float64 `json:"refused,omitempty"`
	HopCount        map[string]uint64  `json:"hop_steps,omitempty"`
	HopSum          map[string]float64 `json:"hop_seconds_sum,omitempty"`
	ResidentBytes   float64            `json:"resident_bytes"`
	ProcessCPUTotal float64            `json:"cpu_seconds"`
	// Fetches are the node's recent slice fetches (weights.go), for the dashboard's view of
	// weights moving through the swarm.
	Fetches []FetchStatus `json:"fetches,omitempty"`
	// Placement is where the node's stage computes, e.g. "CPU [0,4), Vulkan0 [4,8)" (gpu.go).
	Placement string `json:"placement,omitempty"`
}

// Stats summarises the node's registry. It reads what /metrics serves, so the two never
// disagree.
func (n *Node) Stats() (NodeStats, error) {
	fams, err := n.Registry().Gather()
	if err != nil {
		return NodeStats{}, fmt.Errorf("gather metrics: %w", err)
	}
	if n.host == nil {
		return NodeStats{}, errors.New("node stats: the node has not started")
	}
	s := NodeStats{PeerID: n.host.ID().String(), TimeMs: time.Now().UnixMilli(), Fetches: n.Fetches()}
	label := func(m *dto.Metric, name string) string {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
		return ""
	}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			switch f.GetName() {
			case "strata_requests_total":
				s.Requests += m.GetCounter().GetValue()
			case "strata_active_generations":
				s.Active = m.GetGauge().GetValue()
			case "strata_prompt_tokens_total":
				s.PromptTokens = m.GetCounter().GetValue()
			case "strata_generated_tokens_total":
				s.Tokens = m.GetCounter().GetValue()
			case "strata_time_to_first_token_seconds":
				s.TTFTCount, s.TTFTSum = m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
			case "strata_route_step_seconds":
				if label(m, "phase") == "decode" {
					s.DecodeCount, s.DecodeSum = m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
				}
			case "strata_stage_sessions":
				s.StageSessions = m.GetGauge().GetValue()
			case "strata_stage_steps_total":
				s.StageSteps = m.GetCounter().GetValue()
			case "strata_wire_bytes_total":
				if label(m, "direction") == "in" {
					s.WireIn = m.GetCounter().GetValue()
				} else {
					s.WireOut = m.GetCounter().GetValue()
				}
			case "strata_reroutes_total":
				s.Reroutes += m.GetCounter().GetValue()
			case "strata_stage_refused_total":
				if s.Refused == nil {
					s.Refused = map[string]float64{}
				}
				s.Refused[label(m, "reason")] = m.GetCounter().GetValue()
			case "strata_hop_step_seconds":
				if s.HopCount == nil {
					s.HopCount, s.HopSum = map[string]uint64{}, map[string]float64{}
				}
				p := label(m, "peer")
				s.HopCount[p], s.HopSum[p] = m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
			case "process_resident_memory_bytes":
				s.ResidentBytes = m.GetGauge().GetValue()
			case "process_cpu_seconds_total":
				s.ProcessCPUTotal = m.GetCounter().GetValue()
			}
		}
	}
	n.mu.Lock()
	if p := stagePlacement(n.stage); p != nil {
		s.Placement = p.Summary
	}
	n.mu.Unlock()
	return s, nil
}
