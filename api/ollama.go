package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/strata-llm/strata/api/toolcall"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/grammar"
	"github.com/strata-llm/strata/pipeline/sample"
)

// Ollama's API (https://github.com/ollama/ollama/blob/main/docs/api.md), served beside
// OpenAI's so that tools that speak only Ollama (Open WebUI, Continue, editors) reach the
// swarm. Errors are Ollama's {"error": "..."}. Fields are honoured, accepted as a documented
// no-op (resource hints the swarm decides for itself), or refused with a 400 naming them.

// ollamaAPIVersion is what /api/version reports: the Ollama release whose API this follows
// (the engine Strata builds on).
const ollamaAPIVersion = "0.24.0"

func (s *Server) mountOllama() {
	s.apiMux.Handle("/api/version", s.ollamaMethod(http.MethodGet, s.handleOllamaVersion))
	s.apiMux.Handle("/api/tags", s.ollamaMethod(http.MethodGet, s.handleOllamaTags))
	s.apiMux.Handle("/api/ps", s.ollamaMethod(http.MethodGet, s.handleOllamaPS))
	s.apiMux.Handle("/api/show", s.ollamaMethod(http.MethodPost, s.handleOllamaShow))
	s.apiMux.Handle("/api/chat", s.ollamaMethod(http.MethodPost, s.handleOllamaChat))
	s.apiMux.Handle("/api/generate", s.ollamaMethod(http.MethodPost, s.handleOllamaGenerate))
	s.apiMux.Handle("/api/embed", s.ollamaMethod(http.MethodPost, s.handleOllamaEmbed))
	s.apiMux.Handle("/api/embeddings", s.ollamaMethod(http.MethodPost, s.handleOllamaEmbeddings))
	s.apiMux.Handle("/api/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ollamaError(w, http.StatusNotFound, fmt.Sprintf("unknown endpoint %s %s: this server offers Ollama's version, tags, ps, show, chat, generate, embed and embeddings", r.Method, r.URL.Path))
	}))
}

func ollamaError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// ollamaAPIError answers an OpenAI-shaped error in Ollama's shape, with its status.
func ollamaAPIError(w http.ResponseWriter, e *apiError) { ollamaError(w, e.Status, e.Message) }

func (s *Server) ollamaMethod(m string, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != m {
			w.Header().Set("Allow", m)
			ollamaError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s is not allowed; use %s", r.Method, r.URL.Path, m))
			return
		}
		h(w, r)
	})
}

func (s *Server) handleOllamaVersion(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"version": ollamaAPIVersion})
}

type ollamaDetails struct {
	ParentModel       string   `json:"parent_model"`
	Format            string   `json:"format"`
	Family            string   `json:"family"`
	Families          []string `json:"families"`
	ParameterSize     string   `json:"parameter_size"`
	QuantizationLevel string   `json:"quantization_level"`
}

type ollamaModel struct {
	Name       string        `json:"name"`
	Model      string        `json:"model"`
	ModifiedAt time.Time     `json:"modified_at,omitzero"`
	Size       int64         `json:"size"`
	Digest     string        `json:"digest"`
	Details    ollamaDetails `json:"details"`
	ExpiresAt  *time.Time    `json:"expires_at,omitempty"`
	SizeVRAM   *int64        `json:"size_vram,omitempty"`
	// Strata's own: the context the swarm serves, and whether every layer is served now.
	ContextLength int  `json:"context_length,omitempty"`
	Ready         bool `json:"ready"`
}

func (s *Server) ollamaModels(w http.ResponseWriter, r *http.Request, readyOnly, running bool) {
	cards, err := s.backend.Models(r.Context())
	if err != nil {
		ollamaError(w, http.StatusServiceUnavailable, "listing models: "+err.Error())
		return
	}
	list := []ollamaModel{}
	for _, c := range cards {
		if readyOnly && !c.Ready {
			continue
		}
		m := ollamaModel{Name: c.ID, Model: c.ID, Digest: c.SHA256, Details: ollamaDetails{Format: "gguf", Families: []string{}},
			ModifiedAt: s.now().UTC(), ContextLength: c.ContextLength, Ready: c.Ready}
		if running {
			// The swarm keeps its model loaded for as long as its nodes run.
			never := time.Date(2318, 1, 1, 0, 0, 0, 0, time.UTC)
			var zero int64
			m.ExpiresAt, m.SizeVRAM = &never, &zero
		}
		list = append(list, m)
	}
	writeJSON(w, http.StatusOK, map[string]any{"models": list})
}

