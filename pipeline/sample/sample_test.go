package sample

import (
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"
)

// logits5 has softmax (T=1) 0.5630, 0.2071, 0.1256, 0.0762, 0.0280; cumulative 0.5630,
// 0.7701, 0.8957, 0.9720, 1.
var logits5 = []float32{2, 1, 0.5, 0, -1}

// distribution is the exact distribution Sample draws from, through the same filter code,
// as token -> probability.
func distribution(t *testing.T, logits []float32, p Params, recent []int32) map[int32]float64 {
	t.Helper()
	var s Sampler
	work := s.prepare(logits, p, recent)
	_, best := argmax(work)
	invT := 1 / float64(p.Temperature)
	cand, truncated := s.filter(work, p, best, invT)
	if !truncated {
		for i, v := range work {
			cand = append(cand, candidate{id: int32(i), logit: v, w: math.Exp((float64(v) - float64(best)) * invT)})
		}
	}
	var total float64
	for _, c := range cand {
		total += c.w
	}
	out := make(map[int32]float64, len(cand))
	for _, c := range cand {
		out[c.id] = c.w / total
	}
	return out
}

// softmax computes the reference distribution by the textbook formula.
func softmax(logits []float32, temp float64, keep []int32) map[int32]float64 {
	var z float64
	for _, id := range keep {
		z += math.Exp(float64(logits[id]) / temp)
	}
	out := make(map[int32]float64, len(keep))
	for _, id := range keep {
		out[id] = math.Exp(float64(logits[id])/temp) / z
	}
	return out
}

