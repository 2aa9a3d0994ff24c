package shard_test

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// BenchmarkMoEBatch measures how much batching sessions' decode steps gains on a
// mixture-of-experts layer against a dense one: one middle layer (of 3) of Qwen3-235B-A22B's
// shape with 32 experts instead of 128 (--experts 32: each expert of real size, 8 used per
// token, so a token reads what it reads in the real model) and of Qwen3-8B's dense shape,
// q4_0, at 1, 4 and 8 sessions in one graph. A dense layer's weights are read once for the
// whole batch; a MoE batch's tokens route to different experts, so more of the layer is read
// as the batch grows and batching gains less. Compare tok/s (or cpu-ms/tok, steadier on a
// loaded machine) at 8 sessions over 1, per model. Run with
//
//	go test -run '^$' -bench MoEBatch ./shard/
func BenchmarkMoEBatch(b *testing.B) {
	for _, c := range []struct {
		name string
		o    testkit.SynthOptions
	}{
		{"qwen3moe-235b-a22b-x32", testkit.SynthOptions{Arch: "qwen3moe", Preset: "qwen3-235b-a22b", Layers: 3, Experts: 32, Seed: 1, Type: "q4_0"}},
		{"qwen3-8b-dense", testkit.SynthOptions{Arch: "qwen3", Preset: "qwen3-8b", Layers: 3, Seed: 1, Type: "q4_0"}},
	} {
		for _, n := range []int{1, 4, 8} {
			b.Run(fmt.Sprintf("%s/sessions-%d", c.name, n), func(b *testing.B) {
				benchBatchedLayer(b, testkit.Model(b, c.o), n)
			})
		}
	}
}

// benchBatchedLayer decodes one token for each of n sessions per iteration through the
// middle layer of the 3-layer model at path, the n steps arriving together.
func benchBatchedLayer(b *testing.B, path string, n int) {
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		b.Fatal(err)
	}
	hidden := make([]float32, info.Hidden)
	for i := range hidden {
		hidden[i] = float32(i%7)/7 - 0.4
	}
	st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 1, End: 2},
		shard.WithThreads(runtime.GOMAXPROCS(0)), shard.WithMaxContext(512), shard.WithMaxSessions(n))
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
			// Each session's stream differs, so its tokens route to their own experts.
			h := make([]float32, len(hidden))
			for j := range h {
				h[j] = hidden[(j+97*s)%len(hidden)]
			}
			wg.Go(func() {
				_, errs[s] = st.Forward(context.Background(), shard.Step{Session: uint64(s + 1), Positions: []int32{int32(pos)}, Hidden: h})
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
	b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/float64(n*b.N), "cpu-ms/tok")
}
