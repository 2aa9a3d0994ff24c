package sample

import (
	"cmp"
	"container/heap"
	"math"
	"slices"
)

// Sample picks the next token from logits. It is a pure function of its arguments: the same
// logits, params, recent tokens and position give the same token on any node, so a generation
// replayed after a stage failure, or finished on another node, continues identically.
//
// Greedy params (Temperature <= 0) return the highest logit after the repeat penalty, the
// lowest id on ties. Otherwise the filters run in ollama/llama.cpp order: repeat penalty over
// the last RepeatLastN tokens of recent, temperature, top_k, top_p, min_p, then a draw whose
// randomness is derived from (Seed, position) alone (see Params.Seed).
//
// logprob is the token's log-probability under the model's own distribution (the softmax of
// logits as given, before penalty, temperature and truncation), as OpenAI's logprobs report it.
//
// logits is never modified. With no usable logit (empty, or all NaN/-Inf) Sample returns -1
// and -Inf. Sample allocates working buffers as large as logits on every call; on a hot path
// keep a Sampler per generation loop instead.
func Sample(logits []float32, p Params, recent []int32, position int32) (token int32, logprob float32) {
	var s Sampler
	return s.Sample(logits, p, recent, position)
}

// Sampler is Sample with working buffers that are kept between calls, so that sampling over a
// 128k vocabulary does not allocate once the buffers have grown. The zero value is ready to
// use. A Sampler is not safe for concurrent use; keep one per generation loop.
type Sampler struct {
	work    []float32   // penalized copy of the logits
	weights []float32   // exp of scaled logits, for the full-vocabulary draw
	cand    []candidate // surviving tokens, best first
	seen    []uint64    // bitset of ids already penalized
	heap    candHeap
	counts  []int32 // sorted copy of the completion's tokens, for frequency penalties
	top     []TokenLogprob
}

type candidate struct {
	id    int32
	logit float32 // penalized, before temperature
	w     float64 // unnormalized probability after temperature, relative to the best token
}

// better orders candidates best first: higher logit, then lower id, so that the order (and
// with it every cumulative cut and draw) is fully determined.
func better(a, b candidate) int {
	if c := cmp.Compare(b.logit, a.logit); c != 0 {
		return c
	}
	return cmp.Compare(a.id, b.id)
}

// Step is what one draw knows besides the settings: the tokens before it, its position, the
// request's logit bias and how many alternatives to report.
type Step struct {
	Recent      []int32 // the last tokens, ending at Position
	Position    int32   // of the last token fed; the draw is for the one after it
	Bias        []Bias
	TopLogprobs int // alternatives to report, at most MaxTopLogprobs
}

// TokenLogprob is a token with its log-probability under the model's distribution.
type TokenLogprob struct {
	Token   int32
	Logprob float32
}

// Choice is a draw: the token, its log-probability, and the TopLogprobs most likely tokens
// (highest logit first, lowest id on ties), all under the model's own distribution.
type Choice struct {
	Token   int32
	Logprob float32
	Top     []TokenLogprob
}

// Sample is the package-level Sample using s's buffers.
func (s *Sampler) Sample(logits []float32, p Params, recent []int32, position int32) (token int32, logprob float32) {
	c := s.Choose(logits, p, Step{Recent: recent, Position: position})
	return c.Token, c.Logprob
}

// Choose is Sample with the per-step extras: the logit bias is added before every other
// filter (as llama.cpp does), and the top alternatives are reported. Choice.Top is valid
// until the next call.
func (s *Sampler) Choose(logits []float32, p Params, st Step) Choice {
	tok, lp := s.sample(logits, p, st)
	c := Choice{Token: tok, Logprob: lp}
	if st.TopLogprobs > 0 && tok >= 0 {
		s.top = topLogprobs(s.top[:0], logits, min(st.TopLogprobs, MaxTopLogprobs))
		c.Top = s.top
	}
	return c
}

func (s *Sampler) sample(logits []float32, p Params, st Step) (token int32, logprob float32) {
	n := len(logits)
	if n == 0 {
		return -1, float32(math.Inf(-1))
	}
	work := s.prepareStep(logits, p, st)

	best, bestLogit := argmax(work)
	if math.IsInf(float64(bestLogit), -1) {
		return -1, float32(math.Inf(-1))
	}
	if p.Greedy() {
		return best, logProb(logits, best)
	}

	invT := 1 / float64(p.Temperature)
	if math.IsInf(invT, 0) || math.IsNaN(invT) {
		// A temperature so small that 1/T overflows is greedy in all but name.
		return best, logProb(logits, best)
	}
	u := uniform(p.Seed, st.Position)
	cand, truncated := s.filter(work, p, bestLogit, invT)
	if !truncated {
		tok := s.drawFull(work, bestLogit, invT, u)
		return tok, logProb(logits, tok)
	}
	var kept float64
	for _, c := range cand {
		kept += c.w
	}
	target := u * kept
	var cum float64
	tok := cand[len(cand)-1].id // rounding can leave target just above the last sum
	for _, c := range cand {
		cum += c.w
		if target < cum {
			tok = c.id
			break
		}
	}
	return tok, logProb(logits, tok)
}