func (s *Server) handleOllamaTags(w http.ResponseWriter, r *http.Request) {
	s.ollamaModels(w, r, false, false)
}

func (s *Server) handleOllamaPS(w http.ResponseWriter, r *http.Request) {
	s.ollamaModels(w, r, true, true)
}

// findOllamaModel resolves a model name as Ollama's clients write it: "name" or "name:latest".
func (s *Server) findOllamaModel(ctx context.Context, name string) (pipeline.ModelCard, *apiError) {
	card, e := s.findModel(ctx, name)
	if e != nil && e.Status == http.StatusNotFound {
		if base, ok := strings.CutSuffix(name, ":latest"); ok {
			if c, e2 := s.findModel(ctx, base); e2 == nil {
				return c, nil
			}
		}
		e.Message = fmt.Sprintf("model '%s' not found", name)
	}
	return card, e
}

var ollamaShowKeys = []string{"model", "name", "verbose"}

func (s *Server) handleOllamaShow(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model   string `json:"model"`
		Name    string `json:"name"` // the older spelling
		Verbose bool   `json:"verbose"`
	}
	if e := s.decode(w, r, &req, ollamaShowKeys); e != nil {
		ollamaAPIError(w, e)
		return
	}
	name := req.Model
	if name == "" {
		name = req.Name
	}
	card, e := s.findOllamaModel(r.Context(), name)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	caps := []string{"completion"}
	if card.ChatTemplate != "" {
		caps = append(caps, "tools") // rendered through the template, or described in the system prompt
	}
	if _, ok := s.backend.(Embedder); ok {
		caps = append(caps, "embedding")
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"modelfile":  fmt.Sprintf("# served by a Strata swarm\nFROM %s\n", card.ID),
		"parameters": "",
		"template":   card.ChatTemplate,
		"details":    ollamaDetails{Format: "gguf", Families: []string{}},
		"model_info": map[string]any{
			"general.context_length": card.ContextLength,
			"general.vocab_size":     card.Vocab,
			"general.sha256":         card.SHA256,
		},
		"capabilities": caps,
		"modified_at":  s.now().UTC(),
	})
}

// ollamaOptions are the "options" of chat and generate. Ollama's sampling defaults apply to
// what is absent: temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over 64 tokens.
type ollamaOptions map[string]json.RawMessage

// ollamaHints are options that size a local runner (memory, threads, GPUs, batch): a swarm
// sizes its stages itself, so they are accepted and change nothing, as documented.
var ollamaHints = []string{"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread", "numa", "low_vram", "vocab_only", "num_keep"}