func keys(m map[int32]float64) []int32 {
	ks := make([]int32, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func assertDist(t *testing.T, got, want map[int32]float64) {
	t.Helper()
	if !slices.Equal(keys(got), keys(want)) {
		t.Fatalf("kept tokens %v, want %v", keys(got), keys(want))
	}
	for id, w := range want {
		if math.Abs(got[id]-w) > 1e-7 {
			t.Errorf("p(%d) = %.6f, want %.6f", id, got[id], w)
		}
	}
}

func TestFilters(t *testing.T) {
	all := []int32{0, 1, 2, 3, 4}
	tests := []struct {
		name string
		p    Params
		keep []int32
		temp float64
	}{
		{"temperature 1", Params{Temperature: 1}, all, 1},
		{"temperature 0.5", Params{Temperature: 0.5}, all, 0.5},
		{"temperature 2", Params{Temperature: 2}, all, 2},
		{"top_k 2", Params{Temperature: 1, TopK: 2}, []int32{0, 1}, 1},
		{"top_k 1", Params{Temperature: 1, TopK: 1}, []int32{0}, 1},
		{"top_k beyond vocab", Params{Temperature: 1, TopK: 99}, all, 1},
		{"top_p 0.5 keeps the crossing token", Params{Temperature: 1, TopP: 0.5}, []int32{0}, 1},
		{"top_p 0.75", Params{Temperature: 1, TopP: 0.75}, []int32{0, 1}, 1},
		{"top_p 0.8", Params{Temperature: 1, TopP: 0.8}, []int32{0, 1, 2}, 1},
		{"top_p 0.9", Params{Temperature: 1, TopP: 0.9}, []int32{0, 1, 2, 3}, 1},
		{"top_p 1 is off", Params{Temperature: 1, TopP: 1}, all, 1},
		// At T=0.5 the probabilities are 0.8292, 0.1122, 0.0413, 0.0152, 0.0021.
		{"top_p after temperature", Params{Temperature: 0.5, TopP: 0.9}, []int32{0, 1}, 0.5},
		// top_k 3 renormalizes to 0.6285, 0.2312, 0.1402: top_p 0.8 then keeps two, not three.
		{"top_p after top_k renormalizes", Params{Temperature: 1, TopK: 3, TopP: 0.8}, []int32{0, 1}, 1},
		// min_p 0.2: 0.2*0.5630 = 0.1126 keeps 0.1256 (token 2), drops 0.0762.
		{"min_p 0.2", Params{Temperature: 1, MinP: 0.2}, []int32{0, 1, 2}, 1},
		{"min_p 0.3", Params{Temperature: 1, MinP: 0.3}, []int32{0, 1}, 1},
		{"min_p 1", Params{Temperature: 1, MinP: 1}, []int32{0}, 1},
		{"min_p after top_p", Params{Temperature: 1, TopP: 0.9, MinP: 0.2}, []int32{0, 1, 2}, 1},
		// top_k 4 renormalizes to 0.5793, 0.2131, 0.1292, 0.0784; top_p 0.95 keeps all four;
		// min_p 0.15 cuts at 0.0869 and drops token 3.
		{"all filters", Params{Temperature: 1, TopK: 4, TopP: 0.95, MinP: 0.15}, []int32{0, 1, 2}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assertDist(t, distribution(t, logits5, tc.p, nil), softmax(logits5, tc.temp, tc.keep))
		})
	}
}

func TestFilterHandValues(t *testing.T) {
	// Numbers worked out by hand, independent of the softmax helper.
	got := distribution(t, logits5, Params{Temperature: 1, TopK: 2}, nil)
	if math.Abs(got[0]-0.7311) > 1e-4 || math.Abs(got[1]-0.2689) > 1e-4 {
		t.Errorf("top_k 2: %v, want 0.7311, 0.2689", got)
	}
	got = distribution(t, logits5, Params{Temperature: 0.5}, nil)
	// e^4, e^2, e^1, e^0, e^-2 over their sum 65.84.
	if math.Abs(got[0]-0.8292) > 1e-4 || math.Abs(got[4]-0.0021) > 1e-4 {
		t.Errorf("T=0.5: %v, want p0 0.8292, p4 0.0021", got)
	}
}

func TestRepeatPenalty(t *testing.T) {
	var s Sampler
	// 2 is positive: divided; 0 stays 0; -1 negative: multiplied; duplicates count once.
	work := s.prepare(logits5, Params{RepeatPenalty: 2}, []int32{0, 3, 4, 4, 4})
	want := []float32{1, 1, 0.5, 0, -2}
	if !slices.Equal(work, want) {
		t.Fatalf("penalized %v, want %v", work, want)
	}
	// Only the last RepeatLastN tokens count.
	work = s.prepare(logits5, Params{RepeatPenalty: 2, RepeatLastN: 2}, []int32{0, 1, 4, 4})
	want = []float32{2, 1, 0.5, 0, -2}
	if !slices.Equal(work, want) {
		t.Fatalf("last 2: penalized %v, want %v", work, want)
	}
	// Out-of-range ids are ignored, and the seen-set is clean for the next call.
	work = s.prepare(logits5, Params{RepeatPenalty: 2}, []int32{-1, 5, 1 << 30, 1})
	want = []float32{2, 0.5, 0.5, 0, -1}
	if !slices.Equal(work, want) {
		t.Fatalf("out of range: penalized %v, want %v", work, want)
	}
	// Penalty 1 and 0 are off.
	for _, pen := range []float32{0, 1} {
		work = s.prepare(logits5, Params{RepeatPenalty: pen}, []int32{0, 1})
		if !slices.Equal(work, logits5) {
			t.Fatalf("penalty %v changed logits: %v", pen, work)
		}
	}
	// Greedy honours the penalty: 0 and 1 tie at 1.0, the lower id wins.
	tok, _ := Sample([]float32{2, 1.5, 0}, Params{RepeatPenalty: 2}, []int32{0}, 0)
	if tok != 1 {
		t.Fatalf("greedy with penalty picked %d, want 1", tok)
	}
	// And the sampled distribution uses the penalized logits.
	got := distribution(t, logits5, Params{Temperature: 1, RepeatPenalty: 2}, []int32{0})
	assertDist(t, got, softmax([]float32{1, 1, 0.5, 0, -1}, 1, []int32{0, 1, 2, 3, 4}))
}

func TestGreedy(t *testing.T) {
	logits := []float32{0.5, 3, -2, 3, 1}
	tok, lp := Sample(logits, Params{}, nil, 7)
	if tok != 1 {
		t.Fatalf("greedy picked %d, want 1 (lowest id of the tie)", tok)
	}
	var z float64
	for _, v := range logits {
		z += math.Exp(float64(v))
	}
	want := 3 - math.Log(z)
	if math.Abs(float64(lp)-want) > 1e-6 {
		t.Fatalf("logprob %v, want %v", lp, want)
	}
	// Negative temperature is greedy too.
	if tok, _ := Sample(logits, Params{Temperature: -1, Seed: 9}, nil, 3); tok != 1 {
		t.Fatalf("negative temperature picked %d", tok)
	}
}

func TestLogprobIsModelDistribution(t *testing.T) {
	// Whatever the filters, logprob is log softmax of the logits as given.
	p := Params{Temperature: 0.7, TopK: 3, TopP: 0.9, RepeatPenalty: 1.3, Seed: 42}
	for pos := range int32(50) {
		tok, lp := Sample(logits5, p, []int32{0}, pos)
		want := math.Log(softmax(logits5, 1, []int32{0, 1, 2, 3, 4})[tok])
		if math.Abs(float64(lp)-want) > 1e-6 {
			t.Fatalf("pos %d tok %d: logprob %v, want %v", pos, tok, lp, want)
		}
	}
}

func TestDoesNotModifyLogits(t *testing.T) {
	logits := slices.Clone(logits5)
	var s Sampler
	for _, p := range []Params{{}, {Temperature: 1}, {Temperature: 0.5, TopK: 2, RepeatPenalty: 3}, {Temperature: 1, TopP: 0.5, MinP: 0.1, RepeatPenalty: 2}} {
		s.Sample(logits, p, []int32{0, 1, 2, 3, 4}, 1)
		if !slices.Equal(logits, logits5) {
			t.Fatalf("params %+v modified logits: %v", p, logits)
		}
	}
}

// chiSquare returns Pearson's statistic of counts against probabilities.
func chiSquare(counts map[int32]int, probs map[int32]float64, n int) float64 {
	var x2 float64
	for id, p := range probs {
		e := p * float64(n)
		d := float64(counts[id]) - e
		x2 += d * d / e
	}
	return x2
}

// chi-square critical values at p = 0.001, by degrees of freedom.
var chi2Crit = map[int]float64{1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}

func TestEmpiricalFrequencies(t *testing.T) {
	const n = 40000
	cases := []struct {
		p      Params
		recent []int32
	}{
		{Params{Temperature: 1, Seed: 1}, nil},
		{Params{Temperature: 0.5, Seed: 2}, nil},
		{Params{Temperature: 1.5, TopK: 3, Seed: 3}, nil},
		{Params{Temperature: 1, TopP: 0.9, Seed: 4}, nil},
		{Params{Temperature: 1, MinP: 0.2, Seed: 5}, nil},
		{Params{Temperature: 0.8, RepeatPenalty: 1.5, Seed: 6}, []int32{0, 2}},
	}
	for _, tc := range cases {
		probs := distribution(t, logits5, tc.p, tc.recent)
		counts := map[int32]int{}
		var s Sampler
		for pos := range int32(n) {
			tok, _ := s.Sample(logits5, tc.p, tc.recent, pos)
			if _, ok := probs[tok]; !ok {
				t.Fatalf("%+v: drew %d, outside the kept set %v", tc.p, tok, keys(probs))
			}
			counts[tok]++
		}
		df := len(probs) - 1
		x2 := chiSquare(counts, probs, n)
		if x2 > chi2Crit[df] {
			t.Errorf("%+v: chi-square %.2f > %.2f (df %d); counts %v, probs %v", tc.p, x2, chi2Crit[df], df, counts, probs)
		}
		t.Logf("%+v: chi-square %.2f (df %d)", tc.p, x2, df)
	}
}

func TestDeterminism(t *testing.T) {
	p := Params{Temperature: 1.2, TopP: 0.95, Seed: 12345}
	rng := rand.New(rand.NewPCG(1, 2))
	logits := make([]float32, 1000)
	for i := range logits {
		logits[i] = float32(rng.NormFloat64() * 2)
	}
	var a, b Sampler
	var seqA, seqB, seqC []int32
	for pos := range int32(200) {
		ta, _ := a.Sample(logits, p, nil, pos)
		seqA = append(seqA, ta)
	}
	// Another sampler, positions in reverse (as a replay after failover might interleave):
	// each position gives the same token.
	for pos := int32(199); pos >= 0; pos-- {
		tb, _ := b.Sample(logits, p, nil, pos)
		seqB = append([]int32{tb}, seqB...)
	}
	if !slices.Equal(seqA, seqB) {
		t.Fatal("same (seed, position) gave different tokens")
	}
	p.Seed = 12346
	for pos := range int32(200) {
		tc, _ := Sample(logits, p, nil, pos)
		seqC = append(seqC, tc)
	}
	if slices.Equal(seqA, seqC) {
		t.Fatal("a different seed gave the same 200 tokens")
	}
}

func TestUniform(t *testing.T) {
	// Mean and bucket spread of the per-position draw, over neighbouring positions and seeds.
	const n = 100000
	var buckets [10]int
	var sum float64
	for i := range n {
		u := uniform(uint64(i%7), int32(i))
		if u < 0 || u >= 1 {
			t.Fatalf("uniform out of [0,1): %v", u)
		}
		sum += u
		buckets[int(u*10)]++
	}
	if m := sum / n; math.Abs(m-0.5) > 0.005 {
		t.Errorf("mean %v", m)
	}
	var x2 float64
	for _, c := range buckets {
		d := float64(c) - n/10
		x2 += d * d / (n / 10)
	}
	if x2 > 27.88 { // df 9, p = 0.001
		t.Errorf("bucket chi-square %.2f: %v", x2, buckets)
	}
}

// reference is a straightforward full-sort implementation of the filters, to check the
// heap and widening-threshold shortcuts on a larger vocabulary.
func reference(logits []float32, p Params) []int32 {
	type tw struct {
		id int32
		l  float64
	}
	all := make([]tw, len(logits))
	for i, v := range logits {
		all[i] = tw{int32(i), float64(v) / float64(p.Temperature)}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].l > all[j].l })
	if p.TopK > 0 && p.TopK < len(all) {
		all = all[:p.TopK]
	}
	probs := make([]float64, len(all))
	var z float64
	for i, c := range all {
		probs[i] = math.Exp(c.l - all[0].l)
		z += probs[i]
	}
	for i := range probs {
		probs[i] /= z
	}
	if p.TopP > 0 && p.TopP < 1 {
		var cum float64
		for i, pr := range probs {
			cum += pr
			if cum >= float64(p.TopP) {
				all, probs = all[:i+1], probs[:i+1]
				break
			}
		}
	}
	if p.MinP > 0 {
		k := 1
		for k < len(probs) && probs[k] >= float64(p.MinP)*probs[0] {
			k++
		}
		all = all[:k]
	}
	ids := make([]int32, len(all))
	for i, c := range all {
		ids[i] = c.id
	}
	slices.Sort(ids)
	return ids
}

func TestFiltersMatchReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	logits := make([]float32, 5000)
	for trial := range 40 {
		scale := []float64{0.5, 2, 5, 10}[trial%4]
		for i := range logits {
			logits[i] = float32(rng.NormFloat64() * scale)
		}
		for _, p := range []Params{
			{Temperature: 1, TopK: 40},
			{Temperature: 0.7, TopK: 500},
			{Temperature: 1, TopP: 0.9},
			{Temperature: 1.5, TopP: 0.99},
			{Temperature: 0.3, TopP: 0.5},
			{Temperature: 1, MinP: 0.05},
			{Temperature: 1, MinP: 1e-6},
			{Temperature: 1, TopK: 40, TopP: 0.9, MinP: 0.05},
			{Temperature: 1.1, TopP: 0.95, MinP: 0.01},
		} {
			got := keys(distribution(t, logits, p, nil))
			want := reference(logits, p)
			if !slices.Equal(got, want) {
				t.Fatalf("trial %d scale %v %+v: kept %d tokens, reference %d", trial, scale, p, len(got), len(want))
			}
		}
	}
}

func TestBadInput(t *testing.T) {
	if tok, lp := Sample(nil, Params{Temperature: 1}, nil, 0); tok != -1 || !math.IsInf(float64(lp), -1) {
		t.Fatalf("empty logits: %d %v", tok, lp)
	}
	nan := float32(math.NaN())
	inf := float32(math.Inf(1))
	ninf := float32(math.Inf(-1))
	if tok, _ := Sample([]float32{nan, ninf, nan}, Params{Temperature: 1}, nil, 0); tok != -1 {
		t.Fatalf("no usable logit: got %d", tok)
	}
	// NaN never wins; +Inf wins and keeps a finite logprob.
	tok, lp := Sample([]float32{nan, 1, inf, 2}, Params{}, nil, 0)
	if tok != 2 || lp != 0 {
		t.Fatalf("+Inf logit: tok %d logprob %v", tok, lp)
	}
	for pos := range int32(100) {
		tok, _ := Sample([]float32{nan, 1, nan, 2}, Params{Temperature: 1, TopP: 0.99, MinP: 0.01}, nil, pos)
		if tok != 1 && tok != 3 {
			t.Fatalf("drew NaN token %d", tok)
		}
		tok, _ = Sample([]float32{nan, 1, nan, 2}, Params{Temperature: 1}, nil, pos)
		if tok != 1 && tok != 3 {
			t.Fatalf("full draw picked NaN token %d", tok)
		}
	}
	// Out-of-range and NaN params degrade to "off" rather than panicking.
	for _, p := range []Params{
		{Temperature: float32(math.NaN())},
		{Temperature: 1e-45},
		{Temperature: 1, TopK: -3, TopP: -1, MinP: 7, RepeatPenalty: -2},
		{Temperature: 1, TopP: float32(math.NaN()), MinP: float32(math.NaN()), RepeatPenalty: float32(math.NaN())},
	} {
		tok, _ := Sample(logits5, p, []int32{0, -9, 99}, -5)
		if tok < 0 || tok > 4 {
			t.Fatalf("%+v: token %d", p, tok)
		}
	}
}