// filter applies top_k, top_p and min_p to the penalized logits at temperature 1/invT and
// returns the surviving tokens best first with unnormalized weights. When no filter is on it
// returns truncated false and no candidates: the draw then runs over the whole vocabulary,
// which needs no sort.
func (s *Sampler) filter(work []float32, p Params, bestLogit float32, invT float64) (cand []candidate, truncated bool) {
	n := len(work)
	topK := p.TopK
	if topK <= 0 || topK >= n {
		topK = 0
	}
	topP := float64(p.TopP)
	if !(topP > 0 && topP < 1) {
		topP = 1
	}
	minP := float64(p.MinP)
	if !(minP > 0) {
		minP = 0
	}
	if minP > 1 {
		minP = 1
	}

	var total float64 // normalizer of the distribution top_p is measured against
	switch {
	case topK > 0:
		cand = s.topK(work, topK, bestLogit, invT)
		for _, c := range cand {
			total += c.w
		}
	case topP < 1 || minP > 0:
		cand, total = s.nucleusCandidates(work, bestLogit, invT, topP, minP)
	default:
		return nil, false
	}

	// top_p: the shortest best-first prefix whose mass reaches topP, counting the token that
	// crosses it (llama.cpp and ollama keep it too). After top_k the mass is that of the k
	// kept tokens, renormalized, as in both.
	if topP < 1 {
		target := topP * total
		var cum float64
		for i, c := range cand {
			cum += c.w
			if cum >= target {
				cand = cand[:i+1]
				break
			}
		}
	}
	// min_p: relative to the most likely token, which is cand[0] with weight 1.
	if minP > 0 {
		limit := minP * cand[0].w
		keep := 1
		for keep < len(cand) && cand[keep].w >= limit {
			keep++
		}
		cand = cand[:keep]
	}
	return cand, true
}

// prepare is prepareStep for a recent slice that is all completion.
func (s *Sampler) prepare(logits []float32, p Params, recent []int32) []float32 {
	return s.prepareStep(logits, p, Step{Recent: recent, Position: p.PenaltyStart + int32(len(recent)) - 1})
}

// prepareStep copies logits into the work buffer, maps NaN to -Inf and +Inf to the largest
// float (so softmax stays defined), adds the logit bias, applies the repeat penalty once per
// distinct recent token, then OpenAI's frequency and presence penalties.
func (s *Sampler) prepareStep(logits []float32, p Params, st Step) []float32 {
	work := s.penalize(logits, p, st.Recent)
	s.additive(work, p, st)
	return work
}

// additive applies the logit bias and the frequency and presence penalties.
func (s *Sampler) additive(work []float32, p Params, st Step) {
	n := len(work)
	for _, b := range st.Bias {
		if b.Token >= 0 && int(b.Token) < n && b.Value == b.Value {
			work[b.Token] += b.Value
		}
	}
	fp, pp := p.FrequencyPenalty, p.PresencePenalty
	if fp != fp || pp != pp || (fp == 0 && pp == 0) || len(st.Recent) == 0 {
		return
	}
	// recent[i] sits at position Position-(len-1-i); the completion starts at PenaltyStart.
	first := int64(len(st.Recent)) - 1 - (int64(st.Position) - int64(p.PenaltyStart))
	if first >= int64(len(st.Recent)) {
		return
	}
	gen := st.Recent[max(0, first):]
	s.counts = append(s.counts[:0], gen...)
	slices.Sort(s.counts)
	for i := 0; i < len(s.counts); {
		j := i + 1
		for j < len(s.counts) && s.counts[j] == s.counts[i] {
			j++
		}
		if id := s.counts[i]; id >= 0 && int(id) < n {
			work[id] -= float32(j-i)*fp + pp
		}
		i = j
	}
}

