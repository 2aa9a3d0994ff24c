package shard

import (
	"cmp"
	"errors"
	"fmt"
	"math"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
	"github.com/ollama/ollama/model/input"
)

// llamaOptions are the hyperparameters of the llama forward pass.
type llamaOptions struct {
	hidden, heads, kvHeads, headDim, ropeDim int
	eps, ropeBase, ropeScale                 float32
}

func newLlamaOptions(b ml.Backend, m *ModelInfo) llamaOptions {
	c := b.Config()
	return llamaOptions{
		hidden:    m.Hidden,
		heads:     m.Heads,
		kvHeads:   m.KVHeads,
		headDim:   m.HeadDim,
		ropeDim:   int(c.Uint("rope.dimension_count")),
		eps:       c.Float("attention.layer_norm_rms_epsilon", 1e-5),
		ropeBase:  c.Float("rope.freq_base", 1e4),
		ropeScale: c.Float("rope.scaling.factor", 1),
	}
}

type layerWeights struct {
	attnNorm, q, k, v, o    ml.Tensor
	ffnNorm, gate, up, down ml.Tensor
}

type weights struct {
	tokenEmbd  ml.Tensor // first stage only
	outputNorm ml.Tensor // last stage only
	output     ml.Tensor // last stage only (token_embd when tied)
	ropeFreqs  ml.Tensor // optional (Llama 3.1 scaling)
	layers     []layerWeights
}

// bindWeights looks up the tensors of r in a loaded backend, naming the first one missing.
func bindWeights(b ml.Backend, m *ModelInfo, r Range) (*weights, error) {
	var missing error
	get := func(name string) ml.Tensor {
		t := b.Get(name)
		if t == nil && missing == nil {
			missing = fmt.Errorf("model file lacks tensor %s", name)
		}
		return t
	}
	w := &weights{ropeFreqs: b.Get("rope_freqs.weight")}
	if r.Start == 0 {
		w.tokenEmbd = get("token_embd.weight")
	}
	if r.End == m.Layers {
		w.outputNorm = get("output_norm.weight")
		if w.output = b.Get("output.weight"); w.output == nil {
			w.output = get("token_embd.weight")
		}
	}
	for l := r.Start; l < r.End; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		w.layers = append(w.layers, layerWeights{
			attnNorm: get(p + "attn_norm.weight"),
			q:        get(p + "attn_q.weight"),
			k:        get(p + "attn_k.weight"),
			v:        get(p + "attn_v.weight"),
			o:        get(p + "attn_output.weight"),
			ffnNorm:  get(p + "ffn_norm.weight"),
			gate:     get(p + "ffn_gate.weight"),
			up:       get(p + "ffn_up.weight"),
			down:     get(p + "ffn_down.weight"),
		})
	}
	return w, missing
}

func (o *llamaOptions) rope(ctx ml.Context, t, positions, factors ml.Tensor) ml.Tensor {
	return nn.RoPE(ctx, t, positions, cmp.Or(o.ropeDim, o.headDim), o.ropeBase, 1/o.ropeScale, rope.WithFactors(factors))
}

// shift re-rotates cached keys when the cache moves positions (the engine's context shift).
func (s *Stage) shift(ctx ml.Context, layer int, key, shift ml.Tensor) (ml.Tensor, error) {
	return s.opts.rope(ctx, key, shift, s.weights.ropeFreqs), nil
}

// layerForward is one llama block: pre-norm attention with RoPE and grouped-query heads,
// then a pre-norm SwiGLU MLP, each added to the residual stream.
func (s *Stage) layerForward(ctx ml.Context, w *layerWeights, h, positions ml.Tensor) ml.Tensor {
	o := &s.opts
	n := h.Dim(1)
	x := h.RMSNorm(ctx, w.attnNorm, o.eps)
	q := w.q.Mulmat(ctx, x).Reshape(ctx, o.headDim, o.heads, n)
	k := w.k.Mulmat(ctx, x).Reshape(ctx, o.headDim, o.kvHeads, n)
	v := w.v.Mulmat(ctx, x).Reshape(ctx, o.headDim, o.kvHeads, n)
	q = o.rope(ctx, q, positions, s.weights.ropeFreqs)
	k = o.rope(ctx, k, positions, s.weights.ropeFreqs)
	a := nn.Attention(ctx, q, k, v, 1/math.Sqrt(float64(o.headDim)), s.cache)
	a = a.Reshape(ctx, o.headDim*o.heads, n)
	h = w.o.Mulmat(ctx, a).Add(ctx, h)

	x = h.RMSNorm(ctx, w.ffnNorm, o.eps)
	x = w.gate.Mulmat(ctx, x).SILU(ctx, w.up.Mulmat(ctx, x))
	return w.down.Mulmat(ctx, x).Add(ctx, h)
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
	outs, err := s.compute(positions, seqs, tokens, hidden, good)
	if err != nil {
		// Drop whatever the failed pass put in the cache so each session can retry cleanly.
		for i, r := range good {
			_ = s.cache.Remove(sessions[i].seq, sessions[i].next, math.MaxInt32)
			r.reply <- response{err: err}
		}
		return
	}
	for i, r := range good {
		sessions[i].next += int32(len(r.step.Positions))
		r.reply <- response{out: outs[i]}
	}
}

func (s *Stage) compute(positions []int32, seqs []int, tokens []int32, hidden []float32, reqs []*request) (outs []Output, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("stage %s forward failed: %v", s.info.Range, p)
		}
	}()
	ctx := s.backend.NewContext()
	defer ctx.Close()
	n := len(positions)

	if err := s.cache.StartForward(ctx, input.Batch{Positions: positions, Sequences: seqs}, false); err != nil {
		if errors.Is(err, kvcache.ErrKvCacheFull) {
			return nil, fmt.Errorf("%w: %v", ErrContextFull, err)
		}
		return nil, fmt.Errorf("stage %s: %w", s.info.Range, err)
	}
	pos := ctx.Input().FromInts(positions, n)
	var h ml.Tensor
	if s.info.First() {
		h = s.weights.tokenEmbd.Rows(ctx, ctx.Input().FromInts(tokens, n))
	} else {
		h = ctx.Input().FromFloats(hidden, s.info.Hidden, n)
	}
	for i := range s.weights.layers {
		s.cache.SetLayer(s.info.Range.Start + i)
		h = s.layerForward(ctx, &s.weights.layers[i], h, pos)
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

	// Logits only for each step's last position: the LM head is the largest matmul there is.
	last := make([]int32, len(reqs))
	off := 0
	for i, r := range reqs {
		off += len(r.step.Positions)
		last[i] = int32(off - 1)
	}
	h = h.Rows(ctx, ctx.Input().FromInts(last, len(last)))
	h = h.RMSNorm(ctx, s.weights.outputNorm, s.opts.eps)
	logits := s.weights.output.Mulmat(ctx, h)
	ctx.Forward(logits).Compute(logits)
	data := logits.Floats()
	v := s.info.Vocab
	for i := range reqs {
		outs[i].Logits = data[i*v : (i+1)*v : (i+1)*v]
	}
	return outs, nil
}
