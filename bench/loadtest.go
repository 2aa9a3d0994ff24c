package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// LoadConfig says how to load a swarm: closed-loop clients (each sends its next request when
// the last one ends) at each level for Duration, then a soak at SoakClients for Soak while
// every node's resident memory is sampled. Zero fields take the defaults noted.
type LoadConfig struct {
	Preset string // synthesized model shape (default "tiny")
	Type   string // weight format (default "q8_0")
	Seed   uint64 // weights seed (default 1)
	Model  string // load this GGUF file instead of a synthesized model

	Nodes        int           // local nodes (default 3)
	MaxSessions  int           // each node's --max-sessions (default 8)
	Queue        int           // the entry's --queue (default 256)
	QueueTimeout time.Duration // the entry's --queue-timeout (default 2m)
	Cores        int           // ggml threads per node; the nodes share the cores through one CPU lock (default: all)

	Clients      []int         // closed-loop clients per level (default 10, 50, 100)
	Duration     time.Duration // per level (default 60 s)
	Soak         time.Duration // soak length (default 10 min; negative: none)
	SoakClients  int           // clients during the soak (default the first level's)
	SampleEvery  time.Duration // RSS sampling period during the soak (default 10 s)
	Tokens       int           // new tokens per request (default 16)
	PromptTokens int           // tokens per prompt, BOS included (default 32)

	API string // load the running swarm behind this host:port instead (needs Model; no RSS)

	DataDir string // model cache and the nodes' state (default ~/.strata)
	Binary  string // the strata binary the nodes run (default: this executable)

	Progress io.Writer // one line per phase (default: nowhere)
}

// LoadLevel is what one level of clients got.
type LoadLevel struct {
	Clients        int            `json:"clients"`
	Seconds        float64        `json:"seconds"`
	OK             int            `json:"ok"`
	Errors         map[string]int `json:"errors,omitempty"` // by kind: "HTTP 429", "stream", ...
	PerMinute      float64        `json:"ok_per_minute"`
	TTFTP50        float64        `json:"ttft_p50_s"`
	TTFTP99        float64        `json:"ttft_p99_s"`
	Queued         uint64         `json:"queued"`              // requests that waited in the entry's queue and started
	QueueWaitP50   float64        `json:"queue_wait_p50_s"`    // over every OK request, 0 for those that never queued; an upper bound: the histogram bucket's
	QueueWaitP99   float64        `json:"queue_wait_p99_s"`    // likewise
	QueueWaitMean  float64        `json:"queue_wait_mean_s"`   // exact, over every OK request
	CompletionToks int            `json:"completion_tokens"`   // tokens of the OK requests
	LoadAvg        float64        `json:"load_average_1m_end"` // of the machine, at the end of the level
}

// RSSSample is each node's resident memory at one moment of the soak.
type RSSSample struct {
	At  float64 `json:"at_s"`
	RSS []int64 `json:"rss_bytes"` // per node, in node order
}

// LoadReport is a load run's results.
type LoadReport struct {
	Machine  Machine     `json:"machine"`
	Model    string      `json:"model"`
	Config   LoadConfig  `json:"config"`
	Levels   []LoadLevel `json:"levels"`
	Soak     *LoadLevel  `json:"soak,omitempty"`
	RSS      []RSSSample `json:"rss,omitempty"`
	Notes    []string    `json:"notes,omitempty"`
	Started  time.Time   `json:"started"`
	Duration float64     `json:"elapsed_s"`
}

