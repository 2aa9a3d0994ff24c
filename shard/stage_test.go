package shard_test

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

func loadStage(t *testing.T, path string, r shard.Range, opts ...shard.StageOption) *shard.Stage {
	t.Helper()
	opts = append([]shard.StageOption{shard.WithSliceDir(t.TempDir()), shard.WithCacheType("f32"), shard.WithThreads(1)}, opts...)
	st, err := shard.LoadStage(context.Background(), path, r, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func positions(from, n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(from + i)
	}
	return p
}

func argmax(v []float32) int32 {
	best := 0
	for i := range v {
		if v[i] > v[best] {
			best = i
		}
	}
	return int32(best)
}

// greedyOn decodes n greedy tokens of one session on a whole-model stage.
func greedyOn(t testing.TB, st *shard.Stage, session uint64, prompt []int32, n int) []int32 {
	t.Helper()
	ctx := context.Background()
	out, err := st.Forward(ctx, shard.Step{Session: session, Positions: positions(0, len(prompt)), Tokens: prompt})
	if err != nil {
		t.Error(err)
		return nil
	}
	toks := []int32{argmax(out.Logits)}
	for i := 1; i < n; i++ {
		out, err = st.Forward(ctx, shard.Step{Session: session, Positions: []int32{int32(len(prompt) + i - 1)}, Tokens: toks[i-1:]})
		if err != nil {
			t.Error(err)
			return nil
		}
		toks = append(toks, argmax(out.Logits))
	}
	return toks
}

// TestConcurrentSessionsBatch: sessions stepping at once on one stage are batched into shared
// graphs and each still gets exactly the tokens it gets alone.
func TestConcurrentSessionsBatch(t *testing.T) {
	path := testkit.TinyModel(t)
	st := loadStage(t, path, shard.Range{Start: 0, End: 6}, shard.WithMaxSessions(4))
	prompts := [][]int32{{2048, 10, 20}, {2048, 30}, {2048, 40, 50, 60, 70}, {2048, 5}}
	want := make([][]int32, len(prompts))
	for i, p := range prompts {
		if err := st.OpenSession(uint64(100 + i)); err != nil {
			t.Fatal(err)
		}
		want[i] = greedyOn(t, st, uint64(100+i), p, 16)
		if err := st.CloseSession(uint64(100 + i)); err != nil {
			t.Fatal(err)
		}
	}
	got := make([][]int32, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		if err := st.OpenSession(uint64(i)); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { got[i] = greedyOn(t, st, uint64(i), p, 16) })
	}
	wg.Wait()
	for i := range prompts {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("session %d: concurrent %v, alone %v", i, got[i], want[i])
		}
	}
	if err := st.OpenSession(99); !errors.Is(err, shard.ErrTooManySessions) {
		t.Fatalf("5th session on a 4-session stage: %v, want ErrTooManySessions", err)
	}
	if err := st.CloseSession(0); err != nil {
		t.Fatal(err)
	}
	if err := st.OpenSession(99); err != nil {
		t.Fatalf("closing a session must free its slot: %v", err)
	}
	if again := greedyOn(t, st, 99, prompts[0], 16); !slices.Equal(again, want[0]) {
		t.Fatalf("a reused slot must start clean: %v, want %v", again, want[0])
	}
}

