package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
)

// Anthropic's Messages API (https://docs.anthropic.com/en/api/messages) for text: a request is
// rendered through the model's chat template like an OpenAI chat, and answered as a message,
// or streamed as Anthropic's events. Errors take Anthropic's shape.

func (s *Server) mountAnthropic() {
	s.apiMux.Handle("/v1/messages", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			anthropicError(w, &apiError{Status: http.StatusMethodNotAllowed, Message: fmt.Sprintf("%s %s is not allowed; use POST", r.Method, r.URL.Path)})
			return
		}
		s.handleMessages(w, r)
	}))
}

type anthropicErrorBody struct {
	Type  string `json:"type"`
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

func anthropicErrorOf(e *apiError) anthropicErrorBody {
	var b anthropicErrorBody
	b.Type = "error"
	b.Error.Message = e.Message
	switch e.Status {
	case http.StatusUnauthorized:
		b.Error.Type = "authentication_error"
	case http.StatusForbidden:
		b.Error.Type = "permission_error"
	case http.StatusNotFound:
		b.Error.Type = "not_found_error"
	case http.StatusRequestEntityTooLarge:
		b.Error.Type = "request_too_large"
	case http.StatusTooManyRequests:
		b.Error.Type = "rate_limit_error"
	case http.StatusServiceUnavailable:
		b.Error.Type = "overloaded_error"
	default:
		if e.Status >= 400 && e.Status < 500 {
			b.Error.Type = "invalid_request_error"
		} else {
			b.Error.Type = "api_error"
		}
	}
	return b
}

func anthropicError(w http.ResponseWriter, e *apiError) { writeJSON(w, e.Status, anthropicErrorOf(e)) }

var messagesKeys = []string{"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k",
	"stream", "metadata", "tools", "tool_choice", "thinking", "service_tier"}

type messagesRequest struct {
	Model         string          `json:"model"`
	MaxTokens     *int            `json:"max_tokens"`
	Messages      []anthMessage   `json:"messages"`
	System        json.RawMessage `json:"system"`
	StopSequences []string        `json:"stop_sequences"`
	Temperature   *float64        `json:"temperature"`
	TopP          *float64        `json:"top_p"`
	TopK          *int            `json:"top_k"`
	Stream        bool            `json:"stream"`
	Metadata      *struct {
		UserID string `json:"user_id"` // logged with the request summary
	} `json:"metadata"`
	Tools       json.RawMessage        `json:"tools"`
	ToolChoice  json.RawMessage        `json:"tool_choice"`
	Thinking    *struct{ Type string } `json:"thinking"`
	ServiceTier string                 `json:"service_tier"`
}

type anthMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// anthText reads content: a string or an array of text blocks. cache_control on a block is a
// caching hint for Anthropic's servers, accepted with no effect.
func anthText(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	if raw[0] == '"' {
		var s string
		err := json.Unmarshal(raw, &s)
		return s, err
	}
	var blocks []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &blocks); err != nil {
		return "", errors.New("must be a string or an array of content blocks")
	}
	var b strings.Builder
	for _, bl := range blocks {
		if bl.Type != "text" {
			return "", fmt.Errorf("content block of type %q is not supported: this server takes text blocks only", bl.Type)
		}
		b.WriteString(bl.Text)
	}
	return b.String(), nil
}