// request applies the options to req.
func (o ollamaOptions) apply(req *pipeline.Request, card pipeline.ModelCard) *apiError {
	p := sample.Params{Temperature: 0.8, TopK: 40, TopP: 0.9, RepeatPenalty: 1.1, RepeatLastN: 64}
	num := func(k string) (float64, bool, *apiError) {
		raw, ok := o[k]
		if !ok || string(bytes.TrimSpace(raw)) == "null" {
			return 0, false, nil
		}
		var v float64
		if err := json.Unmarshal(raw, &v); err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return 0, false, invalidRequest("options."+k, fmt.Sprintf("options.%s must be a number, got %s", k, raw))
		}
		return v, true, nil
	}
	// The plain float options; the rest need checks of their own below.
	floats := map[string]*float32{
		"temperature": &p.Temperature, "top_p": &p.TopP, "min_p": &p.MinP,
		"repeat_penalty": &p.RepeatPenalty, "presence_penalty": &p.PresencePenalty,
		"frequency_penalty": &p.FrequencyPenalty,
	}
	repeatOff := false // repeat_last_n 0 wins over repeat_penalty, whichever the map yields first
	for k, raw := range o {
		var e *apiError
		var v float64
		var ok bool
		if f, isFloat := floats[k]; isFloat {
			if v, ok, e = num(k); ok {
				*f = float32(v)
			}
			if e != nil {
				return e
			}
			continue
		}
		switch k {
		case "top_k":
			if v, ok, e = num(k); ok {
				p.TopK = int(v)
			}
		case "repeat_last_n":
			if v, ok, e = num(k); ok {
				switch {
				case v == 0:
					repeatOff = true // Ollama: 0 disables
				case v == -1:
					p.RepeatLastN = max(card.ContextLength, 1) // Ollama: -1 is the whole context
				case v < -1:
					e = invalidRequest("options.repeat_last_n", fmt.Sprintf("options.repeat_last_n must be -1, 0 or more, got %g", v))
				default:
					p.RepeatLastN = int(v)
				}
			}
		case "seed":
			if v, ok, e = num(k); ok && v >= 0 {
				p.Seed = uint64(v)
				if p.Seed == 0 {
					p.Seed = seedZero
				}
			}
		case "num_predict":
			if v, ok, e = num(k); ok {
				switch {
				case v > 0:
					req.MaxTokens = int(v)
				case v == -1 || v == -2:
					req.MaxTokens = 0 // until the context is full
				default:
					e = invalidRequest("options.num_predict", fmt.Sprintf("options.num_predict must be positive, -1 or -2, got %g", v))
				}
			}
		case "stop":
			stops, err := stringOrArray(raw)
			if err != nil {
				e = invalidRequest("options.stop", "options.stop "+err.Error())
			}
			req.Stop = append(req.Stop, stops...)
		case "typical_p", "tfs_z":
			if v, ok, e = num(k); ok && v != 1 && v != 0 {
				e = invalidRequest("options."+k, fmt.Sprintf("options.%s is not supported (only 1, off)", k))
			}
		case "mirostat":
			if v, ok, e = num(k); ok && v != 0 {
				e = invalidRequest("options.mirostat", "options.mirostat is not supported (only 0, off)")
			}
		case "mirostat_tau", "mirostat_eta":
			// Only read by mirostat, which is off.
		case "penalize_newline":
			var b bool
			if err := json.Unmarshal(raw, &b); err != nil || b {
				e = invalidRequest("options.penalize_newline", "options.penalize_newline is not supported (only false)")
			}
		default:
			if !contains(ollamaHints, k) {
				e = invalidRequest("options."+k, fmt.Sprintf("unknown option %q", k))
			}
		}
		if e != nil {
			return e
		}
	}
	if repeatOff {
		p.RepeatPenalty = 0
	}
	if req.MaxTokens > 0 && card.ContextLength > 0 && req.MaxTokens > card.ContextLength {
		req.MaxTokens = 0 // Ollama stops at the context's end rather than refusing
	}
	if len(req.Stop) > maxStops {
		return invalidRequest("options.stop", fmt.Sprintf("at most %d stop sequences are supported", maxStops))
	}
	if err := p.Validate(); err != nil {
		return invalidRequest("options", "options: "+err.Error())
	}
	if p.TopK < 0 {
		p.TopK = 0
	}
	req.Sampling = p.WithRandomSeed()
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// ollamaCommon are the fields chat and generate share.
type ollamaCommon struct {
	Model     string          `json:"model"`
	Format    json.RawMessage `json:"format"`
	Options   ollamaOptions   `json:"options"`
	Stream    *bool           `json:"stream"`
	KeepAlive json.RawMessage `json:"keep_alive"` // accepted: a swarm keeps its model loaded
	Think     json.RawMessage `json:"think"`
	Tools     json.RawMessage `json:"tools"`
}

// unsupported refuses what this server does not do; tools are for chat only (generate has
// no messages to answer a call in).
func (c *ollamaCommon) unsupported(tools bool) *apiError {
	set := func(raw json.RawMessage) bool {
		t := bytes.TrimSpace(raw)
		return len(t) > 0 && string(t) != "null" && string(t) != `""`
	}
	switch {
	case !tools && set(c.Tools) && string(bytes.TrimSpace(c.Tools)) != "[]":
		return invalidRequest("tools", "tools are not supported by /api/generate; send them to /api/chat")
	case set(c.Think) && string(bytes.TrimSpace(c.Think)) != "false":
		return invalidRequest("think", "think is not supported: the swarm's models are served without a thinking mode")
	}
	return nil
}

