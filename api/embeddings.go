package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"sync"
	"time"

	"github.com/strata-llm/strata/pipeline"
)

// Embeddings: OpenAI's /v1/embeddings, Ollama's /api/embed and its legacy /api/embeddings.
// The swarm runs every layer over the input and the last stage returns the final norm's
// hidden state pooled over the tokens (the model's pooling_type, else the last token's; see
// shard.ModelInfo.Pooling). As Ollama v0.24.0 does, the vector is then L2-normalised, and
// with dimensions cut to that many values and normalised again.

// Embedder is a Backend that also embeds; the node is one. With a backend that is not, the
// embedding endpoints answer 501.
type Embedder interface {
	Embed(ctx context.Context, req pipeline.EmbedRequest) (pipeline.EmbedResult, error)
}

// maxEmbedInputs bounds the inputs of one request; embedParallel how many run at once (each
// is a session on every stage of its route).
const (
	maxEmbedInputs = 256
	embedParallel  = 4
)

// embedInput is one input: text, or token ids (OpenAI's arrays of integers).
type embedInput struct {
	text string
	ids  []int32
}

// embedAll embeds every input, embedParallel at a time, and normalises each as Ollama does.
// The first error cancels the rest.
func (s *Server) embedAll(ctx context.Context, r *http.Request, model string, inputs []embedInput, truncate bool, dims int) ([][]float32, int, *apiError) {
	em, ok := s.backend.(Embedder)
	if !ok {
		return nil, 0, serverError(http.StatusNotImplemented, "this server's backend does not compute embeddings")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	out := make([][]float32, len(inputs))
	tokens := make([]int, len(inputs))
	errs := make([]error, len(inputs))
	slots := make(chan struct{}, embedParallel)
	var wg sync.WaitGroup
	for i, in := range inputs {
		wg.Go(func() {
			select {
			case slots <- struct{}{}:
				defer func() { <-slots }()
			case <-ctx.Done():
				errs[i] = ctx.Err()
				return
			}
			res, err := em.Embed(ctx, pipeline.EmbedRequest{Model: model, Prompt: in.text, PromptIDs: in.ids, Truncate: truncate, Client: clientKey(r)})
			if err == nil {
				res.Embedding, err = normalize(res.Embedding)
			}
			if err == nil && dims > 0 && dims < len(res.Embedding) {
				res.Embedding, err = normalize(res.Embedding[:dims])
			}
			if err != nil {
				errs[i] = err
				cancel()
				return
			}
			out[i], tokens[i] = res.Embedding, res.PromptTokens
		})
	}
	wg.Wait()
	for _, err := range errs { // the first failure, not the cancellations it caused
		if err != nil && !errors.Is(err, context.Canceled) {
			return nil, 0, backendError(err, "input")
		}
	}
	for _, err := range errs {
		if err != nil {
			return nil, 0, backendError(err, "input")
		}
	}
	total := 0
	for _, n := range tokens {
		total += n
	}
	return out, total, nil
}

// normalize scales v to unit length, as Ollama's server does (a zero vector stays zero).
func normalize(v []float32) ([]float32, error) {
	var sum float64
	for _, x := range v {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return nil, errors.New("embedding contains NaN or Inf values")
		}
		sum += float64(x) * float64(x)
	}
	norm := 1 / max(math.Sqrt(sum), 1e-12)
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(float64(x) * norm)
	}
	return out, nil
}

var embeddingsKeys = []string{"input", "model", "encoding_format", "dimensions", "user"}

// handleEmbeddings is OpenAI's POST /v1/embeddings.
func (s *Server) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Input          json.RawMessage `json:"input"`
		Model          string          `json:"model"`
		EncodingFormat string          `json:"encoding_format"`
		Dimensions     *int            `json:"dimensions"`
		User           string          `json:"user"`
	}
	if e := s.decode(w, r, &req, embeddingsKeys); e != nil {
		writeError(w, e)
		return
	}
	inputs, e := openAIEmbedInputs(req.Input)
	if e != nil {
		writeError(w, e)
		return
	}
	if req.EncodingFormat != "" && req.EncodingFormat != "float" && req.EncodingFormat != "base64" {
		writeError(w, invalidRequest("encoding_format", fmt.Sprintf("encoding_format must be float or base64, got %q", req.EncodingFormat)))
		return
	}
	dims := 0
	if req.Dimensions != nil {
		if *req.Dimensions < 1 {
			writeError(w, invalidRequest("dimensions", fmt.Sprintf("dimensions must be at least 1, got %d", *req.Dimensions)))
			return
		}
		dims = *req.Dimensions
	}
	card, e := s.findModel(r.Context(), req.Model)
	if e != nil {
		writeError(w, e)
		return
	}
	if !card.Ready {
		writeError(w, notReady(card))
		return
	}
	for i, in := range inputs {
		for _, id := range in.ids {
			if card.Vocab > 0 && int(id) >= card.Vocab {
				writeError(w, invalidRequest("input", fmt.Sprintf("input[%d]: token %d is outside the vocabulary of %d", i, id, card.Vocab)))
				return
			}
		}
	}
	start := time.Now()
	vecs, tokens, e := s.embedAll(r.Context(), r, card.ID, inputs, false, dims)
	if e != nil {
		if r.Context().Err() == nil {
			writeError(w, e)
		}
		return
	}
	type datum struct {
		Object    string `json:"object"`
		Index     int    `json:"index"`
		Embedding any    `json:"embedding"`
	}
	data := make([]datum, len(vecs))
	for i, v := range vecs {
		data[i] = datum{Object: "embedding", Index: i, Embedding: v}
		if req.EncodingFormat == "base64" {
			// OpenAI's base64: the float32 values' little-endian bytes.
			b := make([]byte, 4*len(v))
			for j, x := range v {
				binary.LittleEndian.PutUint32(b[4*j:], math.Float32bits(x))
			}
			data[i].Embedding = base64.StdEncoding.EncodeToString(b)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data, "model": card.ID,
		"usage": map[string]int{"prompt_tokens": tokens, "total_tokens": tokens}})
	attrs := []any{"model", card.ID, "inputs", len(inputs), "prompt_tokens", tokens, "duration", time.Since(start)}
	if req.User != "" {
		attrs = append(attrs, "user", req.User)
	}
	s.log.Info("embeddings", attrs...)
}

