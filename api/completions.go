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
	"slices"
	"strconv"
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

// decode reads a JSON body into v with OpenAI's error shapes for the ways it can fail. When
// known is not nil, a top-level field outside it is refused, as OpenAI refuses unrecognized
// arguments: a field this server would silently ignore must be a 400 instead.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any, known []string) *apiError {
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
	if known != nil {
		if k := unknownField(body, known); k != "" {
			return invalidRequest(k, fmt.Sprintf("unrecognized request argument supplied: %s (this server does not support it)", k))
		}
	}
	return nil
}

// unknownField returns a top-level key of the JSON object body that is not in known, in the
// body's order.
func unknownField(body []byte, known []string) string {
	dec := json.NewDecoder(bytes.NewReader(body))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return ""
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return ""
		}
		k, _ := t.(string)
		if !slices.Contains(known, k) {
			return k
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}

// maxChoices bounds the completions one request runs at once (prompts times n): each is a
// session on every stage of its route.
const maxChoices = 16

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
	req.Sampling = p
	if req.LogitBias, apiErr = logitBias(f.LogitBias, card.Vocab); apiErr != nil {
		return req, apiErr
	}
	return req, nil
}

// logitBias checks OpenAI's logit_bias: token ids (as strings) to values in [-100, 100].
func logitBias(m map[string]float64, vocab int) ([]sample.Bias, *apiError) {
	if len(m) > sample.MaxBias {
		return nil, invalidRequest("logit_bias", fmt.Sprintf("logit_bias has %d entries, at most %d", len(m), sample.MaxBias))
	}
	var out []sample.Bias
	for k, v := range m {
		id, err := strconv.ParseInt(k, 10, 32)
		switch {
		case err != nil || id < 0:
			return nil, invalidRequest("logit_bias", fmt.Sprintf("logit_bias key %q is not a token id", k))
		case vocab > 0 && id >= int64(vocab):
			return nil, invalidRequest("logit_bias", fmt.Sprintf("logit_bias token %d is outside the vocabulary of %d", id, vocab))
		case math.IsNaN(v) || v < -100 || v > 100:
			return nil, invalidRequest("logit_bias", fmt.Sprintf("logit_bias value for token %d must be between -100 and 100, got %g", id, v))
		}
		out = append(out, sample.Bias{Token: int32(id), Value: float32(v)})
	}
	slices.SortFunc(out, func(a, b sample.Bias) int { return int(a.Token) - int(b.Token) })
	return out, nil
}

