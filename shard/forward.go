package shard

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
)

// stageCache is the KV cache of a stage's layers: one causal cache when they all attend
// globally, else the engine's wrapper over one cache per attention kind, each layer switched
// to its own. A sliding-window cache keeps only its window of each session.
type stageCache struct {
	kvcache.Cache
	wrapper *kvcache.WrapperCache
	kind    map[int]int // layer -> index of its cache in the wrapper
	parts   []kvcache.Cache
	windows []int32 // parts[i]'s attention window, 0 for global attention
}

func newStageCache(f family, r Range) *stageCache {
	var windows []int32
	kind := map[int]int{}
	for l := r.Start; l < r.End; l++ {
		w := f.window(l)
		i := slices.Index(windows, w)
		if i < 0 {
			i = len(windows)
			windows = append(windows, w)
		}
		kind[l] = i
	}
	one := func(w int32) *kvcache.Causal {
		if w > 0 {
			return kvcache.NewSWACache(w, f.shift)
		}
		return kvcache.NewCausalCache(f.shift)
	}
	if len(windows) == 1 && windows[0] == 0 {
		c := one(0)
		return &stageCache{Cache: c, parts: []kvcache.Cache{c}, windows: windows}
	}
	caches := make([]kvcache.Cache, len(windows))
	for i, w := range windows {
		caches[i] = one(w)
	}
	wc := kvcache.NewWrapperCache(caches...)
	return &stageCache{Cache: wc, wrapper: wc, kind: kind, parts: caches, windows: windows}
}

// initAlone sizes the cache for one session. A sliding-window part is told two sequences
// because the engine keeps one more token of each sequence's window when a cache holds more
// than one (and the shared cache `strata run` uses does): with the same tokens kept, the
// session's cells are laid out exactly as they are in a shared cache when it runs alone.
func (c *stageCache) initAlone(b ml.Backend, dtype ml.DType, capacity, maxBatch int) {
	for i, p := range c.parts {
		seqs := 1
		if c.windows[i] > 0 {
			seqs = 2
		}
		p.Init(b, dtype, seqs, capacity, maxBatch)
	}
}

// setLayer points the cache at layer l's storage and kind.
func (c *stageCache) setLayer(l int) {
	c.SetLayer(l)
	if c.wrapper != nil {
		c.wrapper.SetLayerType(c.kind[l])
	}
}

// validate checks one step against the session's state, so a bad step fails alone instead
// of spoiling the batch it arrived with.
func (s *Stage) validate(st *Step) (*session, error) {
	sess, ok := s.sessions[st.Session]
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownSession, st.Session)
	}
	n := len(st.Positions)
	switch {
	case n == 0:
		return nil, fmt.Errorf("%w: step has no positions", ErrBadInput)
	case n > s.info.MaxBatch:
		return nil, fmt.Errorf("%w: step of %d tokens exceeds the batch limit %d", ErrBadInput, n, s.info.MaxBatch)
	case st.Positions[0] != sess.next:
		return nil, fmt.Errorf("%w: step starts at position %d, session is at %d", ErrBadInput, st.Positions[0], sess.next)
	case int(sess.next)+n > s.info.MaxContext:
		return nil, fmt.Errorf("%w: session would reach %d tokens, the stage's limit is %d", ErrContextFull, int(sess.next)+n, s.info.MaxContext)
	}
	for i := 1; i < n; i++ {
		if st.Positions[i] != st.Positions[i-1]+1 {
			return nil, fmt.Errorf("%w: positions are not contiguous at index %d", ErrBadInput, i)
		}
	}
	if s.info.First() {
		if len(st.Tokens) != n {
			return nil, fmt.Errorf("%w: %d tokens for %d positions", ErrBadInput, len(st.Tokens), n)
		}
		for _, t := range st.Tokens {
			if t < 0 || int(t) >= s.info.Vocab {
				return nil, fmt.Errorf("%w: token id %d outside the vocabulary of %d", ErrBadInput, t, s.info.Vocab)
			}
		}
		return sess, nil
	}
	if len(st.Hidden) != n*s.info.Hidden {
		return nil, fmt.Errorf("%w: %d activation values for %d positions of hidden size %d (want %d)",
			ErrBadInput, len(st.Hidden), n, s.info.Hidden, n*s.info.Hidden)
	}
	for i, f := range st.Hidden {
		if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
			return nil, fmt.Errorf("%w: activation %d is %v", ErrBadInput, i, f)
		}
	}
	return sess, nil
}

