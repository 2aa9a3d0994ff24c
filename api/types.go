package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// The wire types follow OpenAI's API reference; fields Strata cannot honour are either
// ignored (harmless hints such as user or logit_bias-free defaults) or rejected in validate.

// samplingFields are the generation settings shared by chat and text completions.
type samplingFields struct {
	Model               string          `json:"model"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"` // extension (llama.cpp, vLLM)
	MinP                *float64        `json:"min_p"` // extension
	RepeatPenalty       *float64        `json:"repeat_penalty"`
	RepeatLastN         *int            `json:"repeat_last_n"`
	FrequencyPenalty    *float64        `json:"frequency_penalty"`
	PresencePenalty     *float64        `json:"presence_penalty"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	N                   *int            `json:"n"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Logprobs  json.RawMessage    `json:"logprobs"` // bool in chat, int in completions
	LogitBias map[string]float64 `json:"logit_bias"`
	User      string             `json:"user"` // logged with the request summary
}

type chatRequest struct {
	samplingFields
	Messages       []chatMessage   `json:"messages"`
	TopLogprobs    *int            `json:"top_logprobs"`
	Tools          json.RawMessage `json:"tools"`
	ToolChoice     json.RawMessage `json:"tool_choice"`
	ParallelTools  json.RawMessage `json:"parallel_tool_calls"`
	Functions      json.RawMessage `json:"functions"`
	FunctionCall   json.RawMessage `json:"function_call"`
	Store          *bool           `json:"store"`
	Metadata       json.RawMessage `json:"metadata"`
	ServiceTier    string          `json:"service_tier"`
	ResponseFormat *responseFormat `json:"response_format"`
}

// samplingKeys are the request fields samplingFields reads; chatKeys and completionKeys add
// each endpoint's own. A field outside them is answered 400, as OpenAI does, rather than
// silently ignored.
var samplingKeys = []string{"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
	"repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty", "seed", "stop", "n", "stream",
	"stream_options", "logprobs", "logit_bias", "user"}

var chatKeys = append([]string{"messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "functions",
	"function_call", "store", "metadata", "service_tier", "response_format"}, samplingKeys...)

var completionKeys = append([]string{"prompt", "echo", "suffix", "best_of", "response_format"}, samplingKeys...)

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
	Name    string          `json:"name,omitempty"`
	// An assistant's earlier tool calls and a tool message's answer to one (see tools.go).
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
}

type completionRequest struct {
	samplingFields
	Prompt         json.RawMessage `json:"prompt"`
	Echo           bool            `json:"echo"`
	Suffix         *string         `json:"suffix"`
	BestOf         *int            `json:"best_of"`
	ResponseFormat *responseFormat `json:"response_format"` // llama.cpp's extension: JSON output here too
}

// text returns a message's content: a string, or the text parts of a content array.
func (m chatMessage) text() (string, error) {
	raw := bytes.TrimSpace(m.Content)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil // an assistant message with tool calls only, or an empty turn
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", err
		}
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", fmt.Errorf("content must be a string or an array of content parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content part of type %q is not supported: this server takes text only", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// stringOrArray decodes OpenAI's "string or array of strings" fields (stop, prompt).
func stringOrArray(raw json.RawMessage) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		return []string{s}, nil
	}
	var ss []string
	if err := json.Unmarshal(raw, &ss); err != nil {
		return nil, fmt.Errorf("must be a string or an array of strings")
	}
	return ss, nil
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type chatCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint string       `json:"system_fingerprint,omitempty"`
	Choices           []chatChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
}

type chatChoice struct {
	Index        int           `json:"index"`
	Message      *assistantMsg `json:"message,omitempty"`
	Delta        *assistantMsg `json:"delta,omitempty"`
	FinishReason *string       `json:"finish_reason"`
	Logprobs     any           `json:"logprobs"`
}

type assistantMsg struct {
	Role      string        `json:"role,omitempty"`
	Content   *string       `json:"content,omitempty"`
	ToolCalls []toolCallOut `json:"tool_calls,omitempty"`
}

type textCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint string       `json:"system_fingerprint,omitempty"`
	Choices           []textChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
}

type textChoice struct {
	Index        int     `json:"index"`
	Text         string  `json:"text"`
	FinishReason *string `json:"finish_reason"`
	Logprobs     any     `json:"logprobs"`
}

type modelObject struct {
	ID            string `json:"id"`
	Object        string `json:"object"`
	Created       int64  `json:"created"`
	OwnedBy       string `json:"owned_by"`
	ContextLength int    `json:"context_length,omitempty"`
	SHA256        string `json:"sha256,omitempty"`
	Ready         bool   `json:"ready"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

// chatLogprobs is a chat choice's logprobs in OpenAI's shape.
type chatLogprobs struct {
	Content []chatTokenLogprob `json:"content"`
	Refusal []chatTokenLogprob `json:"refusal"`
}

type chatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float64          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []chatTopLogprob `json:"top_logprobs"`
}

type chatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// textLogprobs is a text completion choice's logprobs in OpenAI's legacy shape.
type textLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}