// choices is n, checked.
func (f *samplingFields) choices() (int, *apiError) {
	if f.N == nil {
		return 1, nil
	}
	if *f.N < 1 || *f.N > maxChoices {
		return 0, invalidRequest("n", fmt.Sprintf("n must be between 1 and %d, got %d", maxChoices, *f.N))
	}
	return *f.N, nil
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
	// OpenAI's additive penalties, over the tokens sampled so far (negative ones encourage
	// repeats); llama.cpp's multiplicative repeat penalty is a separate extension.
	p.FrequencyPenalty = float32(deref(f.FrequencyPenalty))
	p.PresencePenalty = float32(deref(f.PresencePenalty))
	if f.RepeatPenalty != nil {
		p.RepeatPenalty = float32(*f.RepeatPenalty)
	}
	if f.RepeatLastN != nil && *f.RepeatLastN < 0 {
		return p, invalidRequest("repeat_last_n", fmt.Sprintf("repeat_last_n must be >= 0, got %d", *f.RepeatLastN))
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
	return p, nil
}

// logprobsCount reads the completions endpoint's logprobs: an integer, the alternatives
// wanted per token (null: none).
func (f *samplingFields) textLogprobs() (bool, int, *apiError) {
	lp := bytes.TrimSpace(f.Logprobs)
	if len(lp) == 0 || string(lp) == "null" {
		return false, 0, nil
	}
	var n int
	if err := json.Unmarshal(lp, &n); err != nil || n < 0 || n > sample.MaxTopLogprobs {
		return false, 0, invalidRequest("logprobs", fmt.Sprintf("logprobs must be an integer between 0 and %d, got %s", sample.MaxTopLogprobs, lp))
	}
	return true, n, nil
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
	if e := s.decode(w, r, &cr, chatKeys); e != nil {
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
	if e := cr.unsupported(); e != nil {
		writeError(w, e)
		return
	}
	constraint, e := cr.ResponseFormat.grammar()
	if e != nil {
		writeError(w, e)
		return
	}
	n, e := cr.choices()
	if e != nil {
		writeError(w, e)
		return
	}
	var logprobs bool
	if lp := bytes.TrimSpace(cr.Logprobs); len(lp) > 0 && string(lp) != "null" {
		if err := json.Unmarshal(lp, &logprobs); err != nil {
			writeError(w, invalidRequest("logprobs", "logprobs must be a boolean in chat completions"))
			return
		}
	}
	top := 0
	if cr.TopLogprobs != nil {
		if *cr.TopLogprobs < 0 || *cr.TopLogprobs > sample.MaxTopLogprobs {
			writeError(w, invalidRequest("top_logprobs", fmt.Sprintf("top_logprobs must be between 0 and %d, got %d", sample.MaxTopLogprobs, *cr.TopLogprobs)))
			return
		}
		if !logprobs && *cr.TopLogprobs > 0 {
			writeError(w, invalidRequest("top_logprobs", "top_logprobs needs logprobs set to true"))
			return
		}
		top = *cr.TopLogprobs
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
	req.Logprobs, req.TopLogprobs = logprobs, top
	if !card.Ready {
		writeError(w, notReady(card))
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
	switch {
	case tools != nil && n > 1:
		writeError(w, invalidRequest("n", "n > 1 with tools is not supported"))
		return
	case constraint != nil && logprobs:
		writeError(w, invalidRequest("logprobs", "logprobs with response_format or a forced tool call is not supported"))
		return
	}
	req.Grammar, req.KeepControl = constraint, tools != nil
	prompt, e := s.renderChatTools(card, msgs, tools)
	if e != nil {
		writeError(w, e)
		return
	}
	req.Prompt = prompt
	f := chatFormat{}
	if tools != nil {
		f = chatFormat{tools: tools, stream: &toolStream{ts: tools}}
	}
	s.generate(w, r, &cr.samplingFields, choicesOf([]pipeline.Request{req}, n, cr.Seed != nil), f)
}

// unsupported refuses the chat fields this server cannot honour yet, each by name.
func (cr *chatRequest) unsupported() *apiError {
	set := func(raw json.RawMessage) bool {
		t := bytes.TrimSpace(raw)
		return len(t) > 0 && string(t) != "null"
	}
	switch {
	case set(cr.Functions):
		return invalidRequest("functions", "functions (deprecated by OpenAI) is not supported; send tools instead")
	case set(cr.FunctionCall) && string(bytes.TrimSpace(cr.FunctionCall)) != `"none"`:
		return invalidRequest("function_call", "function_call (the legacy form of tool_choice) is not supported")
	case set(cr.ParallelTools):
		// Accepted: calls are parsed however many the model writes.
	case cr.Store != nil && *cr.Store:
		return invalidRequest("store", "store: this server does not store completions")
	case set(cr.Metadata):
		return invalidRequest("metadata", "metadata is only for stored completions, which this server does not keep")
	case cr.ServiceTier != "" && cr.ServiceTier != "auto" && cr.ServiceTier != "default":
		return invalidRequest("service_tier", fmt.Sprintf("service_tier %q is not offered; use auto or default", cr.ServiceTier))
	}
	return nil
}

// renderChat renders messages through the model's chat template, less the template's BOS
// (pipeline.Request leaves BOS to the tokenizer, which adds one when the model asks).
func (s *Server) renderChat(card pipeline.ModelCard, msgs []map[string]any) (string, *apiError) {
	return s.renderChatTools(card, msgs, nil)
}

// renderChatTools is renderChat with tools: the template's own tools variable when it reads
// one, else their description in the system message.
func (s *Server) renderChatTools(card pipeline.ModelCard, msgs []map[string]any, tools *toolSet) (string, *apiError) {
	if card.ChatTemplate == "" {
		return "", invalidRequest("messages", fmt.Sprintf("model %s has no chat template; use /v1/completions with a prompt", card.ID))
	}
	prompt, err := s.templates.renderWith(card.ChatTemplate, card.BOS, card.EOS, tools.withFallback(msgs), tools.templateVars())
	if err != nil {
		var te *templateError
		if errors.As(err, &te) && te.raised {
			return "", invalidRequest("messages", "the model's chat template rejected the messages: "+te.Error())
		}
		s.log.Error("chat template failed", "model", card.ID, "err", err)
		return "", serverError(http.StatusInternalServerError, fmt.Sprintf("model %s: %v", card.ID, err))
	}
	if card.BOS != "" {
		prompt = strings.TrimPrefix(prompt, card.BOS)
	}
	return prompt, nil
}

// choicesOf is every prompt n times, choice i of prompt p at index p*n+i as OpenAI numbers
// them. Each gets its own seed: a seed the client chose is varied per choice (the first keeps
// it, so n=1 reproduces as before), a random one is drawn per choice.
func choicesOf(prompts []pipeline.Request, n int, seeded bool) []pipeline.Request {
	out := make([]pipeline.Request, 0, len(prompts)*n)
	for _, p := range prompts {
		for i := 0; i < n; i++ {
			q := p
			if seeded && i > 0 {
				q.Sampling.Seed = p.Sampling.Seed + uint64(i)*0x9e3779b97f4a7c15
				if q.Sampling.Seed == 0 {
					q.Sampling.Seed = seedZero
				}
			}
			q.Sampling = q.Sampling.WithRandomSeed()
			out = append(out, q)
		}
	}
	return out
}

func (s *Server) handleCompletion(w http.ResponseWriter, r *http.Request) {
	var cr completionRequest
	if e := s.decode(w, r, &cr, completionKeys); e != nil {
		writeError(w, e)
		return
	}
	prompts, e := completionPrompts(cr.Prompt)
	if e != nil {
		writeError(w, e)
		return
	}
	n, e := cr.choices()
	if e != nil {
		writeError(w, e)
		return
	}
	logprobs, top, e := cr.textLogprobs()
	switch {
	case e != nil:
		writeError(w, e)
		return
	case len(prompts)*n > maxChoices:
		writeError(w, invalidRequest("n", fmt.Sprintf("%d prompts times n=%d is %d completions; at most %d per request", len(prompts), n, len(prompts)*n, maxChoices)))
		return
	case cr.Echo && logprobs:
		writeError(w, invalidRequest("logprobs", "logprobs with echo would need the prompt's logprobs, which this server does not compute; use one or the other"))
		return
	case cr.Suffix != nil && *cr.Suffix != "":
		writeError(w, invalidRequest("suffix", "suffix is not supported"))
		return
	case cr.BestOf != nil && *cr.BestOf != n:
		writeError(w, invalidRequest("best_of", fmt.Sprintf("best_of must equal n (%d): choosing the best of several completions is not supported", n)))
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
	req.Logprobs, req.TopLogprobs, req.Echo = logprobs, top, cr.Echo
	if !card.Ready {
		writeError(w, notReady(card))
		return
	}
	reqs := make([]pipeline.Request, len(prompts))
	for i, p := range prompts {
		reqs[i] = req
		if p.ids != nil {
			for _, id := range p.ids {
				if card.Vocab > 0 && int(id) >= card.Vocab {
					writeError(w, invalidRequest("prompt", fmt.Sprintf("prompt token %d is outside the vocabulary of %d", id, card.Vocab)))
					return
				}
			}
			reqs[i].PromptIDs = p.ids
		} else {
			reqs[i].Prompt = p.text
		}
	}
	constraint, e := cr.ResponseFormat.grammar()
	if e != nil {
		writeError(w, e)
		return
	}
	if constraint != nil && logprobs {
		writeError(w, invalidRequest("logprobs", "logprobs with response_format is not supported"))
		return
	}
	for i := range reqs {
		reqs[i].Grammar = constraint
	}
	s.generate(w, r, &cr.samplingFields, choicesOf(reqs, n, cr.Seed != nil), textFormat{})
}

// promptIn is one prompt of a text completion: text, or token ids.
type promptIn struct {
	text string
	ids  []int32
}

// completionPrompts decodes OpenAI's prompt: a string, an array of strings, an array of token
// ids, or an array of arrays of token ids.
func completionPrompts(raw json.RawMessage) ([]promptIn, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, invalidRequest("prompt", "prompt is required")
	}
	bad := invalidRequest("prompt", "prompt must be a string, an array of strings, an array of token ids or an array of arrays of token ids")
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, bad
		}
		return []promptIn{{text: s}}, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, bad
	}
	if len(items) == 0 {
		return nil, invalidRequest("prompt", "prompt is an empty array")
	}
	ids := func(raw json.RawMessage) ([]int32, bool) {
		var v []int64
		if err := json.Unmarshal(raw, &v); err != nil {
			return nil, false
		}
		out := make([]int32, len(v))
		for i, x := range v {
			if x < 0 || x > math.MaxInt32 {
				return nil, false
			}
			out[i] = int32(x)
		}
		return out, true
	}
	switch first := bytes.TrimSpace(items[0]); {
	case len(first) > 0 && first[0] == '"':
		var ss []string
		if err := json.Unmarshal(raw, &ss); err != nil {
			return nil, bad
		}
		out := make([]promptIn, len(ss))
		for i, s := range ss {
			out[i] = promptIn{text: s}
		}
		return out, nil
	case len(first) > 0 && first[0] == '[':
		out := make([]promptIn, len(items))
		for i, it := range items {
			v, ok := ids(it)
			if !ok {
				return nil, invalidRequest("prompt", fmt.Sprintf("prompt[%d] must be an array of token ids (integers >= 0)", i))
			}
			if len(v) == 0 {
				return nil, invalidRequest("prompt", fmt.Sprintf("prompt[%d] is empty", i))
			}
			out[i] = promptIn{ids: v}
		}
		return out, nil
	default:
		v, ok := ids(raw)
		if !ok {
			return nil, bad
		}
		return []promptIn{{ids: v}}, nil
	}
}

func notReady(card pipeline.ModelCard) *apiError {
	return serverError(http.StatusServiceUnavailable, fmt.Sprintf("model %s is not ready: not every layer is served by the swarm yet", card.ID))
}

// outcome is one choice's finished generation, for the non-streamed answer.
type outcome struct {
	res      pipeline.Result
	text     string
	logprobs []pipeline.TokenLogprobs
}

// format is what differs between chat and text completions: the response objects.
type format interface {
	idPrefix() string
	promptParam() string // the request field the prompt came from
	full(id string, created int64, model string, outs []outcome, logprobs bool, u usage) any
	// chunk is one streamed piece of choice index; role marks the first chunk of a chat
	// choice, offset is the bytes of the choice's text sent before this piece.
	chunk(id string, created int64, model string, index int, role bool, text string, lps []pipeline.TokenLogprobs, logprobs bool, offset int, finish *string) any
	usageChunk(id string, created int64, model string, u usage) any
}

// chatFormat's tools, when set, turn the model's tool-call syntax into tool_calls.
type chatFormat struct {
	tools  *toolSet
	stream *toolStream
}

func (chatFormat) idPrefix() string { return "chatcmpl-" }

func (chatFormat) promptParam() string { return "messages" }

func (cf chatFormat) full(id string, created int64, model string, outs []outcome, logprobs bool, u usage) any {
	c := chatCompletion{ID: id, Object: "chat.completion", Created: created, Model: model, Usage: &u}
	for i, o := range outs {
		text, finish := o.text, finishReason(o.res)
		msg := &assistantMsg{Role: "assistant", Content: &text}
		if cf.tools != nil {
			if content, calls := cf.tools.parse(text); len(calls) > 0 {
				msg.ToolCalls, finish = cf.tools.toOpenAI(calls, false), "tool_calls"
				msg.Content = nil
				if content != "" {
					msg.Content = &content
				}
			}
		}
		ch := chatChoice{Index: i, Message: msg, FinishReason: &finish}
		if logprobs {
			ch.Logprobs = chatLogprobsOf(o.logprobs)
		}
		c.Choices = append(c.Choices, ch)
	}
	return c
}

func (cf chatFormat) chunk(id string, created int64, model string, index int, role bool, text string, lps []pipeline.TokenLogprobs, logprobs bool, _ int, finish *string) any {
	if cf.stream != nil && !role {
		if finish == nil {
			if text = cf.stream.push(text); text == "" {
				return nil // held back: a tool call may be starting
			}
		} else {
			content, calls := cf.stream.finish()
			delta := &assistantMsg{}
			if content != "" {
				delta.Content = &content
			}
			if len(calls) > 0 {
				delta.ToolCalls = cf.tools.toOpenAI(calls, true)
				f := "tool_calls"
				finish = &f
			}
			return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model,
				Choices: []chatChoice{{Index: index, Delta: delta, FinishReason: finish}}}
		}
	}
	delta := &assistantMsg{}
	if role {
		delta.Role = "assistant"
	}
	if finish == nil {
		delta.Content = &text
	}
	ch := chatChoice{Index: index, Delta: delta, FinishReason: finish}
	if logprobs && finish == nil && !role {
		ch.Logprobs = chatLogprobsOf(lps)
	}
	return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, Choices: []chatChoice{ch}}
}