func (s *Server) handleMessages(w http.ResponseWriter, r *http.Request) {
	var mr messagesRequest
	if e := s.decode(w, r, &mr, messagesKeys); e != nil {
		anthropicError(w, e)
		return
	}
	set := func(raw json.RawMessage) bool {
		t := bytes.TrimSpace(raw)
		return len(t) > 0 && string(t) != "null" && string(t) != "[]"
	}
	bad := func(msg string) { anthropicError(w, invalidRequest("", msg)) }
	switch {
	case mr.MaxTokens == nil:
		bad("max_tokens: field required")
		return
	case *mr.MaxTokens < 1:
		bad(fmt.Sprintf("max_tokens: must be at least 1, got %d", *mr.MaxTokens))
		return
	case len(mr.Messages) == 0:
		bad("messages: at least one message is required")
		return
	case set(mr.Tools):
		bad("tools: tool use is not supported yet")
		return
	case set(mr.ToolChoice):
		bad("tool_choice: tool use is not supported yet")
		return
	case mr.Thinking != nil && mr.Thinking.Type != "disabled":
		bad("thinking: extended thinking is not supported")
		return
	case mr.ServiceTier != "" && mr.ServiceTier != "auto" && mr.ServiceTier != "standard_only":
		bad(fmt.Sprintf("service_tier: %q is not offered; use auto or standard_only", mr.ServiceTier))
		return
	case mr.Temperature != nil && (math.IsNaN(*mr.Temperature) || *mr.Temperature < 0 || *mr.Temperature > 1):
		bad(fmt.Sprintf("temperature: must be between 0 and 1, got %g", *mr.Temperature))
		return
	case mr.TopP != nil && (math.IsNaN(*mr.TopP) || *mr.TopP < 0 || *mr.TopP > 1):
		bad(fmt.Sprintf("top_p: must be between 0 and 1, got %g", *mr.TopP))
		return
	case mr.TopK != nil && *mr.TopK < 0:
		bad(fmt.Sprintf("top_k: must be >= 0, got %d", *mr.TopK))
		return
	case len(mr.StopSequences) > maxStops:
		bad(fmt.Sprintf("stop_sequences: at most %d are supported", maxStops))
		return
	}
	var msgs []map[string]any
	system, err := anthText(mr.System)
	if err != nil {
		bad("system: " + err.Error())
		return
	}
	if system != "" {
		msgs = append(msgs, map[string]any{"role": "system", "content": system})
	}
	for i, m := range mr.Messages {
		if m.Role != "user" && m.Role != "assistant" {
			bad(fmt.Sprintf("messages.%d.role: must be user or assistant, got %q", i, m.Role))
			return
		}
		text, err := anthText(m.Content)
		if err != nil {
			bad(fmt.Sprintf("messages.%d.content: %v", i, err))
			return
		}
		msgs = append(msgs, map[string]any{"role": m.Role, "content": text})
	}
	card, e := s.findModel(r.Context(), mr.Model)
	if e != nil {
		anthropicError(w, e)
		return
	}
	if card.ContextLength > 0 && *mr.MaxTokens > card.ContextLength {
		bad(fmt.Sprintf("max_tokens: %d is more than the model's context of %d tokens", *mr.MaxTokens, card.ContextLength))
		return
	}
	if !card.Ready {
		anthropicError(w, notReady(card))
		return
	}
	// A final assistant message is a prefill: the answer continues it. The chat template
	// would close the turn, so it is rendered without it and appended.
	var prefill string
	if last := msgs[len(msgs)-1]; last["role"] == "assistant" {
		prefill = strings.TrimRight(last["content"].(string), " \t\n")
		msgs = msgs[:len(msgs)-1]
	}
	prompt, e := s.renderChat(card, msgs)
	if e != nil {
		anthropicError(w, e)
		return
	}
	p := sample.Params{Temperature: 1}
	if mr.Temperature != nil {
		p.Temperature = float32(*mr.Temperature)
	}
	if mr.TopP != nil {
		p.TopP = float32(*mr.TopP)
	}
	if mr.TopK != nil {
		p.TopK = *mr.TopK
	}
	req := pipeline.Request{Model: card.ID, Prompt: prompt + prefill, MaxTokens: *mr.MaxTokens, Sampling: p.WithRandomSeed()}
	for _, st := range mr.StopSequences {
		if st != "" {
			req.Stop = append(req.Stop, st)
		}
	}
	user := ""
	if mr.Metadata != nil {
		user = mr.Metadata.UserID
	}
	s.messages(w, r, req, mr.Stream, user)
}

type anthUsage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