// forwardBatch runs the steps of distinct sessions as one graph and answers each request.
func (s *Stage) forwardBatch(reqs []*request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var (
		good      []*request
		sessions  []*session
		positions []int32
		seqs      []int
		tokens    []int32
		hidden    []float32
	)
	for _, r := range reqs {
		if s.closed {
			r.reply <- response{err: ErrClosed}
			continue
		}
		sess, err := s.validate(&r.step)
		if err != nil {
			r.reply <- response{err: err}
			continue
		}
		good = append(good, r)
		sessions = append(sessions, sess)
		positions = append(positions, r.step.Positions...)
		for range r.step.Positions {
			seqs = append(seqs, sess.seq)
		}
		tokens = append(tokens, r.step.Tokens...)
		hidden = append(hidden, r.step.Hidden...)
	}
	if len(good) == 0 {
		return
	}
	// A stage with a cache per session (WithUnbatched) runs one session a step, in its own
	// cache, where it is the cache's sequence 0.
	cache := s.cache
	if s.ownCaches != nil {
		cache = s.ownCaches[sessions[0].seq]
		seqs = make([]int, len(positions))
	}
	outs, err := s.compute(cache, positions, seqs, tokens, hidden, good)
	if err != nil {
		// Drop whatever the failed pass put in the cache so each session can retry cleanly.
		for i, r := range good {
			s.forget(sessions[i], sessions[i].next)
			r.reply <- response{err: err}
		}
		return
	}
	for i, r := range good {
		sessions[i].next += int32(len(r.step.Positions))
		r.reply <- response{out: outs[i]}
	}
}

func (s *Stage) compute(cache *stageCache, positions []int32, seqs []int, tokens []int32, hidden []float32, reqs []*request) (outs []Output, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("stage %s forward failed: %v", s.info.Range, p)
		}
	}()
	ctx := s.backend.NewContext()
	defer ctx.Close()
	n := len(positions)

	if err := cache.StartForward(ctx, input.Batch{Positions: positions, Sequences: seqs}, false); err != nil {
		if errors.Is(err, kvcache.ErrKvCacheFull) {
			return nil, fmt.Errorf("%w: %v", ErrContextFull, err)
		}
		return nil, fmt.Errorf("stage %s: %w", s.info.Range, err)
	}
	p := &pass{ctx: ctx, positions: ctx.Input().FromInts(positions, n), raw: positions, cache: cache}
	var h ml.Tensor
	if s.info.First() {
		h = s.fam.embed(ctx, ctx.Input().FromInts(tokens, n))
	} else {
		h = ctx.Input().FromFloats(hidden, s.info.Hidden, n)
	}
	// Logits only for each step's last position: the engine prunes to those rows inside the
	// model's last block, after attention, and the LM head is the largest matmul there is.
	var outputs ml.Tensor
	embed := s.info.Last() && len(reqs) == 1 && reqs[0].step.Embed // run alone: see run
	if s.info.Last() && !embed {
		last := make([]int32, len(reqs))
		off := 0
		for i, r := range reqs {
			off += len(r.step.Positions)
			last[i] = int32(off - 1)
		}
		outputs = ctx.Input().FromInts(last, len(last))
	}
	for l := s.info.Range.Start; l < s.info.Range.End; l++ {
		cache.setLayer(l)
		var out ml.Tensor
		if l == s.info.Layers-1 {
			out = outputs
		}
		h = s.fam.layer(p, l, h, out)
	}

	outs = make([]Output, len(reqs))
	if !s.info.Last() {
		ctx.Forward(h).Compute(h)
		data := h.Floats()
		off := 0
		for i, r := range reqs {
			k := len(r.step.Positions) * s.info.Hidden
			outs[i].Hidden = data[off : off+k : off+k]
			off += k
		}
		return outs, nil
	}
	if embed {
		h = s.fam.finalNorm(ctx, h)
		ctx.Forward(h).Compute(h)
		outs[0].Embedding, outs[0].Pooling = pool(h.Floats(), s.info.Hidden, s.model.Pooling), s.model.Pooling
		return outs, nil
	}
	logits := s.fam.head(ctx, h)
	ctx.Forward(logits).Compute(logits)
	data := logits.Floats()
	// The head may have more rows than the tokenizer has tokens (files pad their LM head):
	// step by the head's rows, hand out the vocabulary's.
	rows := logits.Dim(0)
	v := min(rows, s.info.Vocab)
	for i := range reqs {
		outs[i].Logits = data[i*rows : i*rows+v : i*rows+v]
	}
	return outs, nil
}

// pool reduces a step's rows (token-major, hidden wide) to one embedding: their mean, the
// first or the last, summed in float64.
func pool(rows []float32, hidden int, p Pooling) []float32 {
	n := len(rows) / hidden
	out := make([]float32, hidden)
	switch p {
	case PoolMean:
		sum := make([]float64, hidden)
		for i := range n {
			for j, v := range rows[i*hidden : (i+1)*hidden] {
				sum[j] += float64(v)
			}
		}
		for j := range out {
			out[j] = float32(sum[j] / float64(n))
		}
	case PoolCLS:
		copy(out, rows[:hidden])
	default:
		copy(out, rows[(n-1)*hidden:])
	}
	return out
}