func (c *LoadConfig) setDefaults() error {
	c.Preset = cmpOr(c.Preset, "tiny")
	c.Type = cmpOr(c.Type, "q8_0")
	if c.Seed == 0 {
		c.Seed = 1
	}
	if c.Nodes == 0 {
		c.Nodes = 3
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = 8
	}
	if c.Queue == 0 {
		c.Queue = 256
	}
	if c.QueueTimeout == 0 {
		c.QueueTimeout = 2 * time.Minute
	}
	if len(c.Clients) == 0 {
		c.Clients = []int{10, 50, 100}
	}
	if c.Duration == 0 {
		c.Duration = time.Minute
	}
	if c.Soak == 0 {
		c.Soak = 10 * time.Minute
	}
	if c.SoakClients == 0 {
		c.SoakClients = c.Clients[0]
	}
	if c.SampleEvery == 0 {
		c.SampleEvery = 10 * time.Second
	}
	if c.Tokens == 0 {
		c.Tokens = 16
	}
	if c.PromptTokens == 0 {
		c.PromptTokens = 32
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	switch {
	case c.Nodes < 1:
		return fmt.Errorf("load: want at least one node, got %d", c.Nodes)
	case c.Tokens < 1 || c.PromptTokens < 2:
		return errors.New("load: want at least 1 new token and prompts of at least 2 tokens")
	case c.Duration < 0 || c.SampleEvery < 0:
		return errors.New("load: durations must not be negative")
	case c.API != "" && c.Model == "":
		return errors.New("load: loading a running swarm (--api) needs its model file (--model) for the tokenizer")
	}
	for _, n := range append(slices.Clone(c.Clients), c.SoakClients) {
		if n < 1 || n > 4096 {
			return fmt.Errorf("load: %d clients: want 1 to 4096", n)
		}
	}
	if c.DataDir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return fmt.Errorf("load: no data dir given and no home directory: %w", err)
		}
		c.DataDir = filepath.Join(home, ".strata")
	}
	if c.Binary == "" && c.API == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("load: finding the strata binary to start nodes with: %w", err)
		}
		c.Binary = exe
	}
	return nil
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// RunLoad starts the swarm (unless cfg.API names one), loads it level by level, soaks it, and
// returns what it measured, even when a later phase failed.
func RunLoad(ctx context.Context, cfg LoadConfig) (*LoadReport, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	rep := &LoadReport{Started: time.Now(), Machine: ReadMachine(), Config: cfg}
	defer func() { rep.Duration = time.Since(rep.Started).Seconds() }()
	progress := func(format string, args ...any) {
		fmt.Fprintf(cfg.Progress, "[%6.1fs] %s\n", time.Since(rep.Started).Seconds(), fmt.Sprintf(format, args...))
	}
	path := cfg.Model
	if path == "" {
		b := &bench{cfg: Config{Arch: "llama", Preset: cfg.Preset, Type: cfg.Type, Seed: cfg.Seed, DataDir: cfg.DataDir, Progress: cfg.Progress},
			rep: &Report{Started: rep.Started}}
		var err error
		if path, err = b.synthesize(ctx); err != nil {
			return nil, err
		}
	}
	rep.Model = path
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	most := max(slices.Max(cfg.Clients), cfg.SoakClients)
	prompts, err := Prompts(tok, cfg.PromptTokens, most)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	api := cfg.API
	var pids []string
	if api == "" {
		ctxLen := ContextFor(cfg.PromptTokens, cfg.Tokens)
		mem, ranges, err := NodeMemory(info, cfg.Nodes, ctxLen, cfg.MaxSessions)
		if err != nil {
			return nil, fmt.Errorf("load: %w", err)
		}
		dir := filepath.Join(cfg.DataDir, "bench", "load")
		for i := range cfg.Nodes {
			for _, f := range []string{"api", "multiaddr"} {
				if err := os.Remove(filepath.Join(dir, fmt.Sprintf("node%d", i), f)); err != nil && !errors.Is(err, os.ErrNotExist) {
					return nil, fmt.Errorf("load: %w", err)
				}
			}
		}
		threads := cfg.Cores
		if threads <= 0 {
			threads = rep.Machine.CPUs
		}
		args := []string{"--max-memory", strconv.FormatInt(mem, 10), "--context", strconv.Itoa(ctxLen),
			"--max-sessions", strconv.Itoa(cfg.MaxSessions), "--queue", strconv.Itoa(cfg.Queue),
			"--queue-timeout", cfg.QueueTimeout.String(), "--cpu-lock", filepath.Join(cfg.DataDir, "bench", "load-cpu.lock")}
		progress("starting %d nodes (planned ranges %v, --max-sessions %d, --queue %d)", cfg.Nodes, ranges, cfg.MaxSessions, cfg.Queue)
		sw, err := testkit.StartSwarm(ctx, testkit.SwarmOptions{Binary: cfg.Binary, Nodes: cfg.Nodes, Model: path, Dir: dir, Threads: max(threads, 1), Args: args})
		if sw != nil {
			defer sw.Close()
		}
		if err != nil {
			return nil, fmt.Errorf("load: start swarm: %w", err)
		}
		if err := sw.WaitReady(ctx, cfg.Nodes, 15*time.Minute); err != nil {
			return nil, fmt.Errorf("load: %w%s", err, sw.Nodes[0].Tail(20))
		}
		api = sw.Nodes[0].API
		for _, n := range sw.Nodes {
			pids = append(pids, strconv.Itoa(n.PID()))
		}
	}
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: most + 1, MaxConnsPerHost: 0}}
	cl := Client{HTTP: hc, API: api}
	model, err := cl.Model(ctx)
	if err != nil {
		return rep, fmt.Errorf("load: %w", err)
	}
	if _, err := cl.Complete(ctx, model, prompts[0], cfg.Tokens); err != nil { // warm up
		return rep, fmt.Errorf("load: warm-up request: %w", err)
	}
	for _, n := range cfg.Clients {
		progress("%d clients for %s", n, cfg.Duration)
		lv, err := loadLevel(ctx, cl, model, prompts, n, cfg.Duration, cfg.Tokens, nil)
		if err != nil {
			return rep, err
		}
		rep.Levels = append(rep.Levels, lv)
		progress("  %d OK (%.0f/min), errors %v, TTFT p50 %.3fs p99 %.3fs, queue wait p50 %.3fs p99 <= %.3fs",
			lv.OK, lv.PerMinute, lv.Errors, lv.TTFTP50, lv.TTFTP99, lv.QueueWaitP50, lv.QueueWaitP99)
	}
	if cfg.Soak > 0 {
		progress("soak: %d clients for %s, RSS every %s", cfg.SoakClients, cfg.Soak, cfg.SampleEvery)
		sample := func(at time.Duration) {
			s := RSSSample{At: at.Seconds()}
			for _, pid := range pids {
				m, err := ReadProcMemory(pid)
				if err != nil {
					rep.Notes = append(rep.Notes, err.Error())
				}
				s.RSS = append(s.RSS, m.RSS)
			}
			rep.RSS = append(rep.RSS, s)
		}
		var sampler func(time.Duration)
		if len(pids) > 0 {
			sampler = sample
		} else {
			rep.Notes = append(rep.Notes, "a running swarm (--api): its nodes' RSS is not read")
		}
		lv, err := loadLevel(ctx, cl, model, prompts, cfg.SoakClients, cfg.Soak, cfg.Tokens, &soakSampler{every: cfg.SampleEvery, f: sampler})
		if err != nil {
			return rep, err
		}
		rep.Soak = &lv
	}
	return rep, nil
}

