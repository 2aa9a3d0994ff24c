package shard_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// Benchmarks of the engine. Models are synthesized on first use into the temp dir (the 70b
// shape with 3 layers is ~2.6 GB as q4_0 and takes half a minute to write). peakRSS is the
// process's high-water mark, so it includes the sub-benchmarks before; `strata bench` reports
// each process's memory on its own. Run with
//   make bench BENCH=Stage   or   go test -run '^$' -bench Stage ./shard/
// and read tok/s and peak RSS from the reported metrics.

func benchModel(b *testing.B, preset string, layers int, typ string) string {
	b.Helper()
	return testkit.Model(b, testkit.SynthOptions{Preset: preset, Layers: layers, Seed: 1, Type: typ})
}

// BenchmarkStageDecode measures one token through a stage: the whole model, or one layer's
// worth of a stage (per-token forward of a middle slice).
func BenchmarkStageDecode(b *testing.B) {
	for _, c := range []struct {
		preset string
		layers int
		typ    string
	}{{"small", 0, "f16"}, {"small", 0, "q4_0"}, {"70b", 3, "q4_0"}} {
		path := benchModel(b, c.preset, c.layers, c.typ)
		info, err := shard.ReadModelInfo(path)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range []shard.Range{{Start: 0, End: info.Layers}, {Start: 1, End: 2}} {
			name := fmt.Sprintf("%s-%dL-%s/%s", c.preset, info.Layers, c.typ, map[bool]string{true: "whole", false: "one-middle-layer"}[r.Start == 0])
			b.Run(name, func(b *testing.B) {
				st, err := shard.LoadStage(context.Background(), path, r, shard.WithThreads(runtime.NumCPU()), shard.WithMaxContext(512))
				if err != nil {
					b.Fatal(err)
				}
				defer st.Close()
				if err := st.OpenSession(1); err != nil {
					b.Fatal(err)
				}
				hidden := make([]float32, info.Hidden)
				for i := range hidden {
					hidden[i] = float32(i%7) / 7
				}
				step := func(pos int) {
					s := shard.Step{Session: 1, Positions: []int32{int32(pos)}}
					if r.Start == 0 {
						s.Tokens = []int32{int32(pos % 100)}
					} else {
						s.Hidden = hidden
					}
					if _, err := st.Forward(context.Background(), s); err != nil {
						b.Fatal(err)
					}
				}
				pos := 0
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if pos == 500 {
						b.StopTimer()
						_ = st.CloseSession(1)
						_ = st.OpenSession(1)
						pos = 0
						b.StartTimer()
					}
					step(pos)
					pos++
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tok/s")
				b.ReportMetric(float64(peakRSS())/(1<<20), "peakRSS-MiB")
				b.ReportMetric(float64(info.RangeBytes(r))/(1<<20), "weights-MiB")
			})
		}
	}
}

// peakRSS reads the process's high-water resident set from /proc (Linux).
func peakRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// BenchmarkStageBatch measures how a stage's throughput grows when several sessions' decode
// steps arrive together and run as one batch: one 70B-shaped middle layer (of a 3-layer
// model, so neither the embeddings nor the LM head are in it), q4_0 and q8_0 weights. This
// bounds what concurrent streams can gain on a machine: tok/s at 8 sessions over tok/s at 1.
// The "-plain" variants keep the weights in plain CPU buffers (STRATA_CPU_REPACK=0): the
// patched engine's repacked q4_0 against the unpatched engine's layout, in one run. The
// "-unbatched" variant is --deterministic (WithUnbatched): each session's step runs alone, in
// its own KV cache, so its tok/s at 8 sessions against the batched one is what the flag costs.
func BenchmarkStageBatch(b *testing.B) {
	for _, c := range []struct{ typ, variant string }{{"q4_0", ""}, {"q4_0", "-plain"}, {"q8_0", ""}, {"q4_0", "-unbatched"}} {
		for _, n := range []int{1, 4, 8} {
			b.Run(fmt.Sprintf("70b-%s%s/sessions-%d", c.typ, c.variant, n), func(b *testing.B) {
				if c.variant == "-plain" {
					b.Setenv("STRATA_CPU_REPACK", "0")
				}
				path := benchModel(b, "70b", 3, c.typ)
				info, err := shard.ReadModelInfo(path)
				if err != nil {
					b.Fatal(err)
				}
				hidden := make([]float32, info.Hidden)
				for i := range hidden {
					hidden[i] = float32(i%7) / 7
				}
				opts := []shard.StageOption{shard.WithThreads(runtime.GOMAXPROCS(0)), shard.WithMaxContext(512), shard.WithMaxSessions(n)}
				if c.variant == "-unbatched" {
					opts = append(opts, shard.WithUnbatched())
				}
				st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 1, End: 2}, opts...)
				if err != nil {
					b.Fatal(err)
				}
				defer st.Close()
				reopen := func() {
					for s := range n {
						_ = st.CloseSession(uint64(s + 1))
						if err := st.OpenSession(uint64(s + 1)); err != nil {
							b.Fatal(err)
						}
					}
				}
				reopen()
				pos := 0
				cpu0 := cpuTime()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if pos == 500 {
						b.StopTimer()
						reopen()
						pos = 0
						b.StartTimer()
					}
					var wg sync.WaitGroup
					errs := make([]error, n)
					for s := range n {
						wg.Go(func() {
							_, errs[s] = st.Forward(context.Background(), shard.Step{Session: uint64(s + 1), Positions: []int32{int32(pos)}, Hidden: hidden})
						})
					}
					wg.Wait()
					for _, err := range errs {
						if err != nil {
							b.Fatal(err)
						}
					}
					pos++
				}
				b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "tok/s")
				b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/step")
				b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/float64(b.N), "cpu-ms/step")
				if b.N > 0 {
					b.Logf("weights: %s", shard.FormatWeightBuffers(st.WeightBuffers()))
				}
			})
		}
	}
}

// cpuTime is the CPU time the process has used (user and system, every thread). On a machine
// others load, CPU per step moves far less than wall time: with one ggml thread
// (go test -cpu 1), it is the kernels' work without the waits.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkStagePrefill measures a 128-token prompt chunk through one 70B-shaped q4_0 layer,
// repacked and plain (STRATA_CPU_REPACK=0): ggml's GEMM path, where repacking gains most.
func BenchmarkStagePrefill(b *testing.B) {
	for _, variant := range []string{"", "-plain"} {
		b.Run("70b-q4_0"+variant+"/tokens-128", func(b *testing.B) {
			if variant == "-plain" {
				b.Setenv("STRATA_CPU_REPACK", "0")
			}
			path := benchModel(b, "70b", 3, "q4_0")
			info, err := shard.ReadModelInfo(path)
			if err != nil {
				b.Fatal(err)
			}
			const n = 128
			hidden := make([]float32, n*info.Hidden)
			for i := range hidden {
				hidden[i] = float32(i%7) / 7
			}
			st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 1, End: 2},
				shard.WithThreads(runtime.GOMAXPROCS(0)), shard.WithMaxContext(512), shard.WithMaxBatch(n))
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			cpu0 := cpuTime()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_ = st.CloseSession(1)
				if err := st.OpenSession(1); err != nil {
					b.Fatal(err)
				}
				pos := make([]int32, n)
				for j := range pos {
					pos[j] = int32(j)
				}
				if _, err := st.Forward(context.Background(), shard.Step{Session: 1, Positions: pos, Hidden: hidden}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "tok/s")
			b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/float64(n*b.N), "cpu-ms/token")
			b.Logf("weights: %s", shard.FormatWeightBuffers(st.WeightBuffers()))
		})
	}
}