func TestValidateAndSeed(t *testing.T) {
	if err := (Params{}).Validate(); err != nil {
		t.Fatalf("zero params: %v", err)
	}
	if err := (Params{Temperature: 0.7, TopK: 40, TopP: 0.9, MinP: 0.05, RepeatPenalty: 1.1, Seed: 3}).Validate(); err != nil {
		t.Fatalf("typical params: %v", err)
	}
	for _, p := range []Params{{Temperature: -1}, {TopK: -1}, {TopP: 1.5}, {MinP: -0.1}, {RepeatPenalty: -1}, {Temperature: float32(math.NaN())}} {
		if err := p.Validate(); err == nil {
			t.Errorf("%+v: no error", p)
		}
	}
	if s := (Params{}).WithRandomSeed().Seed; s == 0 {
		t.Fatal("WithRandomSeed left seed 0")
	}
	if s := (Params{Seed: 5}).WithRandomSeed().Seed; s != 5 {
		t.Fatalf("WithRandomSeed replaced an explicit seed: %d", s)
	}
}

func TestExpNeg(t *testing.T) {
	for x := -720.0; x <= 0; x += 0.0137 {
		got, want := expNeg(x), math.Exp(x)
		if want < 1e-300 {
			if got > 1e-300 {
				t.Fatalf("expNeg(%v) = %v, want ~0", x, got)
			}
			continue
		}
		if math.Abs(got-want)/want > 1e-8 {
			t.Fatalf("expNeg(%v) = %v, want %v", x, got, want)
		}
	}
}

