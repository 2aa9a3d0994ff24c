package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/strata-llm/strata/shard"
)

// StageTime is where one stage's compute loop spent a level's time (shard.Timing, over the
// level): a swarm slower than the whole model is either slower computing or idle between
// computes, and only the stages can tell which.
type StageTime struct {
	Name          string  `json:"name"`
	Batches       float64 `json:"batches"`
	Steps         float64 `json:"steps"`
	Compute       float64 `json:"compute_s"`
	LockWait      float64 `json:"lock_wait_s"`
	BatchWait     float64 `json:"batch_wait_s"`
	DecodeBatches float64 `json:"decode_batches"`
	DecodeSteps   float64 `json:"decode_steps"`
	DecodeCompute float64 `json:"decode_compute_s"`
}

// stageSeries are the nodes' /metrics series of a StageTime's counters, in values' order.
var stageSeries = []string{"strata_stage_batches_total", "strata_stage_steps_total",
	"strata_stage_compute_seconds_total", "strata_stage_lock_wait_seconds_total", "strata_stage_batch_wait_seconds_total",
	"strata_stage_decode_batches_total", "strata_stage_decode_steps_total", "strata_stage_decode_compute_seconds_total"}

// values are the counters in stageSeries' order; stageTimeFrom makes a StageTime of them.
func (a StageTime) values() []float64 {
	return []float64{a.Batches, a.Steps, a.Compute, a.LockWait, a.BatchWait, a.DecodeBatches, a.DecodeSteps, a.DecodeCompute}
}

func stageTimeFrom(name string, v []float64) StageTime {
	return StageTime{Name: name, Batches: v[0], Steps: v[1], Compute: v[2], LockWait: v[3], BatchWait: v[4],
		DecodeBatches: v[5], DecodeSteps: v[6], DecodeCompute: v[7]}
}

func stageTimeOf(name string, t shard.Timing) StageTime {
	return stageTimeFrom(name, []float64{float64(t.Batches), float64(t.Steps), t.Compute.Seconds(), t.LockWait.Seconds(),
		t.BatchWait.Seconds(), float64(t.DecodeBatches), float64(t.DecodeSteps), t.DecodeCompute.Seconds()})
}

func (a StageTime) sub(b StageTime) StageTime {
	v, w := a.values(), b.values()
	for i := range v {
		v[i] -= w[i]
	}
	return stageTimeFrom(a.Name, v)
}

// stageTimes reads the stages' cumulative timing; the level's is the difference of two reads.
type stageTimes func(ctx context.Context) ([]StageTime, error)

// scrapeStageTimes reads each node's stage timing from its /metrics.
func scrapeStageTimes(client *http.Client, names, apis []string) stageTimes {
	return func(ctx context.Context) ([]StageTime, error) {
		var out []StageTime
		for i, api := range apis {
			v, err := ScrapeCounters(ctx, client, api, stageSeries...)
			if err != nil {
				return nil, err
			}
			out = append(out, stageTimeFrom(names[i], v))
		}
		return out, nil
	}
}

// ScrapeCounters reads unlabelled series of a Prometheus text exposition from
// http://addr/metrics, in the order named.
func ScrapeCounters(ctx context.Context, client *http.Client, addr string, names ...string) ([]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil, fmt.Errorf("scrape %s: %w (HTTP %d)", addr, errNoMetric, resp.StatusCode)
	}
	v, err := parseCounters(resp.Body, names)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", addr, err)
	}
	return v, nil
}

func parseCounters(r io.Reader, want []string) ([]float64, error) {
	out := make([]float64, len(want))
	found := make([]bool, len(want))
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		for i, w := range want {
			if series != w {
				continue
			}
			f := strings.Fields(value)
			if len(f) == 0 {
				continue
			}
			v, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return nil, fmt.Errorf("series %s: %w", w, err)
			}
			out[i], found[i] = v, true
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for i, ok := range found {
		if !ok {
			return nil, fmt.Errorf("%w: %s", errNoMetric, want[i])
		}
	}
	return out, nil
}

// stepTime is where one decode batch's time went at a level, over its stages.
type stepTime struct {
	compute  float64   // ms of compute a batch, summed over the stages
	perToken float64   // ms of compute per token: each stage's batch over its steps, summed
	lock     float64   // ms a batch waiting for the CPU lock, summed
	batch    float64   // ms a batch holding steps back, summed
	steps    []float64 // steps a batch, each stage
	each     []string  // "compute (steps)" each stage, "-" where it decoded nothing
}

func (l *Level) stepTime() (stepTime, bool) {
	var t stepTime
	ok := false
	for _, st := range l.Stages {
		if st.DecodeBatches <= 0 {
			t.each = append(t.each, "-")
			continue
		}
		ok = true
		c := st.DecodeCompute / st.DecodeBatches * 1e3
		steps := st.DecodeSteps / st.DecodeBatches
		t.compute += c
		t.perToken += c / steps
		t.lock += st.LockWait / st.DecodeBatches * 1e3
		t.batch += st.BatchWait / st.DecodeBatches * 1e3
		t.steps = append(t.steps, steps)
		t.each = append(t.each, fmt.Sprintf("%.1f (%.1f steps)", c, steps))
	}
	return t, ok
}

// outside is, for one stream, the ms of a decode step spent outside every stage's compute
// loop: the wire, the lock's handovers, sampling, HTTP.
func (l *Level) outside(t stepTime) (float64, bool) {
	if l.Concurrency != 1 || l.DecodeRate <= 0 {
		return 0, false
	}
	return 1e3/l.DecodeRate - t.compute - t.lock - t.batch, true
}