type soakSampler struct {
	every time.Duration
	f     func(at time.Duration)
}

var statusRe = regexp.MustCompile(`HTTP (\d{3})`)

// loadLevel runs n closed-loop clients for d and reads the entry's queue histogram before and
// after.
func loadLevel(ctx context.Context, cl Client, model string, prompts []string, n int, d time.Duration, tokens int, soak *soakSampler) (LoadLevel, error) {
	before, err := queueWaits(ctx, cl)
	if err != nil {
		return LoadLevel{}, err
	}
	lv := LoadLevel{Clients: n, Errors: map[string]int{}}
	var (
		mu    sync.Mutex
		ttfts []float64
		wg    sync.WaitGroup
	)
	start := time.Now()
	stop := start.Add(d)
	for i := range n {
		wg.Go(func() {
			for k := 0; time.Now().Before(stop) && ctx.Err() == nil; k++ {
				s, err := cl.Complete(ctx, model, prompts[(i+k*n)%len(prompts)], tokens)
				mu.Lock()
				if err != nil {
					kind := "stream"
					if m := statusRe.FindStringSubmatch(err.Error()); m != nil {
						kind = "HTTP " + m[1]
					}
					lv.Errors[kind]++
				} else {
					lv.OK++
					lv.CompletionToks += s.CompletionTokens
					ttfts = append(ttfts, s.TTFT.Seconds())
				}
				mu.Unlock()
			}
		})
	}
	if soak != nil && soak.f != nil {
		soak.f(0)
		t := time.NewTicker(soak.every)
		for now := range t.C {
			soak.f(now.Sub(start))
			if !now.Add(soak.every).Before(stop) {
				break
			}
		}
		t.Stop()
	}
	wg.Wait()
	if soak != nil && soak.f != nil {
		soak.f(time.Since(start))
	}
	lv.Seconds = time.Since(start).Seconds()
	if ctx.Err() != nil {
		return lv, ctx.Err()
	}
	lv.PerMinute = float64(lv.OK) / lv.Seconds * 60
	slices.Sort(ttfts)
	lv.TTFTP50, lv.TTFTP99 = quantile(ttfts, 0.5), quantile(ttfts, 0.99)
	after, err := queueWaits(ctx, cl)
	if err != nil {
		return lv, err
	}
	w := after.minus(before)
	lv.Queued = w.count
	lv.QueueWaitP50, lv.QueueWaitP99 = w.quantile(0.5, lv.OK), w.quantile(0.99, lv.OK)
	if lv.OK > 0 {
		lv.QueueWaitMean = w.sum / float64(lv.OK)
	}
	lv.LoadAvg = ReadMachine().LoadAvg
	return lv, nil
}

// quantile of sorted values (nearest rank).
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// waitHist is the entry's strata_queue_wait_seconds histogram: cumulative counts per bound.
type waitHist struct {
	bounds []float64
	cum    []uint64
	count  uint64
	sum    float64
}

func (a waitHist) minus(b waitHist) waitHist {
	out := waitHist{bounds: a.bounds, count: a.count - b.count, sum: a.sum - b.sum}
	for i := range a.cum {
		var prev uint64
		if i < len(b.cum) {
			prev = b.cum[i]
		}
		out.cum = append(out.cum, a.cum[i]-prev)
	}
	return out
}