// TestStageRejectsBadInput: each bad step gets an error naming the problem, and the session
// (and every other) keeps working.
func TestStageRejectsBadInput(t *testing.T) {
	path := testkit.TinyModel(t)
	first := loadStage(t, path, shard.Range{Start: 0, End: 3}, shard.WithMaxContext(8))
	mid := loadStage(t, path, shard.Range{Start: 3, End: 6}, shard.WithMaxContext(8))
	ctx := context.Background()
	for _, st := range []*shard.Stage{first, mid} {
		if err := st.OpenSession(1); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.OpenSession(1); !errors.Is(err, shard.ErrSessionExists) {
		t.Fatalf("duplicate session: %v", err)
	}
	hidden := first.Info().Hidden
	nan := make([]float32, hidden)
	nan[3] = float32(math.NaN())
	cases := []struct {
		name string
		st   *shard.Stage
		step shard.Step
		want error
		text string
	}{
		{"unknown session", first, shard.Step{Session: 9, Positions: []int32{0}, Tokens: []int32{1}}, shard.ErrUnknownSession, "9"},
		{"no positions", first, shard.Step{Session: 1}, shard.ErrBadInput, "no positions"},
		{"tokens for positions", first, shard.Step{Session: 1, Positions: positions(0, 2), Tokens: []int32{1}}, shard.ErrBadInput, "1 tokens for 2 positions"},
		{"token outside vocab", first, shard.Step{Session: 1, Positions: []int32{0}, Tokens: []int32{99999}}, shard.ErrBadInput, "outside the vocabulary"},
		{"gap in positions", first, shard.Step{Session: 1, Positions: []int32{0, 2}, Tokens: []int32{1, 2}}, shard.ErrBadInput, "not contiguous"},
		{"wrong start", first, shard.Step{Session: 1, Positions: []int32{5}, Tokens: []int32{1}}, shard.ErrBadInput, "session is at 0"},
		{"context overflow", first, shard.Step{Session: 1, Positions: positions(0, 9), Tokens: make([]int32, 9)}, shard.ErrContextFull, "limit is 8"},
		{"activation length", mid, shard.Step{Session: 1, Positions: []int32{0}, Hidden: make([]float32, hidden-1)}, shard.ErrBadInput, "hidden size 64"},
		{"NaN activation", mid, shard.Step{Session: 1, Positions: []int32{0}, Hidden: nan}, shard.ErrBadInput, "NaN"},
	}
	for _, c := range cases {
		_, err := c.st.Forward(ctx, c.step)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("%s: got %v, want %v mentioning %q", c.name, err, c.want, c.text)
		}
	}
	// The session is unharmed: a good step still runs, and the stage's context bound holds.
	if _, err := first.Forward(ctx, shard.Step{Session: 1, Positions: positions(0, 8), Tokens: make([]int32, 8)}); err != nil {
		t.Fatalf("good step after bad ones: %v", err)
	}
	if _, err := first.Forward(ctx, shard.Step{Session: 1, Positions: []int32{8}, Tokens: []int32{1}}); !errors.Is(err, shard.ErrContextFull) {
		t.Fatalf("9th token of an 8-token context: %v", err)
	}
}

