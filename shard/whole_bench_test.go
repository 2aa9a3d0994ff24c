package shard_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/shard"
)

// BenchmarkWholeAB measures engine settings side by side in one process, on a machine others
// load: the whole 70B-shaped 3-layer q4_0 model (embeddings and the 128256-token LM head
// included) is loaded once per setting, and the settings take turns, each repetition a
// 128-token prompt chunk then single-token decode steps, so that a neighbour's burst slows
// both alike. It reports the fastest repetition of each setting, and the median over
// repetitions of each setting's time against the first's (a ratio > 1: faster than the first).
//
// STRATA_AB lists the settings, separated by ';', each a comma-separated list of
// repack=0 (STRATA_CPU_REPACK=0), hugepages=0 (STRATA_HUGEPAGES=0), fa=0 (no flash
// attention), kv=f32|f16, threads=N, maxbatch=N; an empty one is the defaults. E.g.
//
//	STRATA_AB='hugepages=0;' go test -run '^$' -bench WholeAB -benchtime 1x ./shard/
//
// STRATA_BENCH_REPS (default 4) and STRATA_BENCH_DECODE (default 16, decode steps per
// repetition) size the run; STRATA_BENCH_LAYERS (default 3) picks the model.
func BenchmarkWholeAB(b *testing.B) {
	specs := strings.Split(os.Getenv("STRATA_AB"), ";")
	if len(specs) < 2 {
		specs = []string{"hugepages=0", ""}
	}
	path := benchModel(b, "70b", envInt("STRATA_BENCH_LAYERS", 3), "q4_0")
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		b.Fatal(err)
	}
	reps, decode := envInt("STRATA_BENCH_REPS", 4), envInt("STRATA_BENCH_DECODE", 16)
	type setting = abSetting
	var sets []*setting
	for _, spec := range specs {
		s := &setting{spec: spec}
		opts := []shard.StageOption{shard.WithThreads(runtime.GOMAXPROCS(0)), shard.WithMaxContext(512), shard.WithMaxSessions(1)}
		for _, kv := range strings.Split(spec, ",") {
			k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
			switch k {
			case "":
			case "repack":
				s.env = append(s.env, [2]string{"STRATA_CPU_REPACK", v})
			case "hugepages":
				s.env = append(s.env, [2]string{"STRATA_HUGEPAGES", v})
			case "fa":
				opts = append(opts, shard.WithFlashAttention(v != "0"))
			case "kv":
				opts = append(opts, shard.WithCacheType(v))
			case "threads":
				n, _ := strconv.Atoi(v)
				opts = append(opts, shard.WithThreads(n))
			case "maxbatch":
				n, _ := strconv.Atoi(v)
				opts = append(opts, shard.WithMaxBatch(n))
			default:
				b.Fatalf("unknown setting %q in %q", k, spec)
			}
		}
		restore := s.apply()
		s.st, err = shard.LoadStage(context.Background(), path, shard.Range{Start: 0, End: info.Layers}, opts...)
		restore()
		if err != nil {
			b.Fatal(err)
		}
		defer s.st.Close()
		b.Logf("[%s] weights: %s", spec, shard.FormatWeightBuffers(s.st.WeightBuffers()))
		sets = append(sets, s)
	}
	if m, err := os.ReadFile("/proc/self/smaps_rollup"); err == nil {
		for _, line := range strings.Split(string(m), "\n") {
			if strings.HasPrefix(line, "AnonHugePages:") {
				b.Logf("loaded: %s", strings.Join(strings.Fields(line), " "))
			}
		}
	}
	const n = 128
	pos := make([]int32, n)
	toks := make([]int32, n)
	for j := range pos {
		pos[j], toks[j] = int32(j), int32(j*7919%100000)
	}
	forward := func(s *setting, step shard.Step) {
		restore := s.apply() // compute buffers are allocated at a graph's first run
		defer restore()
		if _, err := s.st.Forward(context.Background(), step); err != nil {
			b.Fatal(err)
		}
	}
	if os.Getenv("STRATA_BENCH_WARM") != "" {
		// As `strata bench` warms up: a 2-token step, so the first prompt chunk's graph is new.
		for _, s := range sets {
			_ = s.st.OpenSession(1)
			forward(s, shard.Step{Session: 1, Positions: []int32{0, 1}, Tokens: []int32{1, 2}})
			t := time.Now()
			forward(s, shard.Step{Session: 1, Positions: []int32{2}, Tokens: []int32{3}})
			b.Logf("[%s] warm-up decode step %.3f s", s.spec, time.Since(t).Seconds())
		}
	}
	for range b.N {
		for rep := range reps {
			order := slices.Clone(sets)
			if rep%2 == 1 {
				slices.Reverse(order)
			}
			for _, s := range order {
				_ = s.st.CloseSession(1)
				if err := s.st.OpenSession(1); err != nil {
					b.Fatal(err)
				}
				t, c := time.Now(), cpuTime()
				forward(s, shard.Step{Session: 1, Positions: pos, Tokens: toks})
				s.pre = append(s.pre, time.Since(t).Seconds())
				s.preCPU = append(s.preCPU, (cpuTime() - c).Seconds())
			}
			// Decode steps take turns one by one: a neighbour's burst lands on both alike.
			for j := range decode {
				for _, s := range order {
					t, c := time.Now(), cpuTime()
					forward(s, shard.Step{Session: 1, Positions: []int32{int32(n + j)}, Tokens: []int32{int32(j)}})
					s.dec = append(s.dec, time.Since(t).Seconds())
					s.decCPU = append(s.decCPU, (cpuTime() - c).Seconds())
				}
			}
		}
	}
	median := func(x []float64) float64 {
		y := slices.Clone(x)
		slices.Sort(y)
		return y[len(y)/2]
	}
	ratios := func(base, x []float64) []float64 {
		r := make([]float64, len(x))
		for i := range x {
			r[i] = base[i] / x[i]
		}
		return r
	}
	for i, s := range sets {
		name := fmt.Sprintf("%d", i)
		b.ReportMetric(n/slices.Min(s.pre), "prefill-tok/s-"+name)
		b.ReportMetric(1/slices.Min(s.dec), "decode-tok/s-"+name)
		b.Logf("[%s] prefill tok/s best %.1f, CPU ms/token best %.2f; decode tok/s best %.2f (step %.1f ms), CPU ms/step best %.1f",
			s.spec, n/slices.Min(s.pre), slices.Min(s.preCPU)*1e3/n, 1/slices.Min(s.dec), slices.Min(s.dec)*1e3, slices.Min(s.decCPU)*1e3)
		b.Logf("[%s] prefill s %.3f; decode s/step median %.4f", s.spec, s.pre, median(s.dec))
		if i > 0 {
			b.Logf("[%s] vs [%s]: prefill %.3fx (median of %d, CPU %.3fx), decode %.3fx (CPU %.3fx)", s.spec, sets[0].spec,
				median(ratios(sets[0].pre, s.pre)), len(s.pre), median(ratios(sets[0].preCPU, s.preCPU)),
				median(ratios(sets[0].dec, s.dec)), median(ratios(sets[0].decCPU, s.decCPU)))
		}
	}
}

type abSetting struct {
	spec     string
	env      [][2]string
	st       *shard.Stage
	pre, dec []float64 // seconds per prompt chunk, per decode step
	preCPU   []float64
	decCPU   []float64
}

// apply sets the setting's environment and returns what undoes it.
func (s *abSetting) apply() func() {
	var undo []func()
	for _, kv := range s.env {
		old, had := os.LookupEnv(kv[0])
		os.Setenv(kv[0], kv[1])
		undo = append(undo, func() {
			if had {
				os.Setenv(kv[0], old)
			} else {
				os.Unsetenv(kv[0])
			}
		})
	}
	return func() {
		for _, u := range undo {
			u()
		}
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