// grammar constrains the request to format: "json" or a JSON schema.
func (c *ollamaCommon) grammar(req *pipeline.Request) *apiError {
	g, err := grammar.FromOllamaFormat(c.Format)
	if err != nil {
		return invalidRequest("format", fmt.Sprintf("format: %v", err))
	}
	req.Grammar = g
	return nil
}

// unloads reports keep_alive 0, which with nothing to generate asks Ollama to unload.
func (c *ollamaCommon) unloads() bool {
	k := string(bytes.TrimSpace(c.KeepAlive))
	return k == "0" || k == `"0"` || k == `"0s"` || k == `"0m"`
}

type ollamaMessage struct {
	Role       string          `json:"role"`
	Content    string          `json:"content"`
	Images     json.RawMessage `json:"images,omitempty"`
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	ToolName   string          `json:"tool_name,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
	Thinking   string          `json:"thinking,omitempty"`
}

// ollamaToolCall is a tool call in Ollama's shape: arguments as an object, not JSON text.
type ollamaToolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     int             `json:"index"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// ollamaCalls reads an assistant message's earlier tool calls.
func ollamaCalls(i int, raw json.RawMessage) ([]callIn, *apiError) {
	var calls []struct {
		ID       string `json:"id"`
		Function struct {
			Name      string `json:"name"`
			Arguments any    `json:"arguments"`
		} `json:"function"`
	}
	if err := json.Unmarshal(raw, &calls); err != nil {
		return nil, invalidRequest(fmt.Sprintf("messages[%d].tool_calls", i),
			fmt.Sprintf("messages[%d].tool_calls must be an array of {function: {name, arguments: {...}}}: %v", i, err))
	}
	out := make([]callIn, len(calls))
	for j, c := range calls {
		if c.Function.Name == "" {
			return nil, invalidRequest(fmt.Sprintf("messages[%d].tool_calls", i), fmt.Sprintf("messages[%d].tool_calls[%d].function.name is empty", i, j))
		}
		args := c.Function.Arguments
		if s, ok := args.(string); ok { // some clients send OpenAI's JSON text
			if err := json.Unmarshal([]byte(s), &args); err != nil {
				return nil, invalidRequest(fmt.Sprintf("messages[%d].tool_calls", i), fmt.Sprintf("messages[%d].tool_calls[%d].function.arguments is not a JSON object", i, j))
			}
		}
		out[j] = callIn{ID: c.ID, Name: c.Function.Name, Args: args}
	}
	return out, nil
}

// toOllama turns parsed calls into Ollama's shape.
func toOllama(calls []toolcall.Call) []ollamaToolCall {
	out := make([]ollamaToolCall, len(calls))
	for i, c := range calls {
		out[i].ID = "call_" + randomID()[:8]
		out[i].Function.Index = i
		out[i].Function.Name = c.Name
		out[i].Function.Arguments = json.RawMessage(c.Arguments)
	}
	return out
}

var ollamaChatKeys = []string{"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}

func (s *Server) handleOllamaChat(w http.ResponseWriter, r *http.Request) {
	var req struct {
		ollamaCommon
		Messages []ollamaMessage `json:"messages"`
	}
	if e := s.decode(w, r, &req, ollamaChatKeys); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := req.unsupported(true); e != nil {
		ollamaAPIError(w, e)
		return
	}
	card, e := s.findOllamaModel(r.Context(), req.Model)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	if len(req.Messages) == 0 {
		// Ollama loads (or with keep_alive 0 unloads) the model and answers done.
		reason := "load"
		if req.unloads() {
			reason = "unload"
		}
		writeJSON(w, http.StatusOK, map[string]any{"model": card.ID, "created_at": s.now().UTC(),
			"message": map[string]string{"role": "assistant", "content": ""}, "done_reason": reason, "done": true})
		return
	}
	msgs := make([]map[string]any, len(req.Messages))
	for i, m := range req.Messages {
		if _, ok := chatRoles[m.Role]; !ok || m.Role == "developer" {
			ollamaError(w, http.StatusBadRequest, fmt.Sprintf("messages[%d]: unknown role %q (want system, user, assistant or tool)", i, m.Role))
			return
		}
		if t := bytes.TrimSpace(m.Images); len(t) > 0 && string(t) != "null" && string(t) != "[]" {
			ollamaError(w, http.StatusBadRequest, fmt.Sprintf("messages[%d].images: images are not supported: this server takes text only", i))
			return
		}
		msg := map[string]any{"role": m.Role, "content": m.Content}
		if t := bytes.TrimSpace(m.ToolCalls); len(t) > 0 && string(t) != "null" && string(t) != "[]" {
			calls, e := ollamaCalls(i, t)
			if e != nil {
				ollamaAPIError(w, e)
				return
			}
			msg["tool_calls"] = templateCalls(calls)
		}
		if m.ToolName != "" {
			msg["name"] = m.ToolName
		}
		if m.ToolCallID != "" {
			msg["tool_call_id"] = m.ToolCallID
		}
		msgs[i] = msg
	}
	preq := pipeline.Request{Model: card.ID}
	if e := req.Options.apply(&preq, card); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := req.grammar(&preq); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if !card.Ready {
		ollamaAPIError(w, notReady(card))
		return
	}
	// Ollama has no tool_choice: the model decides, and format (when set) still constrains.
	tools, e := parseTools(req.Tools, nil, card.ChatTemplate)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	preq.KeepControl = tools != nil
	prompt, e := s.renderChatTools(card, msgs, tools)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	preq.Prompt = prompt
	s.ollamaGenerate(w, r, preq, req.Stream == nil || *req.Stream, tools, func(text string, calls []toolcall.Call) map[string]any {
		msg := map[string]any{"role": "assistant", "content": text}
		if len(calls) > 0 {
			msg["tool_calls"] = toOllama(calls)
		}
		return map[string]any{"message": msg}
	})
}

var ollamaGenerateKeys = []string{"model", "prompt", "suffix", "images", "format", "options", "system", "template", "context",
	"stream", "raw", "keep_alive", "think", "tools"}

func (s *Server) handleOllamaGenerate(w http.ResponseWriter, r *http.Request) {
	var req struct {
		ollamaCommon
		Prompt   string          `json:"prompt"`
		Suffix   string          `json:"suffix"`
		Images   json.RawMessage `json:"images"`
		System   string          `json:"system"`
		Template string          `json:"template"`
		Context  []int64         `json:"context"`
		Raw      bool            `json:"raw"`
	}
	if e := s.decode(w, r, &req, ollamaGenerateKeys); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := req.unsupported(false); e != nil {
		ollamaAPIError(w, e)
		return
	}
	switch {
	case req.Suffix != "":
		ollamaError(w, http.StatusBadRequest, "suffix (fill in the middle) is not supported")
		return
	case req.Template != "":
		ollamaError(w, http.StatusBadRequest, "template is not supported: prompts are rendered with the model's own chat template (or sent raw)")
		return
	case len(bytes.TrimSpace(req.Images)) > 0 && string(bytes.TrimSpace(req.Images)) != "null" && string(bytes.TrimSpace(req.Images)) != "[]":
		ollamaError(w, http.StatusBadRequest, "images are not supported: this server takes text only")
		return
	}
	card, e := s.findOllamaModel(r.Context(), req.Model)
	if e != nil {
		ollamaAPIError(w, e)
		return
	}
	if req.Prompt == "" && req.System == "" && len(req.Context) == 0 {
		reason := "load"
		if req.unloads() {
			reason = "unload"
		}
		writeJSON(w, http.StatusOK, map[string]any{"model": card.ID, "created_at": s.now().UTC(), "response": "", "done_reason": reason, "done": true})
		return
	}
	preq := pipeline.Request{Model: card.ID}
	if e := req.Options.apply(&preq, card); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if e := req.grammar(&preq); e != nil {
		ollamaAPIError(w, e)
		return
	}
	if !card.Ready {
		ollamaAPIError(w, notReady(card))
		return
	}
	if len(req.Context) > 0 {
		// The context Ollama returned from an earlier call: token ids, continued by this prompt.
		// Strata returns none, so only a client that kept ids from elsewhere sends one.
		ollamaError(w, http.StatusBadRequest, "context (token ids of an earlier exchange) is not supported: send the conversation to /api/chat")
		return
	}
	if req.Raw {
		preq.Prompt = req.Prompt
	} else {
		var msgs []map[string]any
		if req.System != "" {
			msgs = append(msgs, map[string]any{"role": "system", "content": req.System})
		}
		msgs = append(msgs, map[string]any{"role": "user", "content": req.Prompt})
		if card.ChatTemplate == "" {
			if req.System != "" {
				ollamaError(w, http.StatusBadRequest, fmt.Sprintf("model %s has no chat template to put the system prompt in; send raw", card.ID))
				return
			}
			preq.Prompt = req.Prompt
		} else {
			prompt, e := s.renderChat(card, msgs)
			if e != nil {
				ollamaAPIError(w, e)
				return
			}
			preq.Prompt = prompt
		}
	}
	s.ollamaGenerate(w, r, preq, req.Stream == nil || *req.Stream, nil, func(text string, _ []toolcall.Call) map[string]any {
		return map[string]any{"response": text}
	})
}

// ollamaGenerate runs req and answers as Ollama does: NDJSON lines of pieces then a final line
// with done, done_reason and timings (nanoseconds), or that final line alone with the whole
// text when not streaming. With tools, the model's calls are parsed out of the text: streamed,
// text that may start a call is held and the calls go out in a line of their own before the
// final one, as Ollama sends them.
func (s *Server) ollamaGenerate(w http.ResponseWriter, r *http.Request, req pipeline.Request, stream bool, tools *toolSet, piece func(string, []toolcall.Call) map[string]any) {
	ctx := r.Context()
	start := time.Now()
	var (
		mu        sync.Mutex
		started   bool
		done      bool
		firstTok  time.Time
		text      strings.Builder
		enc       = json.NewEncoder(w)
		rc        = http.NewResponseController(w)
		writeLine = func(v map[string]any) error {
			if err := enc.Encode(v); err != nil {
				return fmt.Errorf("writing to client: %w", err)
			}
			return rc.Flush()
		}
	)
	enc.SetEscapeHTML(false)
	var held *toolStream
	if tools != nil {
		held = &toolStream{ts: tools}
	}
	line := func(t string, calls []toolcall.Call) map[string]any {
		m := piece(t, calls)
		m["model"] = req.Model
		m["created_at"] = s.now().UTC()
		m["done"] = false
		return m
	}
	begin := func() {
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
		}
	}
	res, err := s.backend.Generate(ctx, req, func(d pipeline.Delta) error {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return errors.New("emit called after Generate returned")
		}
		if firstTok.IsZero() {
			firstTok = time.Now()
		}
		text.WriteString(d.Text)
		if !stream || d.Text == "" {
			return ctx.Err()
		}
		t := d.Text
		if held != nil {
			if t = held.push(t); t == "" {
				return ctx.Err() // held back: a tool call may be starting
			}
		}
		begin()
		return writeLine(line(t, nil))
	})
	mu.Lock()
	defer mu.Unlock()
	done = true
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		e := backendError(err, "prompt")
		s.log.Warn("ollama generation failed", "model", req.Model, "err", err)
		if !started {
			ollamaAPIError(w, e)
			return
		}
		_ = writeLine(map[string]any{"error": e.Message})
		return
	}
	if firstTok.IsZero() {
		firstTok = time.Now()
	}
	out := res.Text
	if out == "" || stream {
		out = text.String()
	}
	final := line("", nil)
	switch {
	case stream && held != nil:
		if content, calls := held.finish(); content != "" || len(calls) > 0 {
			begin()
			if err := writeLine(line(content, calls)); err != nil {
				return
			}
		}
	case !stream && tools != nil:
		content, calls := tools.parse(out)
		if len(calls) == 0 {
			content = out
		}
		final = line(content, calls)
	case !stream:
		final = line(out, nil)
	}
	end := time.Now()
	final["done"] = true
	final["done_reason"] = finishReason(res)
	final["total_duration"] = end.Sub(start).Nanoseconds()
	final["load_duration"] = 0
	final["prompt_eval_count"] = res.PromptTokens
	final["prompt_eval_duration"] = firstTok.Sub(start).Nanoseconds()
	final["eval_count"] = res.CompletionTokens
	final["eval_duration"] = end.Sub(firstTok).Nanoseconds()
	if stream {
		begin()
		_ = writeLine(final)
	} else {
		writeJSON(w, http.StatusOK, final)
	}
	s.log.Info("ollama completion", "model", req.Model, "stream", stream, "prompt_tokens", res.PromptTokens,
		"completion_tokens", res.CompletionTokens, "finish", res.FinishReason, "duration", time.Since(start))
}