// TestLoadRejectsBadModels: broken files and impossible ranges are clear errors, not panics.
func TestLoadRejectsBadModels(t *testing.T) {
	path := testkit.TinyModel(t)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	other := filepath.Join(dir, "mamba.gguf")
	f, err := os.Create(other)
	if err != nil {
		t.Fatal(err)
	}
	if err := fsggml.WriteGGUF(f, fsggml.KV{"general.architecture": "mamba", "mamba.block_count": uint32(2)}, nil); err != nil {
		t.Fatal(err)
	}
	f.Close()
	corrupt := slices.Clone(data)
	copy(corrupt, "GGXX")
	hostile := slices.Clone(data)
	binary.LittleEndian.PutUint64(hostile[24:], 1<<63) // the first key's length: fs/ggml panics on it
	cases := []struct {
		name, path string
		r          shard.Range
		text       string
	}{
		{"truncated in metadata", write("trunc1.gguf", data[:2000]), shard.Range{Start: 0, End: 6}, "truncated"},
		{"truncated in tensor data", write("trunc2.gguf", data[:len(data)/2]), shard.Range{Start: 0, End: 6}, "exceeds file size"},
		{"empty file", write("empty.gguf", nil), shard.Range{Start: 0, End: 6}, "truncated"},
		{"bad magic", write("magic.gguf", corrupt), shard.Range{Start: 0, End: 6}, "invalid file magic"},
		{"hostile key length", write("hostile.gguf", hostile), shard.Range{Start: 0, End: 6}, "corrupt GGUF"},
		{"unknown architecture", other, shard.Range{Start: 0, End: 1}, `unsupported architecture "mamba"`},
		{"range past the end", path, shard.Range{Start: 4, End: 7}, "outside [0,6)"},
		{"empty range", path, shard.Range{Start: 3, End: 3}, "outside [0,6) or empty"},
		{"negative range", path, shard.Range{Start: -1, End: 2}, "outside"},
		{"missing file", filepath.Join(dir, "nope.gguf"), shard.Range{Start: 0, End: 1}, "no such file"},
	}
	for _, c := range cases {
		st, err := shard.LoadStage(context.Background(), c.path, c.r, shard.WithSliceDir(t.TempDir()))
		if err == nil {
			st.Close()
			t.Errorf("%s: loaded", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.text) {
			t.Errorf("%s: error %q does not mention %q", c.name, err, c.text)
		}
	}
}

// TestSliceHoldsOnlyItsLayers: a middle stage's slice file carries its layers and nothing
// else, so what a node loads follows its slice, not the model.
func TestSliceHoldsOnlyItsLayers(t *testing.T) {
	path := testkit.TinyModel(t)
	whole, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, r := range []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: 6}} {
		p, err := shard.SliceCache{Dir: dir}.Ensure(context.Background(), path, "abc123", r, nil)
		if err != nil {
			t.Fatal(err)
		}
		m, err := shard.ReadModelInfo(p)
		if err != nil {
			t.Fatal(err)
		}
		if m.TotalBytes != whole.RangeBytes(r) {
			t.Errorf("slice %s holds %d tensor bytes, its layers need %d", r, m.TotalBytes, whole.RangeBytes(r))
		}
		if m.SliceOf != "abc123" || m.Layers != whole.Layers {
			t.Errorf("slice %s metadata: slice_of %q, block_count %d", r, m.SliceOf, m.Layers)
		}
		st := loadStage(t, p, r)
		if st.Info().ModelSHA256 != "abc123" {
			t.Errorf("stage from slice %s names model %q", r, st.Info().ModelSHA256)
		}
	}
}

// TestTiedEmbeddings: with no output.weight the last stage reuses token_embd and a split still
// matches the whole model.
func TestTiedEmbeddings(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 2, Type: "f32", Tied: true})
	whole := loadStage(t, path, shard.Range{Start: 0, End: 6})
	a := loadStage(t, path, shard.Range{Start: 0, End: 3})
	b := loadStage(t, path, shard.Range{Start: 3, End: 6})
	ctx := context.Background()
	prompt := []int32{2048, 11, 22, 33}
	for _, st := range []*shard.Stage{whole, a, b} {
		if err := st.OpenSession(1); err != nil {
			t.Fatal(err)
		}
	}
	w, err := whole.Forward(ctx, shard.Step{Session: 1, Positions: positions(0, 4), Tokens: prompt})
	if err != nil {
		t.Fatal(err)
	}
	h, err := a.Forward(ctx, shard.Step{Session: 1, Positions: positions(0, 4), Tokens: prompt})
	if err != nil {
		t.Fatal(err)
	}
	s, err := b.Forward(ctx, shard.Step{Session: 1, Positions: positions(0, 4), Hidden: h.Hidden})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(w.Logits, s.Logits) {
		t.Fatal("tied split logits differ from whole")
	}
}

