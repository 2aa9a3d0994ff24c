package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
)

const (
	maxStops = 16 // OpenAI allows 4; a few more cost nothing
	// defaultRepeatLastN is the window for penalties mapped from frequency/presence_penalty,
	// ollama's and llama.cpp's default.
	defaultRepeatLastN = 64
	// seedZero stands in for an explicit "seed": 0, because sample.Params reserves 0 for
	// "pick a random seed" and a client that sends 0 wants reproducible output.
	seedZero = 0x5eed_0000_0000_0001
)

// decode reads a JSON body into v with OpenAI's error shapes for the ways it can fail.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) *apiError {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
				Message: fmt.Sprintf("request body is larger than %d bytes", tooBig.Limit)}
		}
		return invalidRequest("", "reading request body: "+err.Error())
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return invalidRequest("", "request body is empty; expected a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			field := strings.TrimPrefix(typeErr.Field, "samplingFields.") // an embedded struct, not the wire name
			return invalidRequest(field, fmt.Sprintf("invalid type for %q: expected %s, got JSON %s", field, typeErr.Type, typeErr.Value))
		}
		return invalidRequest("", "request body is not valid JSON: "+err.Error())
	}
	if dec.More() {
		return invalidRequest("", "request body has data after the JSON object")
	}
	return nil
}

// options turns the shared request fields into a pipeline request (minus the prompt), checked
// against the model's card.
func (f *samplingFields) options(card pipeline.ModelCard) (pipeline.Request, *apiError) {
	req := pipeline.Request{Model: card.ID}

	maxTokens, param := f.MaxTokens, "max_tokens"
	if f.MaxCompletionTokens != nil {
		maxTokens, param = f.MaxCompletionTokens, "max_completion_tokens"
	}
	if maxTokens != nil {
		switch {
		case *maxTokens < 1:
			return req, invalidRequest(param, fmt.Sprintf("%s must be at least 1, got %d", param, *maxTokens))
		case card.ContextLength > 0 && *maxTokens > card.ContextLength:
			return req, invalidRequestCode(http.StatusBadRequest, param, "context_length_exceeded",
				fmt.Sprintf("%s is %d but model %s has a context of %d tokens", param, *maxTokens, card.ID, card.ContextLength))
		}
		req.MaxTokens = *maxTokens
	}

	stops, err := stringOrArray(f.Stop)
	if err != nil {
		return req, invalidRequest("stop", "stop "+err.Error())
	}
	for _, st := range stops {
		if st != "" {
			req.Stop = append(req.Stop, st)
		}
	}
	if len(req.Stop) > maxStops {
		return req, invalidRequest("stop", fmt.Sprintf("at most %d stop sequences are supported, got %d", maxStops, len(req.Stop)))
	}

	p, apiErr := f.sampling()
	if apiErr != nil {
		return req, apiErr
	}
	req.Sampling = p.WithRandomSeed()
	return req, nil
}

// sampling maps OpenAI's sampling fields (and the llama.cpp extensions) to sample.Params.
// Absent fields take OpenAI's defaults: temperature 1, no truncation, no penalty.
func (f *samplingFields) sampling() (sample.Params, *apiError) {
	p := sample.Params{Temperature: 1}
	finite := func(param string, v *float64, lo, hi float64) *apiError {
		if v != nil && (math.IsNaN(*v) || *v < lo || *v > hi) {
			return invalidRequest(param, fmt.Sprintf("%s must be between %g and %g, got %g", param, lo, hi, *v))
		}
		return nil
	}
	for _, c := range []struct {
		name   string
		v      *float64
		lo, hi float64
	}{
		{"temperature", f.Temperature, 0, 2},
		{"top_p", f.TopP, 0, 1},
		{"min_p", f.MinP, 0, 1},
		{"frequency_penalty", f.FrequencyPenalty, -2, 2},
		{"presence_penalty", f.PresencePenalty, -2, 2},
		{"repeat_penalty", f.RepeatPenalty, 0, 10},
	} {
		if e := finite(c.name, c.v, c.lo, c.hi); e != nil {
			return p, e
		}
	}
	if f.Temperature != nil {
		p.Temperature = float32(*f.Temperature)
	}
	if f.TopP != nil {
		p.TopP = float32(*f.TopP)
		if *f.TopP == 0 {
			p.TopK = 1 // "top_p": 0 asks for the most likely token only; 0 means "off" to the sampler
		}
	}
	if f.TopK != nil {
		if *f.TopK < 0 {
			return p, invalidRequest("top_k", fmt.Sprintf("top_k must be >= 0, got %d", *f.TopK))
		}
		if p.TopK == 0 || (*f.TopK > 0 && *f.TopK < p.TopK) {
			p.TopK = *f.TopK
		}
	}
	if f.MinP != nil {
		p.MinP = float32(*f.MinP)
	}
	// Strata's sampler has llama.cpp's multiplicative repeat penalty, not OpenAI's additive
	// frequency/presence penalties: a positive penalty x maps to repeat_penalty 1 + x/2
	// (0.2 gives llama.cpp's customary 1.1). Negative ones (encouraging repeats) are ignored.
	if f.RepeatPenalty != nil {
		p.RepeatPenalty = float32(*f.RepeatPenalty)
	} else if pen := max(deref(f.FrequencyPenalty), deref(f.PresencePenalty)); pen > 0 {
		p.RepeatPenalty = float32(1 + pen/2)
	}
	if p.RepeatPenalty > 0 && p.RepeatPenalty != 1 {
		p.RepeatLastN = defaultRepeatLastN
		if f.RepeatLastN != nil && *f.RepeatLastN > 0 {
			p.RepeatLastN = *f.RepeatLastN
		}
	}
	if f.Seed != nil {
		p.Seed = uint64(*f.Seed)
		if p.Seed == 0 {
			p.Seed = seedZero
		}
	}
	if err := p.Validate(); err != nil {
		return p, invalidRequest("", err.Error())
	}
	if f.N != nil && *f.N != 1 {
		return p, invalidRequest("n", fmt.Sprintf("only n=1 is supported, got %d", *f.N))
	}
	if lp := bytes.TrimSpace(f.Logprobs); len(lp) > 0 && !bytes.Equal(lp, []byte("false")) && !bytes.Equal(lp, []byte("null")) && !bytes.Equal(lp, []byte("0")) {
		return p, invalidRequest("logprobs", "logprobs are not supported")
	}
	return p, nil
}

