// Package pipeline is a generation's path through the stages: it turns a request into tokens,
// chooses a route of stages covering every layer, streams prefill and decode steps along it,
// and rebuilds the route when a stage dies mid-generation.
package pipeline

import (
	"github.com/strata-llm/strata/pipeline/grammar"
	"github.com/strata-llm/strata/pipeline/sample"
)

// ModelCard describes a model the swarm can serve, for /v1/models and prompt rendering.
type ModelCard struct {
	ID            string `json:"id"`
	SHA256        string `json:"sha256"`
	ContextLength int    `json:"context_length"`
	ChatTemplate  string `json:"-"` // tokenizer.chat_template from the GGUF (Jinja)
	BOS           string `json:"-"` // text of the BOS token, for templates that use bos_token
	EOS           string `json:"-"`
	Ready         bool   `json:"ready"` // every layer is served
}

// Request is one completion: a prompt already rendered to text, and how to continue it.
type Request struct {
	Model     string
	Prompt    string // rendered prompt text; BOS is added by the tokenizer when the model asks
	MaxTokens int    // 0: up to the context length
	Stop      []string
	Sampling  sample.Params
	// Grammar, when set, constrains the completion to text it matches (structured output,
	// forced tool calls); see constrain.go for where the mask is applied.
	Grammar *grammar.Grammar
	// KeepControl keeps the text of control tokens in the output, for a parser that reads
	// the model's markup (tool calls); otherwise it is dropped, as llama.cpp does.
	KeepControl bool
}

// Delta is a piece of generated text, handed out as soon as it is final (stop sequences and
// partial UTF-8 are held back until they resolve).
type Delta struct {
	Text   string
	Tokens []int32
}

// Result summarizes a finished completion.
type Result struct {
	Text             string
	PromptTokens     int
	CompletionTokens int
	FinishReason     string // "stop" or "length"
}
