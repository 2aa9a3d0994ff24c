package shard_test

import (
	"context"
	"math"
	"slices"
	"sync"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// interleaved steps several sessions in turn on st, one step each per round, closing the
// first after a few rounds and opening another in its slot (a shared cache then reuses its
// freed cells out of order). It returns every step's logits per session.
func interleaved(t *testing.T, st *shard.Stage, prompts [][]int32, steps int) [][][]float32 {
	t.Helper()
	ctx := context.Background()
	logits := make([][][]float32, len(prompts))
	next := make([]int32, len(prompts)) // a session's next token
	pos := make([]int, len(prompts))
	open := func(i int) {
		if err := st.OpenSession(uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	step := func(i int) {
		var s shard.Step
		if pos[i] == 0 {
			s = shard.Step{Session: uint64(i), Positions: positions(0, len(prompts[i])), Tokens: prompts[i]}
		} else {
			s = shard.Step{Session: uint64(i), Positions: []int32{int32(pos[i])}, Tokens: []int32{next[i]}}
		}
		out, err := st.Forward(ctx, s)
		if err != nil {
			t.Fatalf("session %d at %d: %v", i, pos[i], err)
		}
		pos[i] += len(s.Positions)
		next[i] = argmax(out.Logits)
		logits[i] = append(logits[i], out.Logits)
	}
	last := len(prompts) - 1 // opened once the first session has closed
	for i := range last {
		open(i)
	}
	for round := range steps {
		if round == 3 {
			if err := st.CloseSession(0); err != nil {
				t.Fatal(err)
			}
			open(last)
		}
		for i := range prompts {
			if (i == 0 && round >= 3) || (i == last && round < 3) {
				continue
			}
			step(i)
		}
	}
	for i := range last + 1 {
		if i != 0 {
			_ = st.CloseSession(uint64(i))
		}
	}
	return logits
}

// alone runs each session by itself on st, one after another, for as many steps as it took
// in got.
func alone(t *testing.T, st *shard.Stage, prompts [][]int32, got [][][]float32) [][][]float32 {
	t.Helper()
	out := make([][][]float32, len(prompts))
	for i, p := range prompts {
		if err := st.OpenSession(7); err != nil {
			t.Fatal(err)
		}
		out[i] = append(out[i], forward(t, st, shard.Step{Session: 7, Positions: positions(0, len(p)), Tokens: p}))
		for k := 1; k < len(got[i]); k++ {
			tok := argmax(out[i][k-1])
			out[i] = append(out[i], forward(t, st, shard.Step{Session: 7, Positions: []int32{int32(len(p) + k - 1)}, Tokens: []int32{tok}}))
		}
		if err := st.CloseSession(7); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func forward(t *testing.T, st *shard.Stage, s shard.Step) []float32 {
	t.Helper()
	out, err := st.Forward(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	return out.Logits
}

// TestUnbatchedSessionsAreIndependent: on a stage with WithUnbatched, sessions that take
// turns (and a session that reuses a closed one's slot) get, step by step, logits bit-identical
// to those they get alone on a default stage. That is what --deterministic promises: a
// session's computation does not depend on what else the stage serves. q8_0 weights and the
// default f16 KV cache, as nodes run by default.
func TestUnbatchedSessionsAreIndependent(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "q8_0"})
	opts := []shard.StageOption{shard.WithCacheType("f16"), shard.WithMaxSessions(4), shard.WithMaxContext(512)}
	prompts := [][]int32{{2048, 10, 20}, {2048, 30}, {2048, 40, 50, 60, 70, 80, 90}, {2048, 5, 6}}
	const rounds = 24
	det := loadStage(t, path, shard.Range{Start: 0, End: 6}, append(opts, shard.WithUnbatched())...)
	got := interleaved(t, det, prompts, rounds)

	solo := loadStage(t, path, shard.Range{Start: 0, End: 6}, opts...)
	want := alone(t, solo, prompts, got)
	for i := range prompts {
		if d := stepsDiff(got[i], want[i]); d != 0 {
			t.Errorf("session %d: logits differ from the session alone by up to %g", i, d)
		}
	}
	// The shared cache, for the record: the same turns on a default stage.
	shared := loadStage(t, path, shard.Range{Start: 0, End: 6}, opts...)
	s := interleaved(t, shared, prompts, rounds)
	for i := range prompts {
		t.Logf("session %d (%d steps): shared cache differs from alone by up to %g", i, len(got[i]), stepsDiff(s[i], want[i]))
	}
}

func stepsDiff(a, b [][]float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	d := 0.0
	for i := range a {
		for j := range a[i] {
			d = max(d, math.Abs(float64(a[i][j]-b[i][j])))
		}
	}
	return d
}

// BenchmarkConcurrentDivergence counts how many concurrent greedy streams (16 clients, three
// streams of 16 to 63 tokens each) differ from the same stream alone, per weight type, on a default stage (steps batched, one
// shared KV cache) and on an unbatched one (--deterministic: a cache per session). Not a
// speed: each run reports the diverged streams, for the README's table.
//
//	go test -run XXX -bench ConcurrentDivergence -benchtime 1x ./shard/
func BenchmarkConcurrentDivergence(b *testing.B) {
	const streams, tokens = 16, 64
	prompts := make([][]int32, streams)
	for i := range prompts {
		prompts[i] = []int32{2048 - 1 - int32(i), int32(10 + 7*i), int32(20 + 3*i)}
	}
	for _, typ := range []string{"f32", "f16", "q8_0", "q4_0"} {
		for _, mode := range []string{"batched", "unbatched"} {
			b.Run(typ+"/"+mode, func(b *testing.B) {
				path := testkit.Model(b, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: typ})
				opts := []shard.StageOption{shard.WithSliceDir(b.TempDir()), shard.WithThreads(1), shard.WithMaxSessions(streams), shard.WithMaxContext(256)}
				if mode == "unbatched" {
					opts = append(opts, shard.WithUnbatched())
				}
				st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 0, End: 6}, opts...)
				if err != nil {
					b.Fatal(err)
				}
				defer st.Close()
				alone := make([][]int32, streams)
				for i, p := range prompts {
					if err := st.OpenSession(uint64(i)); err != nil {
						b.Fatal(err)
					}
					alone[i] = greedyOn(b, st, uint64(i), p, tokens)
					_ = st.CloseSession(uint64(i))
				}
				// Each client runs three streams of different lengths one after another, so
				// sessions end and start at different times and new ones reuse freed cells.
				diverged, total := 0, 0
				var mu sync.Mutex
				for range b.N {
					var wg sync.WaitGroup
					for i, p := range prompts {
						wg.Go(func() {
							for round := range 3 {
								n := 16 + (i*5+round*17)%(tokens-16)
								id := uint64(100*round + i)
								if err := st.OpenSession(id); err != nil {
									b.Error(err)
									return
								}
								got := greedyOn(b, st, id, p, n)
								_ = st.CloseSession(id)
								mu.Lock()
								total++
								if !slices.Equal(got, alone[i][:n]) {
									diverged++
								}
								mu.Unlock()
							}
						})
					}
					wg.Wait()
				}
				b.ReportMetric(float64(diverged), "diverged")
				b.ReportMetric(float64(total), "streams")
			})
		}
	}
}