func deref(v *float64) float64 {
	if v == nil {
		return 0
	}
	return *v
}

var chatRoles = map[string]string{"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	var cr chatRequest
	if e := s.decode(w, r, &cr); e != nil {
		writeError(w, e)
		return
	}
	if len(cr.Messages) == 0 {
		writeError(w, invalidRequest("messages", "messages must be a non-empty array"))
		return
	}
	msgs := make([]map[string]any, len(cr.Messages))
	for i, m := range cr.Messages {
		role, ok := chatRoles[m.Role]
		if !ok {
			writeError(w, invalidRequest(fmt.Sprintf("messages[%d].role", i), fmt.Sprintf("messages[%d]: unknown role %q (want system, developer, user, assistant or tool)", i, m.Role)))
			return
		}
		text, err := m.text()
		if err != nil {
			writeError(w, invalidRequest(fmt.Sprintf("messages[%d].content", i), fmt.Sprintf("messages[%d].content: %v", i, err)))
			return
		}
		msg := map[string]any{"role": role, "content": text}
		if m.Name != "" {
			msg["name"] = m.Name
		}
		if e := toolMessageFields(i, m, msg); e != nil {
			writeError(w, e)
			return
		}
		msgs[i] = msg
	}
	if fn := bytes.TrimSpace(cr.Functions); len(fn) > 0 && string(fn) != "null" {
		writeError(w, invalidRequest("functions", "functions (deprecated by OpenAI) is not supported; send tools instead"))
		return
	}
	constraint, e := cr.ResponseFormat.grammar()
	if e != nil {
		writeError(w, e)
		return
	}

	card, e := s.findModel(r.Context(), cr.Model)
	if e != nil {
		writeError(w, e)
		return
	}
	req, e := cr.options(card)
	if e != nil {
		writeError(w, e)
		return
	}
	if !card.Ready {
		writeError(w, notReady(card))
		return
	}
	if card.ChatTemplate == "" {
		writeError(w, invalidRequest("messages", fmt.Sprintf("model %s has no chat template; use /v1/completions with a prompt", card.ID)))
		return
	}
	tools, e := parseTools(cr.Tools, cr.ToolChoice, card.ChatTemplate)
	if e != nil {
		writeError(w, e)
		return
	}
	if forced, e := tools.grammar(); e != nil {
		writeError(w, e)
		return
	} else if forced != nil {
		constraint = forced
	}
	req.Grammar, req.KeepControl = constraint, tools != nil
	prompt, err := s.templates.renderWith(card.ChatTemplate, card.BOS, card.EOS, tools.withFallback(msgs), tools.templateVars())
	if err != nil {
		var te *templateError
		if errors.As(err, &te) && te.raised {
			writeError(w, invalidRequest("messages", "the model's chat template rejected the messages: "+te.Error()))
		} else {
			s.log.Error("chat template failed", "model", card.ID, "err", err)
			writeError(w, serverError(http.StatusInternalServerError, fmt.Sprintf("model %s: %v", card.ID, err)))
		}
		return
	}
	// pipeline.Request leaves BOS to the tokenizer (it adds one when the model asks), so a
	// template's own bos_token would make two.
	if card.BOS != "" {
		prompt = strings.TrimPrefix(prompt, card.BOS)
	}
	req.Prompt = prompt
	f := chatFormat{}
	if tools != nil {
		f = chatFormat{tools: tools, stream: &toolStream{ts: tools}}
	}
	s.generate(w, r, &cr.samplingFields, req, f)
}

