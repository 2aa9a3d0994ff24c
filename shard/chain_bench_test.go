package shard_test

import (
	"context"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/strata-llm/strata/shard"
)

// BenchmarkChainAB takes a swarm's per-token cost apart without a network: the 70B-shaped
// 4-layer q4_0 model loaded whole and as the 3 stages `strata bench --nodes 3` plans
// ([0,1) [1,3) [3,4)), in one process, decode steps taking turns. A chain step is the three
// stages' forwards one after another, each handing its hidden state on, as nodes do. The
// log gives each stage's compute per step (shard.Timing) beside the whole model's.
func BenchmarkChainAB(b *testing.B) {
	path := benchModel(b, "70b", 4, "q4_0")
	opts := []shard.StageOption{shard.WithThreads(runtime.GOMAXPROCS(0)), shard.WithMaxContext(512), shard.WithMaxSessions(1)}
	load := func(r shard.Range) *shard.Stage {
		st, err := shard.LoadStage(context.Background(), path, r, opts...)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { st.Close() })
		return st
	}
	whole := load(shard.Range{Start: 0, End: 4})
	chain := []*shard.Stage{load(shard.Range{Start: 0, End: 1}), load(shard.Range{Start: 1, End: 3}), load(shard.Range{Start: 3, End: 4})}
	if os.Getenv("STRATA_CHAIN_B") == "whole" {
		// A second copy of the whole model instead of the chain: what two loads of the same
		// weights differ by, taking turns in one process (where the pages landed).
		chain = []*shard.Stage{load(shard.Range{Start: 0, End: 4})}
	}
	all := append([]*shard.Stage{whole}, chain...)
	for _, st := range all {
		if err := st.OpenSession(1); err != nil {
			b.Fatal(err)
		}
	}
	forward := func(st *shard.Stage, step shard.Step) shard.Output {
		out, err := st.Forward(context.Background(), step)
		if err != nil {
			b.Fatal(err)
		}
		return out
	}
	run := func(stages []*shard.Stage, pos int32, tok int32) {
		step := shard.Step{Session: 1, Positions: []int32{pos}, Tokens: []int32{tok}}
		for i, st := range stages {
			out := forward(st, step)
			if i < len(stages)-1 {
				step = shard.Step{Session: 1, Positions: []int32{pos}, Hidden: out.Hidden}
			}
		}
	}
	decode := envInt("STRATA_BENCH_DECODE", 48)
	only := os.Getenv("STRATA_CHAIN_ONLY")
	var wholeT, chainT []float64
	before := make([]shard.Timing, len(all))
	for i, st := range all {
		before[i] = st.Timing()
	}
	for range b.N {
		for j := range decode {
			pos := int32(j)
			// STRATA_CHAIN_ONLY=whole or chain runs one side alone, for a profiler.
			if only != "chain" {
				t := time.Now()
				run([]*shard.Stage{whole}, pos, int32(j))
				wholeT = append(wholeT, time.Since(t).Seconds())
			}
			if only != "whole" {
				t := time.Now()
				run(chain, pos, int32(j))
				chainT = append(chainT, time.Since(t).Seconds())
			}
		}
	}
	med := func(x []float64) float64 {
		if len(x) == 0 {
			return 0
		}
		y := slices.Clone(x)
		slices.Sort(y)
		return y[len(y)/2]
	}
	b.Logf("whole step median %.1f ms, chain step median %.1f ms: chain/whole %.3f", med(wholeT)*1e3, med(chainT)*1e3, med(chainT)/med(wholeT))
	for i, st := range all {
		tm := st.Timing()
		n := float64(tm.DecodeBatches - before[i].DecodeBatches)
		b.Logf("stage %s: compute %.1f ms per decode step", st.Info().Range, (tm.DecodeCompute-before[i].DecodeCompute).Seconds()*1e3/n)
	}
}