func (chatFormat) usageChunk(id string, created int64, model string, u usage) any {
	return chatCompletion{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, Choices: []chatChoice{}, Usage: &u}
}

func tokenBytes(s string) []int {
	b := make([]int, len(s))
	for i := 0; i < len(s); i++ {
		b[i] = int(s[i])
	}
	return b
}

func chatLogprobsOf(lps []pipeline.TokenLogprobs) *chatLogprobs {
	out := &chatLogprobs{Content: make([]chatTokenLogprob, 0, len(lps))}
	for _, lp := range lps {
		e := chatTokenLogprob{Token: lp.Text, Logprob: float64(lp.Logprob), Bytes: tokenBytes(lp.Text), TopLogprobs: []chatTopLogprob{}}
		for _, t := range lp.Top {
			e.TopLogprobs = append(e.TopLogprobs, chatTopLogprob{Token: t.Text, Logprob: float64(t.Logprob), Bytes: tokenBytes(t.Text)})
		}
		out.Content = append(out.Content, e)
	}
	return out
}

type textFormat struct{}

func (textFormat) idPrefix() string { return "cmpl-" }

func (textFormat) promptParam() string { return "prompt" }

func (textFormat) full(id string, created int64, model string, outs []outcome, logprobs bool, u usage) any {
	c := textCompletion{ID: id, Object: "text_completion", Created: created, Model: model, Usage: &u}
	for i, o := range outs {
		finish := finishReason(o.res)
		ch := textChoice{Index: i, Text: o.text, FinishReason: &finish}
		if logprobs { // never with echo: the text is all completion
			ch.Logprobs = textLogprobsOf(o.logprobs, 0)
		}
		c.Choices = append(c.Choices, ch)
	}
	return c
}