func (s *Server) handleCompletion(w http.ResponseWriter, r *http.Request) {
	var cr completionRequest
	if e := s.decode(w, r, &cr); e != nil {
		writeError(w, e)
		return
	}
	prompts, err := stringOrArray(cr.Prompt)
	switch {
	case err != nil:
		writeError(w, invalidRequest("prompt", "prompt "+err.Error()+" (token arrays are not supported)"))
		return
	case len(prompts) == 0:
		writeError(w, invalidRequest("prompt", "prompt is required"))
		return
	case len(prompts) > 1:
		writeError(w, invalidRequest("prompt", fmt.Sprintf("only one prompt per request is supported, got %d", len(prompts))))
		return
	case cr.Echo:
		writeError(w, invalidRequest("echo", "echo is not supported"))
		return
	case cr.Suffix != nil && *cr.Suffix != "":
		writeError(w, invalidRequest("suffix", "suffix is not supported"))
		return
	}
	card, e := s.findModel(r.Context(), cr.Model)
	if e != nil {
		writeError(w, e)
		return
	}
	req, e := cr.options(card)
	if e != nil {
		writeError(w, e)
		return
	}
	if !card.Ready {
		writeError(w, notReady(card))
		return
	}
	if req.Grammar, e = cr.ResponseFormat.grammar(); e != nil {
		writeError(w, e)
		return
	}
	req.Prompt = prompts[0]
	s.generate(w, r, &cr.samplingFields, req, textFormat{})
}

func notReady(card pipeline.ModelCard) *apiError {
	return serverError(http.StatusServiceUnavailable, fmt.Sprintf("model %s is not ready: not every layer is served by the swarm yet", card.ID))
}

// format is what differs between chat and text completions: the response objects.
type format interface {
	idPrefix() string
	promptParam() string // the request field the prompt came from
	full(id string, created int64, model, text, finish string, u usage) any
	chunk(id string, created int64, model string, first bool, text string, finish *string) any
	usageChunk(id string, created int64, model string, u usage) any
}

// chatFormat's tools, when set, turn the model's tool-call syntax into tool_calls.
type chatFormat struct {
	tools  *toolSet
	stream *toolStream
}

func (chatFormat) idPrefix() string { return "chatcmpl-" }

func (chatFormat) promptParam() string { return "messages" }

func (c chatFormat) full(id string, created int64, model, text, finish string, u usage) any {
	msg := &assistantMsg{Role: "assistant", Content: &text}
	if c.tools != nil {
		if content, calls := c.tools.parse(text); len(calls) > 0 {
			msg.ToolCalls, finish = c.tools.toOpenAI(calls, false), "tool_calls"
			msg.Content = nil
			if content != "" {
				msg.Content = &content
			}
		}
	}
	return chatCompletion{ID: id, Object: "chat.completion", Created: created, Model: model,
		Choices: []chatChoice{{Message: msg, FinishReason: &finish}},
		Usage:   &u}
}

func (c chatFormat) chunk(id string, created int64, model string, first bool, text string, finish *string) any {
	if c.stream != nil && !first {
		if finish == nil {
			if text = c.stream.push(text); text == "" {
				return nil // held back: a tool call may be starting
			}
		} else {
			content, calls := c.stream.finish()
			delta := &assistantMsg{}
			if content != "" {
				delta.Content = &content
			}
			if len(calls) > 0 {
				delta.ToolCalls = c.tools.toOpenAI(calls, true)
				f := "tool_calls"
				finish = &f
			}
			return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model,
				Choices: []chatChoice{{Delta: delta, FinishReason: finish}}}
		}
	}
	delta := &assistantMsg{}
	if first {
		delta.Role = "assistant"
	}
	if finish == nil {
		delta.Content = &text
	}
	return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model,
		Choices: []chatChoice{{Delta: delta, FinishReason: finish}}}
}

func (chatFormat) usageChunk(id string, created int64, model string, u usage) any {
	return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, Choices: []chatChoice{}, Usage: &u}
}

type textFormat struct{}

func (textFormat) idPrefix() string { return "cmpl-" }

func (textFormat) promptParam() string { return "prompt" }

func (textFormat) full(id string, created int64, model, text, finish string, u usage) any {
	return textCompletion{ID: id, Object: "text_completion", Created: created, Model: model,
		Choices: []textChoice{{Text: text, FinishReason: &finish}}, Usage: &u}
}