// openAIEmbedInputs reads input: a string, an array of strings, an array of token ids or an
// array of arrays of token ids. Empty inputs are refused, as OpenAI refuses them.
func openAIEmbedInputs(raw json.RawMessage) ([]embedInput, *apiError) {
	prompts, e := completionPrompts(raw)
	if e != nil {
		return nil, invalidRequest("input", "input must be a string, an array of strings, an array of token ids or an array of arrays of token ids")
	}
	if len(prompts) > maxEmbedInputs {
		return nil, invalidRequest("input", fmt.Sprintf("input has %d items, at most %d", len(prompts), maxEmbedInputs))
	}
	out := make([]embedInput, len(prompts))
	for i, p := range prompts {
		if p.ids == nil && p.text == "" {
			return nil, invalidRequest("input", fmt.Sprintf("input[%d] is empty", i))
		}
		out[i] = embedInput{text: p.text, ids: p.ids}
	}
	return out, nil
}

var ollamaEmbedKeys = []string{"model", "input", "truncate", "options", "keep_alive", "dimensions"}

// handleOllamaEmbed is Ollama's POST /api/embed.
func (s *Server) handleOllamaEmbed(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req struct {
		Model      string          `json:"model"`
		Input      json.RawMessage `json:"input"`
		Truncate   *bool           `json:"truncate"`
		Options    ollamaOptions   `json:"options"`
		KeepAlive  json.RawMessage `json:"keep_alive"` // accepted: a swarm keeps its model loaded
		Dimensions int             `json:"dimensions"`
	}
	if e := s.decode(w, r, &req, ollamaEmbedKeys); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := embedOptions(req.Options); e != nil {
		ollamaAPIError(w, e)
		return
	}
	var texts []string
	raw := bytes.TrimSpace(req.Input)
	switch {
	case len(raw) == 0 || string(raw) == "null":
	case raw[0] == '"':
		var t string
		_ = json.Unmarshal(raw, &t)
		if t != "" {
			texts = []string{t}
		}
	default:
		if err := json.Unmarshal(raw, &texts); err != nil {
			ollamaError(w, http.StatusBadRequest, "invalid input type")
			return
		}
	}
	if len(texts) > maxEmbedInputs {
		ollamaError(w, http.StatusBadRequest, fmt.Sprintf("input has %d items, at most %d", len(texts), maxEmbedInputs))
		return
	}
	if req.Dimensions < 0 {
		ollamaError(w, http.StatusBadRequest, "dimensions must be positive")
		return
	}
	card, e := s.findOllamaModel(r.Context(), req.Model)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	if len(texts) == 0 {
		writeJSON(w, http.StatusOK, map[string]any{"model": req.Model, "embeddings": [][]float32{}})
		return
	}
	if !card.Ready {
		ollamaAPIError(w, notReady(card))
		return
	}
	inputs := make([]embedInput, len(texts))
	for i, t := range texts {
		inputs[i] = embedInput{text: t}
	}
	vecs, tokens, e := s.embedAll(r.Context(), r, card.ID, inputs, req.Truncate == nil || *req.Truncate, req.Dimensions)
	if e != nil {
		if r.Context().Err() == nil {
			ollamaAPIError(w, e)
		}
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"model": req.Model, "embeddings": vecs,
		"total_duration": time.Since(start).Nanoseconds(), "load_duration": 0, "prompt_eval_count": tokens})
}

var ollamaEmbeddingsKeys = []string{"model", "prompt", "options", "keep_alive"}

// handleOllamaEmbeddings is Ollama's legacy POST /api/embeddings: one prompt, one vector.
func (s *Server) handleOllamaEmbeddings(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model     string          `json:"model"`
		Prompt    string          `json:"prompt"`
		Options   ollamaOptions   `json:"options"`
		KeepAlive json.RawMessage `json:"keep_alive"`
	}
	if e := s.decode(w, r, &req, ollamaEmbeddingsKeys); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := embedOptions(req.Options); e != nil {
		ollamaAPIError(w, e)
		return
	}
	card, e := s.findOllamaModel(r.Context(), req.Model)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	if req.Prompt == "" { // an empty request loads the model
		writeJSON(w, http.StatusOK, map[string]any{"embedding": []float32{}})
		return
	}
	if !card.Ready {
		ollamaAPIError(w, notReady(card))
		return
	}
	vecs, _, e := s.embedAll(r.Context(), r, card.ID, []embedInput{{text: req.Prompt}}, false, 0)
	if e != nil {
		if r.Context().Err() == nil {
			ollamaAPIError(w, e)
		}
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"embedding": vecs[0]})
}

// embedOptions accepts the options that size a runner (no-ops here, see ollamaHints) and
// refuses the rest: sampling means nothing to an embedding.
func embedOptions(o ollamaOptions) *apiError {
	for k := range o {
		if !contains(ollamaHints, k) {
			return invalidRequest("options."+k, fmt.Sprintf("option %q does not apply to embeddings", k))
		}
	}
	return nil
}
