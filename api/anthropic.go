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

	"github.com/strata-llm/strata/api/toolcall"
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
		turn, err := anthTurn(m)
		if err != nil {
			bad(fmt.Sprintf("messages.%d.content: %v", i, err))
			return
		}
		msgs = append(msgs, turn...)
	}
	rawTools, rawChoice, err := anthToolsAsOpenAI(mr.Tools, mr.ToolChoice)
	if err != nil {
		bad(err.Error())
		return
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
	if last := msgs[len(msgs)-1]; last["role"] == "assistant" && last["tool_calls"] == nil {
		prefill = strings.TrimRight(last["content"].(string), " \t\n")
		msgs = msgs[:len(msgs)-1]
	}
	tools, e := parseTools(rawTools, rawChoice, card.ChatTemplate)
	if e != nil {
		anthropicError(w, e)
		return
	}
	forced, e := tools.grammar()
	if e != nil {
		anthropicError(w, e)
		return
	}
	if forced != nil && prefill != "" {
		bad("tool_choice: a forced tool call cannot continue a prefilled assistant message")
		return
	}
	prompt, e := s.renderChatTools(card, msgs, tools)
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
	req := pipeline.Request{Model: card.ID, Prompt: prompt + prefill, MaxTokens: *mr.MaxTokens, Sampling: p.WithRandomSeed(),
		Grammar: forced, KeepControl: tools != nil}
	for _, st := range mr.StopSequences {
		if st != "" {
			req.Stop = append(req.Stop, st)
		}
	}
	user := ""
	if mr.Metadata != nil {
		user = mr.Metadata.UserID
	}
	s.messages(w, r, req, mr.Stream, user, tools)
}

// anthTurn turns one Anthropic message into the chat template's messages: its text (and, for
// an assistant, its tool_use blocks as tool_calls), and each tool_result block of a user turn
// as a tool message, in the order the blocks come.
func anthTurn(m anthMessage) ([]map[string]any, error) {
	raw := bytes.TrimSpace(m.Content)
	if len(raw) == 0 || raw[0] != '[' {
		text, err := anthText(raw)
		return []map[string]any{{"role": m.Role, "content": text}}, err
	}
	var blocks []struct {
		Type      string          `json:"type"`
		Text      string          `json:"text"`
		ID        string          `json:"id"`
		Name      string          `json:"name"`
		Input     any             `json:"input"`
		ToolUseID string          `json:"tool_use_id"`
		Content   json.RawMessage `json:"content"`
		IsError   bool            `json:"is_error"`
	}
	if err := json.Unmarshal(raw, &blocks); err != nil {
		return nil, errors.New("must be a string or an array of content blocks")
	}
	var out []map[string]any
	var text strings.Builder
	var calls []callIn
	flush := func() {
		if text.Len() > 0 || len(calls) > 0 {
			msg := map[string]any{"role": m.Role, "content": text.String()}
			if len(calls) > 0 {
				msg["tool_calls"] = templateCalls(calls)
			}
			out = append(out, msg)
		}
		text.Reset()
		calls = nil
	}
	for i, bl := range blocks {
		switch {
		case bl.Type == "text":
			text.WriteString(bl.Text)
		case bl.Type == "tool_use" && m.Role == "assistant":
			if bl.Name == "" {
				return nil, fmt.Errorf("block %d: tool_use needs a name", i)
			}
			if _, ok := bl.Input.(map[string]any); !ok && bl.Input != nil {
				return nil, fmt.Errorf("block %d: tool_use input must be an object", i)
			}
			calls = append(calls, callIn{ID: bl.ID, Name: bl.Name, Args: bl.Input})
		case bl.Type == "tool_result" && m.Role == "user":
			flush()
			content, err := anthText(bl.Content)
			if err != nil {
				return nil, fmt.Errorf("block %d: tool_result content: %v", i, err)
			}
			if bl.IsError {
				content = "Error: " + content
			}
			out = append(out, map[string]any{"role": "tool", "tool_call_id": bl.ToolUseID, "content": content})
		case bl.Type == "tool_use" || bl.Type == "tool_result":
			return nil, fmt.Errorf("block %d: a %s block belongs in a %s turn", i, bl.Type, map[string]string{"tool_use": "assistant", "tool_result": "user"}[bl.Type])
		default:
			return nil, fmt.Errorf("content block of type %q is not supported: this server takes text, tool_use and tool_result blocks", bl.Type)
		}
	}
	flush()
	if len(out) == 0 {
		out = append(out, map[string]any{"role": m.Role, "content": ""})
	}
	return out, nil
}