// penalize copies logits into the work buffer, maps NaN to -Inf and +Inf to the largest float
// (so softmax stays defined), and applies the repeat penalty once per distinct recent token.
func (s *Sampler) penalize(logits []float32, p Params, recent []int32) []float32 {
	n := len(logits)
	if cap(s.work) < n {
		s.work = make([]float32, n)
	}
	work := s.work[:n]
	for i, v := range logits {
		switch {
		case v != v:
			v = float32(math.Inf(-1))
		case v > math.MaxFloat32:
			v = math.MaxFloat32
		}
		work[i] = v
	}

	pen := p.RepeatPenalty
	if pen <= 0 || pen == 1 || pen != pen || len(recent) == 0 {
		return work
	}
	if p.RepeatLastN > 0 && p.RepeatLastN < len(recent) {
		recent = recent[len(recent)-p.RepeatLastN:]
	}
	words := (n + 63) / 64
	if cap(s.seen) < words {
		s.seen = make([]uint64, words)
	}
	seen := s.seen[:words]
	for _, id := range recent {
		if id < 0 || int(id) >= n {
			continue // a token from another vocabulary cannot be penalized here
		}
		bit := uint64(1) << (uint(id) % 64)
		if seen[id/64]&bit != 0 {
			continue
		}
		seen[id/64] |= bit
		if work[id] > 0 {
			work[id] /= pen
		} else {
			work[id] *= pen
		}
	}
	for _, id := range recent { // clear only what was set, not the whole bitset
		if id >= 0 && int(id) < n {
			seen[id/64] = 0
		}
	}
	return work
}

// topK selects the k best tokens with a size-k min-heap (one comparison per token for the
// common case of a token worse than all k kept so far) and returns them best first.
func (s *Sampler) topK(work []float32, k int, maxLogit float32, invT float64) []candidate {
	s.heap = s.heap[:0]
	for i, v := range work {
		if len(s.heap) < k {
			s.heap = append(s.heap, candidate{id: int32(i), logit: v})
			if len(s.heap) == k {
				heap.Init(&s.heap)
			}
			continue
		}
		// Ids only grow, so a tie with the worst kept token loses; work has no NaN.
		if v <= s.heap[0].logit {
			continue
		}
		s.heap[0] = candidate{id: int32(i), logit: v}
		heap.Fix(&s.heap, 0)
	}
	cand := append(s.cand[:0], s.heap...)
	slices.SortFunc(cand, better)
	m := float64(maxLogit)
	for i := range cand {
		cand[i].w = expNeg((float64(cand[i].logit) - m) * invT)
	}
	s.cand = cand
	return cand
}

// nucleusCandidates returns, best first, a prefix of the sorted vocabulary that is sure to
// contain everything top_p and min_p keep, without sorting the whole vocabulary: it gathers
// tokens within a shrinking probability ratio of the best one until their mass reaches topP
// (or the min_p cut-off is inside the gathered set). Every token left out is less likely than
// every token gathered, so the prefix is exact. It also returns the full normalizer.
func (s *Sampler) nucleusCandidates(work []float32, maxLogit float32, invT, topP, minP float64) ([]candidate, float64) {
	m := float64(maxLogit)
	var total float64
	for _, v := range work {
		total += expNeg((float64(v) - m) * invT)
	}
	// The cut-off as a drop in scaled logit below the best token: start with tokens at least
	// e^-8 (~3e-4) as likely as the best, widen 4x until done. min_p bounds it from the start.
	minPDrop := math.Inf(1)
	if minP > 0 {
		minPDrop = -math.Log(minP)
	}
	drop := min(8.0, minPDrop)
	for {
		cand := s.cand[:0]
		var mass float64
		for i, v := range work {
			d := (m - float64(v)) * invT
			if d <= drop {
				w := expNeg(-d)
				cand = append(cand, candidate{id: int32(i), logit: v, w: w})
				mass += w
			}
		}
		s.cand = cand
		if mass >= topP*total || drop >= minPDrop || len(cand) == len(work) {
			slices.SortFunc(cand, better)
			return cand, total
		}
		drop *= 4
	}
}

// drawFull draws from the whole tempered distribution in id order, with no sort.
func (s *Sampler) drawFull(work []float32, maxLogit float32, invT, u float64) int32 {
	if cap(s.weights) < len(work) {
		s.weights = make([]float32, len(work))
	}
	weights := s.weights[:len(work)]
	m := float64(maxLogit)
	var total float64
	for i, v := range work {
		w := expNeg((float64(v) - m) * invT)
		weights[i] = float32(w)
		total += float64(weights[i])
	}
	target := u * total
	var cum float64
	last := int32(-1)
	for i, w := range weights {
		if w == 0 {
			continue
		}
		cum += float64(w)
		last = int32(i)
		if target < cum {
			return int32(i)
		}
	}
	return last
}

// argmax returns the first index of the largest value.
func argmax(v []float32) (int32, float32) {
	best := 0
	bv := v[0]
	for i, x := range v[1:] {
		if x > bv {
			best, bv = i+1, x
		}
	}
	return int32(best), bv
}