func (textFormat) chunk(id string, created int64, model string, index int, _ bool, text string, lps []pipeline.TokenLogprobs, logprobs bool, offset int, finish *string) any {
	ch := textChoice{Index: index, Text: text, FinishReason: finish}
	if logprobs && finish == nil {
		ch.Logprobs = textLogprobsOf(lps, offset)
	}
	return textCompletion{ID: id, Object: "text_completion", Created: created, Model: model, Choices: []textChoice{ch}}
}

func (textFormat) usageChunk(id string, created int64, model string, u usage) any {
	return textCompletion{ID: id, Object: "text_completion", Created: created, Model: model, Choices: []textChoice{}, Usage: &u}
}

// textLogprobsOf is the legacy logprobs object; text_offset counts bytes from offset.
func textLogprobsOf(lps []pipeline.TokenLogprobs, offset int) *textLogprobs {
	out := &textLogprobs{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for _, lp := range lps {
		out.Tokens = append(out.Tokens, lp.Text)
		out.TokenLogprobs = append(out.TokenLogprobs, float64(lp.Logprob))
		top := make(map[string]float64, len(lp.Top))
		for _, t := range lp.Top {
			if _, dup := top[t.Text]; !dup { // two ids can share a text; the likelier one stays
				top[t.Text] = float64(t.Logprob)
			}
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
		out.TextOffset = append(out.TextOffset, offset)
		offset += len(lp.Text)
	}
	return out
}

// generate runs reqs (the choices) on the backend at once and answers in f's shapes, plain or
// streamed.
func (s *Server) generate(w http.ResponseWriter, r *http.Request, fields *samplingFields, reqs []pipeline.Request, f format) {
	start := time.Now()
	id := f.idPrefix() + randomID()
	created := s.now().Unix()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	model := reqs[0].Model
	logprobs := reqs[0].Logprobs
	perPrompt, _ := fields.choices()
	for i := range reqs {
		reqs[i].Client = clientKey(r)
	}

	var (
		outs []outcome
		err  error
	)
	if fields.Stream {
		includeUsage := fields.StreamOptions != nil && fields.StreamOptions.IncludeUsage
		outs, err = s.stream(ctx, cancel, w, reqs, f, id, created, includeUsage, perPrompt)
	} else {
		outs, err = s.runAll(ctx, cancel, reqs, nil)
		if err == nil {
			writeJSON(w, http.StatusOK, f.full(id, created, model, outs, logprobs, usageOfAll(outs, perPrompt)))
		} else if r.Context().Err() == nil {
			writeError(w, backendError(err, f.promptParam()))
		}
	}
	u := usageOfAll(outs, perPrompt)
	attrs := []any{"id", id, "model", model, "stream", fields.Stream, "choices", len(reqs), "prompt_tokens", u.PromptTokens,
		"completion_tokens", u.CompletionTokens, "duration", time.Since(start)}
	if len(outs) == 1 {
		attrs = append(attrs, "finish", outs[0].res.FinishReason)
	}
	if fields.User != "" {
		attrs = append(attrs, "user", fields.User)
	}
	switch {
	case r.Context().Err() != nil:
		s.log.Info("completion cancelled by client", attrs...)
	case err != nil:
		s.log.Warn("completion failed", append(attrs, "err", err)...)
	default:
		s.log.Info("completion", attrs...)
	}
}

// runAll runs every choice at once; emit (if not nil) gets each choice's deltas with its index,
// never two at a time. The first error cancels the others and is returned.
func (s *Server) runAll(ctx context.Context, cancel context.CancelFunc, reqs []pipeline.Request, emit func(int, pipeline.Delta) error) ([]outcome, error) {
	outs := make([]outcome, len(reqs))
	errs := make([]error, len(reqs))
	var mu sync.Mutex
	var wg sync.WaitGroup
	panics := make([]any, len(reqs))
	for i, req := range reqs {
		wg.Go(func() {
			// A panic is re-raised on the handler's goroutine, where the server recovers it.
			defer func() {
				if v := recover(); v != nil {
					panics[i] = v
					cancel()
				}
			}()
			var text strings.Builder
			res, err := s.backend.Generate(ctx, req, func(d pipeline.Delta) error {
				text.WriteString(d.Text)
				outs[i].logprobs = append(outs[i].logprobs, d.Logprobs...)
				if emit == nil {
					return ctx.Err()
				}
				mu.Lock()
				defer mu.Unlock()
				if err := ctx.Err(); err != nil {
					return err
				}
				return emit(i, d)
			})
			outs[i].res = res
			outs[i].text = res.Text
			if outs[i].text == "" {
				outs[i].text = text.String()
			}
			if err != nil {
				errs[i] = err
				cancel()
			}
		})
	}
	wg.Wait()
	for _, v := range panics {
		if v != nil {
			panic(v)
		}
	}
	// The first failure, not the cancellations it caused in the others.
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return outs, err
		}
	}
	for _, err := range errs {
		if err != nil {
			return outs, err
		}
	}
	return outs, nil
}