// benchLogits resembles a language model's output: mostly small logits, a few large ones.
func benchLogits() []float32 {
	rng := rand.New(rand.NewPCG(3, 4))
	l := make([]float32, 128256)
	for i := range l {
		l[i] = float32(rng.NormFloat64() * 2.5)
	}
	for range 20 {
		l[rng.IntN(len(l))] += 12
	}
	return l
}

func BenchmarkSample128k(b *testing.B) {
	logits := benchLogits()
	recent := make([]int32, 64)
	for i := range recent {
		recent[i] = int32(i * 1000)
	}
	for _, bc := range []struct {
		name string
		p    Params
	}{
		{"greedy", Params{}},
		{"temperature", Params{Temperature: 0.8, Seed: 1}},
		{"top_k40", Params{Temperature: 0.8, TopK: 40, Seed: 1}},
		{"top_p0.9", Params{Temperature: 0.8, TopP: 0.9, Seed: 1}},
		{"min_p0.05", Params{Temperature: 0.8, MinP: 0.05, Seed: 1}},
		{"ollama_defaults", Params{Temperature: 0.8, TopK: 40, TopP: 0.9, RepeatPenalty: 1.1, RepeatLastN: 64, Seed: 1}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var s Sampler
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				s.Sample(logits, bc.p, recent, int32(i))
			}
		})
	}
	b.Run("package_func_top_k40", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			Sample(logits, Params{Temperature: 0.8, TopK: 40, Seed: 1}, recent, int32(i))
		}
	})
}