// topLogprobs appends the k most likely tokens of logits (highest first, lowest id on ties)
// with their log-probabilities to dst.
func topLogprobs(dst []TokenLogprob, logits []float32, k int) []TokenLogprob {
	if k <= 0 || len(logits) == 0 {
		return dst
	}
	k = min(k, len(logits))
	ids := make([]int32, 0, k)
	val := func(i int32) float32 {
		v := logits[i]
		if v != v {
			return float32(math.Inf(-1))
		}
		return v
	}
	for i := range logits {
		v := val(int32(i))
		if len(ids) == k && v <= val(ids[k-1]) {
			continue // ids only grow, so a tie with the worst kept token loses
		}
		j := len(ids)
		if j < k {
			ids = append(ids, 0)
		} else {
			j = k - 1
		}
		for j > 0 && val(ids[j-1]) < v {
			ids[j] = ids[j-1]
			j--
		}
		ids[j] = int32(i)
	}
	m, logZ, infs := logNorm(logits)
	for _, id := range ids {
		dst = append(dst, TokenLogprob{Token: id, Logprob: logProbNorm(logits[id], m, logZ, infs)})
	}
	return dst
}

// logNorm is the log of softmax's normalizer of logits as the max m and log of the rescaled
// sum, computed in one pass (an online log-sum-exp); with +Inf logits, infs counts them.
func logNorm(logits []float32) (m, logZ float64, infs int) {
	m = math.Inf(-1)
	var z float64
	for _, v := range logits {
		f := float64(v)
		if f <= m {
			z += expNeg(f - m)
		} else if f > m { // not NaN
			z = z*expNeg(m-f) + 1
			m = f
		}
		if math.IsInf(f, 1) {
			infs++
		}
	}
	return m, math.Log(z), infs
}

func logProbNorm(x float32, m, logZ float64, infs int) float32 {
	if x != x {
		return float32(math.Inf(-1))
	}
	if infs > 0 {
		if !math.IsInf(float64(x), 1) {
			return float32(math.Inf(-1))
		}
		return float32(-math.Log(float64(infs)))
	}
	return float32(float64(x) - m - logZ)
}

// logProb is log softmax(logits)[tok], computed stably in one pass (an online log-sum-exp:
// the running sum is rescaled on the rare occasions the maximum grows); NaN logits count as
// -Inf and +Inf logits share the probability equally.
func logProb(logits []float32, tok int32) float32 {
	x := logits[tok]
	if x != x {
		return float32(math.Inf(-1))
	}
	m := math.Inf(-1)
	var z float64
	for _, v := range logits {
		f := float64(v)
		if f <= m {
			z += expNeg(f - m)
		} else if f > m { // not NaN
			z = z*expNeg(m-f) + 1
			m = f
		}
	}
	if math.IsInf(m, 1) {
		if !math.IsInf(float64(x), 1) {
			return float32(math.Inf(-1))
		}
		var count int
		for _, v := range logits {
			if math.IsInf(float64(v), 1) {
				count++
			}
		}
		return float32(-math.Log(float64(count)))
	}
	return float32(float64(x) - m - math.Log(z))
}

// uniform is the draw's randomness: a number in [0, 1) that depends on (seed, position) only.
// Two splitmix64 rounds decorrelate neighbouring positions and seeds.
func uniform(seed uint64, position int32) float64 {
	x := splitmix64(seed ^ splitmix64(uint64(uint32(position))))
	return float64(x>>11) * 0x1p-53
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// expNeg is e^x for the softmax terms x <= 0 (it holds up to x ~ 700 too). It is small
// enough to inline, about twice as fast as math.Exp over a 128k vocabulary, with relative
// error below 1e-8, well under the float32 precision of the logits: x = k*ln2 + r with
// |r| <= ln2/2, then a degree-7 Taylor polynomial for e^r. k is rounded with the 1.5*2^52
// trick because math.Floor is a function call on baseline amd64.
func expNeg(x float64) float64 {
	if !(x > -700) { // also NaN and -Inf
		return 0
	}
	const (
		ln2    = 0.6931471805599453
		invLn2 = 1.4426950408889634
		round  = 6755399441055744.0 // 1.5 * 2^52
	)
	k := (x*invLn2 + round) - round
	r := x - k*ln2
	p := 1 + r*(1+r*(1.0/2+r*(1.0/6+r*(1.0/24+r*(1.0/120+r*(1.0/720+r*(1.0/5040)))))))
	return math.Float64frombits(math.Float64bits(p) + uint64(int64(k))<<52)
}

// candHeap is a min-heap of candidates: the worst kept token at the root.
type candHeap []candidate

func (h candHeap) Len() int           { return len(h) }
func (h candHeap) Less(i, j int) bool { return better(h[i], h[j]) > 0 }
func (h candHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *candHeap) Push(x any)        { *h = append(*h, x.(candidate)) }
func (h *candHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