func (textFormat) chunk(id string, created int64, model string, _ bool, text string, finish *string) any {
	return textCompletion{ID: id, Object: "text_completion", Created: created, Model: model,
		Choices: []textChoice{{Text: text, FinishReason: finish}}}
}

func (textFormat) usageChunk(id string, created int64, model string, u usage) any {
	return textCompletion{ID: id, Object: "text_completion", Created: created, Model: model, Choices: []textChoice{}, Usage: &u}
}

// generate runs req on the backend and answers in f's shapes, plain or streamed.
func (s *Server) generate(w http.ResponseWriter, r *http.Request, fields *samplingFields, req pipeline.Request, f format) {
	start := time.Now()
	id := f.idPrefix() + randomID()
	created := s.now().Unix()
	ctx := r.Context()

	var res pipeline.Result
	var err error
	if fields.Stream {
		includeUsage := fields.StreamOptions != nil && fields.StreamOptions.IncludeUsage
		res, err = s.stream(ctx, w, req, f, id, created, includeUsage)
	} else {
		var text strings.Builder
		res, err = s.backend.Generate(ctx, req, func(d pipeline.Delta) error {
			text.WriteString(d.Text)
			return ctx.Err()
		})
		if err == nil {
			out := res.Text
			if out == "" {
				out = text.String()
			}
			writeJSON(w, http.StatusOK, f.full(id, created, req.Model, out, finishReason(res), usageOf(res)))
		} else if ctx.Err() == nil {
			writeError(w, backendError(err, f.promptParam()))
		}
	}
	attrs := []any{"id", id, "model", req.Model, "stream", fields.Stream, "prompt_tokens", res.PromptTokens,
		"completion_tokens", res.CompletionTokens, "finish", res.FinishReason, "duration", time.Since(start)}
	switch {
	case ctx.Err() != nil:
		s.log.Info("completion cancelled by client", attrs...)
	case err != nil:
		s.log.Warn("completion failed", append(attrs, "err", err)...)
	default:
		s.log.Info("completion", attrs...)
	}
}

// stream answers with server-sent events. Headers go out with the first piece of text, so that
// a request the backend refuses straight away (a prompt too long, no route) still gets a
// proper status code; after that an error can only be reported as an error event.
func (s *Server) stream(ctx context.Context, w http.ResponseWriter, req pipeline.Request, f format, id string, created int64, includeUsage bool) (pipeline.Result, error) {
	rc := http.NewResponseController(w)
	var (
		mu      sync.Mutex
		started bool
		done    bool
	)
	send := func(v any) error {
		b, err := marshal(v)
		if err != nil {
			return fmt.Errorf("encoding chunk: %w", err)
		}
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return fmt.Errorf("writing to client: %w", err)
		}
		if err := rc.Flush(); err != nil {
			return fmt.Errorf("flushing to client: %w", err)
		}
		return nil
	}
	begin := func() error {
		if started {
			return nil
		}
		started = true
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no") // keep reverse proxies from buffering the stream
		w.WriteHeader(http.StatusOK)
		if _, ok := f.(chatFormat); ok {
			return send(f.chunk(id, created, req.Model, true, "", nil))
		}
		return nil
	}

	res, err := s.backend.Generate(ctx, req, func(d pipeline.Delta) error {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return errors.New("emit called after Generate returned")
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.Text == "" {
			return nil
		}
		if err := begin(); err != nil {
			return err
		}
		c := f.chunk(id, created, req.Model, false, d.Text, nil)
		if c == nil {
			return nil // held back for now (a tool call may be starting)
		}
		return send(c)
	})
	mu.Lock()
	defer mu.Unlock()
	done = true
	if ctx.Err() != nil {
		return res, err
	}
	if err != nil {
		if !started {
			writeError(w, backendError(err, f.promptParam()))
			return res, err
		}
		ae := backendError(err, f.promptParam())
		_ = send(struct {
			Error *apiError `json:"error"`
		}{ae})
		return res, err
	}
	if err := begin(); err != nil {
		return res, err
	}
	finish := finishReason(res)
	if err := send(f.chunk(id, created, req.Model, false, "", &finish)); err != nil {
		return res, err
	}
	if includeUsage {
		if err := send(f.usageChunk(id, created, req.Model, usageOf(res))); err != nil {
			return res, err
		}
	}
	if _, err := io.WriteString(w, "data: [DONE]\n\n"); err != nil {
		return res, fmt.Errorf("writing to client: %w", err)
	}
	return res, rc.Flush()
}

func finishReason(res pipeline.Result) string {
	if res.FinishReason == "" {
		return "stop"
	}
	return res.FinishReason
}

func usageOf(res pipeline.Result) usage {
	return usage{PromptTokens: res.PromptTokens, CompletionTokens: res.CompletionTokens, TotalTokens: res.PromptTokens + res.CompletionTokens}
}

func randomID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b[:])
}