// anthToolsAsOpenAI rewrites Anthropic's tools ({name, description, input_schema}) and
// tool_choice ({type: auto|any|tool|none, name}) as OpenAI's, which parseTools reads.
// Anthropic's server tools (web search, code execution...) run on Anthropic's side and are
// refused by name.
func anthToolsAsOpenAI(rawTools, rawChoice json.RawMessage) (json.RawMessage, json.RawMessage, error) {
	set := func(raw json.RawMessage) bool {
		t := bytes.TrimSpace(raw)
		return len(t) > 0 && string(t) != "null"
	}
	var tools, choice json.RawMessage
	if set(rawTools) {
		var defs []struct {
			Type         string          `json:"type"`
			Name         string          `json:"name"`
			Description  string          `json:"description"`
			InputSchema  json.RawMessage `json:"input_schema"`
			CacheControl json.RawMessage `json:"cache_control"` // a caching hint: no effect here
		}
		if err := json.Unmarshal(rawTools, &defs); err != nil {
			return nil, nil, fmt.Errorf("tools: must be an array of {name, description, input_schema}: %v", err)
		}
		out := make([]map[string]any, len(defs))
		for i, d := range defs {
			switch {
			case d.Type != "" && d.Type != "custom":
				return nil, nil, fmt.Errorf("tools.%d: tool type %q runs on Anthropic's servers and is not offered here; send custom tools", i, d.Type)
			case d.Name == "":
				return nil, nil, fmt.Errorf("tools.%d.name: field required", i)
			case len(bytes.TrimSpace(d.InputSchema)) == 0 || string(bytes.TrimSpace(d.InputSchema)) == "null":
				return nil, nil, fmt.Errorf("tools.%d.input_schema: field required", i)
			}
			fn := map[string]any{"name": d.Name, "parameters": d.InputSchema}
			if d.Description != "" {
				fn["description"] = d.Description
			}
			out[i] = map[string]any{"type": "function", "function": fn}
		}
		tools, _ = json.Marshal(out)
	}
	if set(rawChoice) {
		var c struct {
			Type                   string `json:"type"`
			Name                   string `json:"name"`
			DisableParallelToolUse bool   `json:"disable_parallel_tool_use"` // a forced call is one call already
		}
		if err := json.Unmarshal(rawChoice, &c); err != nil {
			return nil, nil, fmt.Errorf("tool_choice: must be {type: auto|any|tool|none}: %v", err)
		}
		switch c.Type {
		case "auto":
			choice = json.RawMessage(`"auto"`)
		case "any":
			choice = json.RawMessage(`"required"`)
		case "none":
			choice = json.RawMessage(`"none"`)
		case "tool":
			if c.Name == "" {
				return nil, nil, errors.New("tool_choice.name: field required for type tool")
			}
			choice, _ = json.Marshal(map[string]any{"type": "function", "function": map[string]string{"name": c.Name}})
		default:
			return nil, nil, fmt.Errorf("tool_choice.type: %q is not one of auto, any, tool, none", c.Type)
		}
	}
	return tools, choice, nil
}

type anthUsage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

// anthBlock is a content block of a response: text, or a tool_use with its input object.
// The tags are for decoding (tests); MarshalJSON writes each type with its own fields.
type anthBlock struct {
	Type  string          `json:"type"`
	Text  string          `json:"text"`
	ID    string          `json:"id,omitempty"`
	Name  string          `json:"name,omitempty"`
	Input json.RawMessage `json:"input,omitempty"`
}

func (b anthBlock) MarshalJSON() ([]byte, error) {
	if b.Type == "tool_use" {
		input := b.Input
		if len(input) == 0 {
			input = json.RawMessage(`{}`)
		}
		return json.Marshal(struct {
			Type  string          `json:"type"`
			ID    string          `json:"id"`
			Name  string          `json:"name"`
			Input json.RawMessage `json:"input"`
		}{b.Type, b.ID, b.Name, input})
	}
	return json.Marshal(struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}{b.Type, b.Text})
}

