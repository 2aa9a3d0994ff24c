package node

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-llm/strata/pipeline"
)

// QueueHealth is the admission queue as /health shows it: requests waiting for a session
// because every route is full. A busy swarm is still ready.
type QueueHealth struct {
	Waiting      int     `json:"waiting"`
	Depth        int     `json:"depth"`
	OldestWaitMs int64   `json:"oldest_wait_ms"`
	MeanWaitMs   float64 `json:"mean_wait_ms"` // of the requests that left the queue
}

func (n *Node) queueHealth() (QueueHealth, bool) {
	if n.admit == nil {
		return QueueHealth{}, false
	}
	st := n.admit.Stats()
	q := QueueHealth{Waiting: st.Waiting, Depth: n.cfg.Queue, OldestWaitMs: st.Oldest.Milliseconds()}
	if left := st.Started + st.TimedOut + st.Cancelled; left > 0 {
		q.MeanWaitMs = float64(st.WaitSum.Milliseconds()) / float64(left)
	}
	return q, st.Waiting > 0
}

// queueCollector exports the admission queue at scrape time.
type queueCollector struct {
	n                                      *Node
	waiting, oldest, waitSum, leaves, wait *prometheus.Desc
}

func newQueueCollector(n *Node) *queueCollector {
	return &queueCollector{
		n: n,
		waiting: prometheus.NewDesc("strata_queue_depth",
			"Requests waiting in this entry node's admission queue for a session.", nil, nil),
		oldest: prometheus.NewDesc("strata_queue_oldest_wait_seconds",
			"How long the request at the head of the admission queue has waited.", nil, nil),
		waitSum: prometheus.NewDesc("strata_queue_wait_seconds_total",
			"Total time requests that left the admission queue spent in it.", nil, nil),
		leaves: prometheus.NewDesc("strata_queue_requests_total",
			"Requests that had to queue, by how they left: started, full (429 at once), timeout (429), cancelled.", []string{"outcome"}, nil),
		wait: prometheus.NewDesc("strata_queue_wait_seconds",
			"How long the queued requests that started waited for a session (requests that found room at once are not counted).", nil, nil),
	}
}

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.waiting, c.oldest, c.waitSum, c.leaves, c.wait} {
		ch <- d
	}
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	if c.n.admit == nil {
		return
	}
	st := c.n.admit.Stats()
	ch <- prometheus.MustNewConstMetric(c.waiting, prometheus.GaugeValue, float64(st.Waiting))
	ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, st.Oldest.Seconds())
	ch <- prometheus.MustNewConstMetric(c.waitSum, prometheus.CounterValue, st.WaitSum.Seconds())
	buckets := map[float64]uint64{}
	var cum uint64
	for i, le := range pipeline.WaitBuckets() {
		cum += st.StartedWaits[i]
		buckets[le] = cum
	}
	ch <- prometheus.MustNewConstHistogram(c.wait, st.Started, st.StartedWait.Seconds(), buckets)
	for outcome, v := range map[string]uint64{"started": st.Started, "full": st.Full, "timeout": st.TimedOut, "cancelled": st.Cancelled} {
		ch <- prometheus.MustNewConstMetric(c.leaves, prometheus.CounterValue, float64(v), outcome)
	}
}
