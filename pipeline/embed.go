package pipeline

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/strata-llm/strata/shard"
)

// EmbedRequest is one text (or token ids) to embed.
type EmbedRequest struct {
	Model  string
	Prompt string
	// PromptIDs, when not nil, is the input as token ids, used as they are.
	PromptIDs []int32
	// Truncate cuts an input longer than the context to fit, as Ollama does by default;
	// otherwise such an input is ErrContextLength.
	Truncate bool
	Client   string
}

// EmbedResult is an input's embedding: the final norm's hidden state pooled over its tokens
// as the model says, not normalised (the APIs normalise as theirs do).
type EmbedResult struct {
	Embedding    []float32
	Pooling      shard.Pooling
	PromptTokens int
}

// Embed runs every layer over the input and returns its pooled final hidden state. A prompt
// longer than a chunk goes in chunks; their pooled rows combine into the whole input's (a
// mean weighted by the chunks' lengths, the first chunk's first row, the last's last). A
// route that fails is rebuilt and the input run again, as often as recovery allows.
func (g *Generator) Embed(ctx context.Context, req EmbedRequest) (EmbedResult, error) {
	var ids []int32
	if req.PromptIDs != nil {
		for i, id := range req.PromptIDs {
			if id < 0 {
				return EmbedResult{}, fmt.Errorf("%w: input token %d is %d", ErrBadToken, i, id)
			}
		}
		ids = slices.Clone(req.PromptIDs)
	} else {
		var err error
		if ids, err = g.encodeWith(ctx, req.Prompt, req.Truncate); err != nil {
			return EmbedResult{}, err
		}
	}
	if len(ids) == 0 {
		return EmbedResult{}, fmt.Errorf("%w: the input has no tokens", ErrEmptyPrompt)
	}
	if len(ids) > g.maxContext {
		if !req.Truncate {
			return EmbedResult{}, fmt.Errorf("%w: the input is %d tokens, the context %d", ErrContextLength, len(ids), g.maxContext)
		}
		ids = ids[:g.maxContext]
	}
	s := &run{g: g, client: req.Client, tokens: ids, promptLen: len(ids)}
	defer s.close()
	deadline := time.Now().Add(g.recoverFor)
	var err error
	for attempt := 0; ; attempt++ {
		if attempt == 0 && g.admit != nil {
			s.session = rand.Uint64()
			var c Chain
			if c, err = g.admit.Do(ctx, s.client, func(ctx context.Context) (Chain, error) { return g.router.OpenChain(ctx, s.session) }); err != nil {
				return EmbedResult{}, routeError(ctx, err)
			}
			s.chain = c
		} else if err = s.open(ctx); err != nil {
			if attempt == 0 || ctx.Err() != nil {
				return EmbedResult{}, err
			}
		}
		if err == nil {
			var res EmbedResult
			if res, err = s.embed(ctx); err == nil {
				return res, nil
			}
		}
		s.close()
		var hop *HopError
		if ctx.Err() != nil || (err != nil && !errors.As(err, &hop) && !errors.Is(err, ErrRouteUnavailable) && !errors.Is(err, ErrNoRoute)) {
			return EmbedResult{}, err
		}
		if attempt+1 >= g.recoverTries || !time.Now().Before(deadline) {
			return EmbedResult{}, fmt.Errorf("%w: embedding failed and the route could not be rebuilt (%d tries): %w", ErrRouteUnavailable, attempt+1, err)
		}
		g.log.Warn("embedding's route failed; running it again", "err", err, "attempt", attempt+1)
		select {
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		case <-ctx.Done():
			return EmbedResult{}, ctx.Err()
		}
	}
}

// embed feeds the session's tokens in chunks and combines the chunks' pooled rows.
func (s *run) embed(ctx context.Context) (EmbedResult, error) {
	var (
		sum     []float64
		pooling shard.Pooling
		out     []float32
	)
	for off := 0; off < len(s.tokens); off += s.g.chunk {
		end := min(off+s.g.chunk, len(s.tokens))
		pos := make([]int32, end-off)
		for i := range pos {
			pos[i] = int32(off + i)
		}
		t0 := time.Now()
		res, err := s.stepOnce(ctx, StepInput{Positions: pos, Tokens: s.tokens[off:end], Embed: true})
		s.g.obs.Step(len(pos), time.Since(t0), err)
		if err != nil {
			return EmbedResult{}, err
		}
		if len(res.Embedding) == 0 || (sum != nil && len(res.Embedding) != len(sum)) {
			return EmbedResult{}, fmt.Errorf("the last stage answered an embedding step with %d values", len(res.Embedding))
		}
		for _, v := range res.Embedding {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return EmbedResult{}, errors.New("embedding contains NaN or Inf values")
			}
		}
		if sum == nil {
			sum, pooling = make([]float64, len(res.Embedding)), res.Pooling
		}
		switch pooling {
		case shard.PoolMean:
			for j, v := range res.Embedding {
				sum[j] += float64(v) * float64(len(pos))
			}
		case shard.PoolCLS:
			if off == 0 {
				out = slices.Clone(res.Embedding)
			}
		default:
			out = slices.Clone(res.Embedding)
		}
	}
	if pooling == shard.PoolMean {
		out = make([]float32, len(sum))
		for j := range sum {
			out[j] = float32(sum[j] / float64(len(s.tokens)))
		}
	}
	return EmbedResult{Embedding: out, Pooling: pooling, PromptTokens: len(s.tokens)}, nil
}