type anthBlock struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type anthResponse struct {
	ID           string      `json:"id"`
	Type         string      `json:"type"`
	Role         string      `json:"role"`
	Model        string      `json:"model"`
	Content      []anthBlock `json:"content"`
	StopReason   *string     `json:"stop_reason"`
	StopSequence *string     `json:"stop_sequence"`
	Usage        anthUsage   `json:"usage"`
}

func anthStop(res pipeline.Result) (reason string, seq *string) {
	switch {
	case res.StopSequence != "":
		st := res.StopSequence
		return "stop_sequence", &st
	case res.FinishReason == "length":
		return "max_tokens", nil
	}
	return "end_turn", nil
}

func (s *Server) messages(w http.ResponseWriter, r *http.Request, req pipeline.Request, stream bool, user string) {
	ctx := r.Context()
	start := time.Now()
	id := "msg_" + randomID()
	var (
		mu      sync.Mutex
		started bool
		done    bool
		text    strings.Builder
		rc      = http.NewResponseController(w)
	)
	event := func(name string, v any) error {
		b, err := marshal(v)
		if err != nil {
			return fmt.Errorf("encoding event: %w", err)
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", name, b); err != nil {
			return fmt.Errorf("writing to client: %w", err)
		}
		return rc.Flush()
	}
	begin := func(inputTokens int) error {
		if started {
			return nil
		}
		started = true
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no")
		w.WriteHeader(http.StatusOK)
		msg := anthResponse{ID: id, Type: "message", Role: "assistant", Model: req.Model, Content: []anthBlock{}, Usage: anthUsage{InputTokens: inputTokens}}
		if err := event("message_start", map[string]any{"type": "message_start", "message": msg}); err != nil {
			return err
		}
		if err := event("content_block_start", map[string]any{"type": "content_block_start", "index": 0, "content_block": anthBlock{Type: "text"}}); err != nil {
			return err
		}
		return event("ping", map[string]string{"type": "ping"})
	}
	res, err := s.backend.Generate(ctx, req, func(d pipeline.Delta) error {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return errors.New("emit called after Generate returned")
		}
		text.WriteString(d.Text)
		if !stream || d.Text == "" {
			return ctx.Err()
		}
		// message_start carries the prompt's size, which the first piece brings.
		if err := begin(d.PromptTokens); err != nil {
			return err
		}
		return event("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
			"delta": map[string]string{"type": "text_delta", "text": d.Text}})
	})
	mu.Lock()
	defer mu.Unlock()
	done = true
	attrs := []any{"id", id, "model", req.Model, "stream", stream, "prompt_tokens", res.PromptTokens,
		"completion_tokens", res.CompletionTokens, "finish", res.FinishReason, "duration", time.Since(start)}
	if user != "" {
		attrs = append(attrs, "user", user)
	}
	if ctx.Err() != nil {
		s.log.Info("message cancelled by client", attrs...)
		return
	}
	if err != nil {
		s.log.Warn("message failed", append(attrs, "err", err)...)
		e := backendError(err, "messages")
		if !started {
			anthropicError(w, e)
			return
		}
		_ = event("error", anthropicErrorOf(e))
		return
	}
	s.log.Info("message", attrs...)
	reason, seq := anthStop(res)
	if !stream {
		out := res.Text
		if out == "" {
			out = text.String()
		}
		writeJSON(w, http.StatusOK, anthResponse{ID: id, Type: "message", Role: "assistant", Model: req.Model,
			Content: []anthBlock{{Type: "text", Text: out}}, StopReason: &reason, StopSequence: seq,
			Usage: anthUsage{InputTokens: res.PromptTokens, OutputTokens: res.CompletionTokens}})
		return
	}
	if err := begin(res.PromptTokens); err != nil {
		return
	}
	if err := event("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0}); err != nil {
		return
	}
	if err := event("message_delta", map[string]any{"type": "message_delta",
		"delta": map[string]any{"stop_reason": reason, "stop_sequence": seq},
		"usage": anthUsage{InputTokens: res.PromptTokens, OutputTokens: res.CompletionTokens}}); err != nil {
		return
	}
	_ = event("message_stop", map[string]string{"type": "message_stop"})
}