// quantile over total requests, of which those not in the histogram waited 0: the upper
// bound of the bucket the quantile falls in.
func (h waitHist) quantile(q float64, total int) float64 {
	if total <= 0 {
		return 0
	}
	zeros := uint64(max(total, int(h.count))) - h.count
	rank := uint64(math.Ceil(q * float64(zeros+h.count)))
	if rank <= zeros {
		return 0
	}
	for i, c := range h.cum {
		if zeros+c >= rank {
			return h.bounds[i]
		}
	}
	return math.Inf(1)
}

var bucketRe = regexp.MustCompile(`^strata_queue_wait_seconds_bucket\{le="([^"]+)"\} (\S+)$`)

// queueWaits scrapes the entry's queue-wait histogram.
func queueWaits(ctx context.Context, cl Client) (waitHist, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+cl.API+"/metrics", nil)
	if err != nil {
		return waitHist{}, err
	}
	resp, err := cl.HTTP.Do(req)
	if err != nil {
		return waitHist{}, fmt.Errorf("load: scrape %s: %w", cl.API, err)
	}
	defer resp.Body.Close()
	var h waitHist
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := bucketRe.FindStringSubmatch(line); m != nil {
			le, _ := strconv.ParseFloat(m[1], 64)
			v, _ := strconv.ParseFloat(m[2], 64)
			if math.IsInf(le, 1) {
				continue
			}
			h.bounds = append(h.bounds, le)
			h.cum = append(h.cum, uint64(v))
			continue
		}
		if v, ok := strings.CutPrefix(line, "strata_queue_wait_seconds_count "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			h.count = uint64(f)
		}
		if v, ok := strings.CutPrefix(line, "strata_queue_wait_seconds_sum "); ok {
			h.sum, _ = strconv.ParseFloat(v, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return h, fmt.Errorf("load: scrape %s: %w", cl.API, err)
	}
	return h, nil
}

// Markdown writes the report's tables.
func (r *LoadReport) Markdown(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "Model %s; %d nodes, --max-sessions %d, --queue %d; requests of %d prompt + %d new tokens; %d cores, load average %.1f at the start.\n\n",
		filepath.Base(r.Model), c.Nodes, c.MaxSessions, c.Queue, c.PromptTokens, c.Tokens, r.Machine.CPUs, r.Machine.LoadAvg)
	fmt.Fprintln(w, "| clients | seconds | OK | errors | OK requests/min | tokens/s | TTFT p50 s | TTFT p99 s | queued | queue wait p50 s | queue wait p99 s | mean wait s | load avg |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	rows := r.Levels
	if r.Soak != nil {
		rows = append(slices.Clone(rows), *r.Soak)
	}
	for i, l := range rows {
		name := strconv.Itoa(l.Clients)
		if r.Soak != nil && i == len(rows)-1 {
			name += " (soak)"
		}
		errs := "0"
		if len(l.Errors) > 0 {
			var parts []string
			for k, v := range l.Errors {
				parts = append(parts, fmt.Sprintf("%d %s", v, k))
			}
			slices.Sort(parts)
			errs = strings.Join(parts, ", ")
		}
		fmt.Fprintf(w, "| %s | %.0f | %d | %s | %.0f | %.1f | %.3f | %.3f | %d | %s | %s | %.3f | %.1f |\n", name, l.Seconds, l.OK, errs, l.PerMinute,
			float64(l.CompletionToks)/max(l.Seconds, 1e-9), l.TTFTP50, l.TTFTP99, l.Queued, fmtBound(l.QueueWaitP50), fmtBound(l.QueueWaitP99), l.QueueWaitMean, l.LoadAvg)
	}
	if len(r.RSS) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| node | RSS at soak start | RSS at end | max | end / start |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
		first, last := r.RSS[0], r.RSS[len(r.RSS)-1]
		for i := range first.RSS {
			var peak int64
			for _, s := range r.RSS {
				if i < len(s.RSS) {
					peak = max(peak, s.RSS[i])
				}
			}
			fmt.Fprintf(w, "| node %d | %s | %s | %s | %.3f |\n", i, shard.HumanBytes(first.RSS[i]), shard.HumanBytes(last.RSS[i]), shard.HumanBytes(peak),
				float64(last.RSS[i])/max(float64(first.RSS[i]), 1))
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "\nNote: %s\n", n)
	}
}

func fmtBound(v float64) string {
	if math.IsInf(v, 1) {
		return "> 300"
	}
	if v == 0 {
		return "0"
	}
	return "<= " + strconv.FormatFloat(v, 'g', -1, 64)
}