// TestReplayMatchesStepwise: a session's steps fed again with the same shapes (what recovery
// does after a stage dies) give exactly the logits they gave the first time, so a replayed
// generation continues with the undisturbed tokens. Fed as one prefill instead, they differ
// in low bits: ggml's kernels depend on the batch's shape (logged, for the record). This
// needs flash attention: without it attention runs over every cell between the session's
// first and last, other sessions' masked ones included, so a session replayed into another
// cache slot sums in another order.
func TestReplayMatchesStepwise(t *testing.T) {
	path := testkit.TinyModel(t)
	toks := []int32{2048}
	for i := 1; i < 40; i++ {
		toks = append(toks, int32(i*37%2000))
	}
	for _, cache := range []string{"f16", "f32"} {
		t.Run("cache "+cache, func(t *testing.T) {
			st := loadStage(t, path, shard.Range{Start: 0, End: 6}, shard.WithCacheType(cache), shard.WithMaxSessions(4))
			// Another session in the cache, as on a busy stage: its cells sit between.
			if err := st.OpenSession(9); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Forward(context.Background(), shard.Step{Session: 9, Positions: positions(0, 5), Tokens: toks[3:8]}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			stepwise := func(session uint64) []float32 {
				if err := st.OpenSession(session); err != nil {
					t.Fatal(err)
				}
				// A prompt chunk, then decoded tokens one at a time, as a generation runs.
				out, err := st.Forward(ctx, shard.Step{Session: session, Positions: positions(0, 8), Tokens: toks[:8]})
				if err != nil {
					t.Fatal(err)
				}
				for i := 8; i < len(toks); i++ {
					if out, err = st.Forward(ctx, shard.Step{Session: session, Positions: []int32{int32(i)}, Tokens: toks[i : i+1]}); err != nil {
						t.Fatal(err)
					}
				}
				return out.Logits
			}
			first, again := stepwise(1), stepwise(2)
			if !slices.Equal(first, again) {
				t.Fatal("the same steps replayed give other logits")
			}
			if err := st.OpenSession(3); err != nil {
				t.Fatal(err)
			}
			out, err := st.Forward(ctx, shard.Step{Session: 3, Positions: positions(0, len(toks)), Tokens: toks})
			if err != nil {
				t.Fatal(err)
			}
			var worst float64
			for i := range first {
				worst = max(worst, math.Abs(float64(first[i]-out.Logits[i])))
			}
			t.Logf("one prefill instead of the steps: logits differ by up to %.3g", worst)
		})
	}
}

// TestStagesOfOneProcessComputeAtOnce: two stages loaded in one process (a node moving
// between ranges serves with both for a moment; `strata run --split` keeps several) compute
// at the same time with their own threads, and each gives the logits it gives alone, bit for
// bit. The pinned engine shared one CPU backend, and so one work buffer, between every model
// of a process: f16 weights convert each graph's activations into that buffer, so two graphs
// at once overwrote each other's (NaN in 14-23 of 40 steps) until engine patch 0005.
func TestStagesOfOneProcessComputeAtOnce(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f16"})
	stages := []*shard.Stage{
		loadStage(t, path, shard.Range{Start: 0, End: 6}, shard.WithThreads(2)),
		loadStage(t, path, shard.Range{Start: 0, End: 6}, shard.WithThreads(2)),
	}
	prompt := []int32{2048, 10, 20, 30}
	const steps = 24
	// run decodes steps greedy tokens of one session and keeps every step's logits.
	run := func(st *shard.Stage, session uint64) ([][]float32, error) {
		if err := st.OpenSession(session); err != nil {
			return nil, err
		}
		defer st.CloseSession(session)
		ctx := context.Background()
		var all [][]float32
		step := shard.Step{Session: session, Positions: positions(0, len(prompt)), Tokens: prompt}
		for i := range steps {
			out, err := st.Forward(ctx, step)
			if err != nil {
				return all, err
			}
			all = append(all, out.Logits)
			step = shard.Step{Session: session, Positions: []int32{int32(len(prompt) + i)}, Tokens: []int32{argmax(out.Logits)}}
		}
		return all, nil
	}
	want, err := run(stages[0], 1)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		got := make([][][]float32, len(stages))
		errs := make([]error, len(stages))
		var wg sync.WaitGroup
		for i, st := range stages {
			wg.Go(func() { got[i], errs[i] = run(st, uint64(10*round+i+2)) })
		}
		wg.Wait()
		for i := range stages {
			if errs[i] != nil {
				t.Fatalf("round %d, stage %d: %v", round, i, errs[i])
			}
			for s := range want {
				if !slices.Equal(got[i][s], want[s]) {
					t.Fatalf("round %d, stage %d, step %d: logits differ from the stage computing alone (first logit %v, want %v)",
						round, i, s, got[i][s][0], want[s][0])
				}
			}
		}
	}
}