// toolUses turns parsed calls into tool_use blocks.
func toolUses(calls []toolcall.Call) []anthBlock {
	out := make([]anthBlock, len(calls))
	for i, c := range calls {
		out[i] = anthBlock{Type: "tool_use", ID: "toolu_" + randomID(), Name: c.Name, Input: json.RawMessage(c.Arguments)}
	}
	return out
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

// messages runs req and answers as a message, or streamed as Anthropic's events. With tools,
// the model's calls become tool_use blocks (stop_reason tool_use); streamed, text that may
// start a call is held, and each call goes out as a block whose input comes in one
// input_json_delta.
func (s *Server) messages(w http.ResponseWriter, r *http.Request, req pipeline.Request, stream bool, user string, tools *toolSet) {
	ctx := r.Context()
	start := time.Now()
	id := "msg_" + randomID()
	var (
		mu      sync.Mutex
		started bool
		done    bool
		text    strings.Builder
		rc      = http.NewResponseController(w)
		held    *toolStream
		blocks  int  // content blocks started
		open    bool // the text block is started and not stopped
	)
	if tools != nil {
		held = &toolStream{ts: tools}
	}
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
	startText := func() error {
		open = true
		blocks++
		return event("content_block_start", map[string]any{"type": "content_block_start", "index": blocks - 1, "content_block": anthBlock{Type: "text"}})
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
		if held == nil { // without tools the answer is one text block, opened at once
			if err := startText(); err != nil {
				return err
			}
		}
		return event("ping", map[string]string{"type": "ping"})
	}
	textDelta := func(t string) error {
		if !open {
			if err := startText(); err != nil {
				return err
			}
		}
		return event("content_block_delta", map[string]any{"type": "content_block_delta", "index": blocks - 1,
			"delta": map[string]string{"type": "text_delta", "text": t}})
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
		t := d.Text
		if held != nil {
			if t = held.push(t); t == "" {
				return ctx.Err() // held back: a tool call may be starting
			}
		}
		return textDelta(t)
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
		content := []anthBlock{{Type: "text", Text: out}}
		if tools != nil {
			if rest, calls := tools.parse(out); len(calls) > 0 {
				content, reason, seq = toolUses(calls), "tool_use", nil
				if rest != "" {
					content = append([]anthBlock{{Type: "text", Text: rest}}, content...)
				}
			}
		}
		writeJSON(w, http.StatusOK, anthResponse{ID: id, Type: "message", Role: "assistant", Model: req.Model,
			Content: content, StopReason: &reason, StopSequence: seq,
			Usage: anthUsage{InputTokens: res.PromptTokens, OutputTokens: res.CompletionTokens}})
		return
	}
	if err := begin(res.PromptTokens); err != nil {
		return
	}
	var calls []toolcall.Call
	if held != nil {
		var rest string
		rest, calls = held.finish()
		if rest != "" || (len(calls) == 0 && blocks == 0) {
			if err := textDelta(rest); err != nil {
				return
			}
		}
	}
	if open {
		if err := event("content_block_stop", map[string]any{"type": "content_block_stop", "index": blocks - 1}); err != nil {
			return
		}
	}
	for _, b := range toolUses(calls) {
		input := b.Input
		b.Input = json.RawMessage(`{}`) // the input comes in the delta, as Anthropic streams it
		blocks++
		i := blocks - 1
		if event("content_block_start", map[string]any{"type": "content_block_start", "index": i, "content_block": b}) != nil ||
			event("content_block_delta", map[string]any{"type": "content_block_delta", "index": i,
				"delta": map[string]string{"type": "input_json_delta", "partial_json": string(input)}}) != nil ||
			event("content_block_stop", map[string]any{"type": "content_block_stop", "index": i}) != nil {
			return
		}
		reason, seq = "tool_use", nil
	}
	if err := event("message_delta", map[string]any{"type": "message_delta",
		"delta": map[string]any{"stop_reason": reason, "stop_sequence": seq},
		"usage": anthUsage{InputTokens: res.PromptTokens, OutputTokens: res.CompletionTokens}}); err != nil {
		return
	}
	_ = event("message_stop", map[string]string{"type": "message_stop"})
}