// stream answers with server-sent events. Headers go out with the first piece of text, so that
// a request the backend refuses straight away (a prompt too long, no route) still gets a
// proper status code; after that an error can only be reported as an error event.
func (s *Server) stream(ctx context.Context, cancel context.CancelFunc, w http.ResponseWriter, reqs []pipeline.Request, f format, id string, created int64, includeUsage bool, perPrompt int) ([]outcome, error) {
	rc := http.NewResponseController(w)
	model := reqs[0].Model
	logprobs := reqs[0].Logprobs
	var (
		mu      sync.Mutex // guards the writer against the backend's late calls
		started bool
		done    bool
		offsets = make([]int, len(reqs))
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
			for i := range reqs {
				if err := send(f.chunk(id, created, model, i, true, "", nil, logprobs, 0, nil)); err != nil {
					return err
				}
			}
		}
		return nil
	}

	outs, err := s.runAll(ctx, cancel, reqs, func(i int, d pipeline.Delta) error {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return errors.New("emit called after Generate returned")
		}
		if d.Text == "" && !(logprobs && len(d.Logprobs) > 0) {
			return nil
		}
		if err := begin(); err != nil {
			return err
		}
		off := offsets[i]
		offsets[i] += len(d.Text)
		c := f.chunk(id, created, model, i, false, d.Text, d.Logprobs, logprobs, off, nil)
		if c == nil {
			return nil // held back for now (a tool call may be starting)
		}
		return send(c)
	})
	mu.Lock()
	defer mu.Unlock()
	done = true
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return outs, err // the client went away: nobody to tell
		}
		if !started {
			writeError(w, backendError(err, f.promptParam()))
			return outs, err
		}
		ae := backendError(err, f.promptParam())
		_ = send(struct {
			Error *apiError `json:"error"`
		}{ae})
		return outs, err
	}
	if err := begin(); err != nil {
		return outs, err
	}
	for i, o := range outs {
		finish := finishReason(o.res)
		if err := send(f.chunk(id, created, model, i, false, "", nil, logprobs, 0, &finish)); err != nil {
			return outs, err
		}
	}
	if includeUsage {
		if err := send(f.usageChunk(id, created, model, usageOfAll(outs, perPrompt))); err != nil {
			return outs, err
		}
	}
	if _, err := io.WriteString(w, "data: [DONE]\n\n"); err != nil {
		return outs, fmt.Errorf("writing to client: %w", err)
	}
	return outs, rc.Flush()
}

func finishReason(res pipeline.Result) string {
	if res.FinishReason == "" {
		return "stop"
	}
	return res.FinishReason
}

// usageOfAll counts each prompt once (its perPrompt choices share it, as OpenAI counts them)
// and every choice's completion.
func usageOfAll(outs []outcome, perPrompt int) usage {
	var u usage
	for i, o := range outs {
		if perPrompt <= 1 || i%perPrompt == 0 {
			u.PromptTokens += o.res.PromptTokens
		}
		u.CompletionTokens += o.res.CompletionTokens
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	return u
}

func randomID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b[:])
}
