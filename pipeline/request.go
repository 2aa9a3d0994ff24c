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
	Vocab         int    `json:"-"`     // tokens in the vocabulary, to check token-id prompts; 0: unknown
	Ready         bool   `json:"ready"` // every layer is served
}

// Request is one completion: a prompt already rendered to text, and how to continue it.
type Request struct {
	Model  string
	Prompt string // rendered prompt text; BOS is added by the tokenizer when the model asks
	// PromptIDs, when not nil, is the prompt as token ids, used as they are (no BOS added);
	// Prompt is then ignored.
	PromptIDs []int32
	MaxTokens int // 0: up to the context length
	Stop      []string
	Sampling  sample.Params
	LogitBias []sample.Bias
	// Logprobs asks for every completion token's log-probability in Delta.Logprobs, with the
	// TopLogprobs (at most sample.MaxTopLogprobs) most likely alternatives.
	Logprobs    bool
	TopLogprobs int
	// Echo hands out the prompt's text (Prompt, or PromptIDs detokenized) as the first Delta,
	// with no tokens, once the first completion token is known, and puts it in Result.Text.
	Echo bool
	// Client identifies who asked (an API key's hash, a remote address), for the admission
	// queue's fairness: requests of one client start in order, clients take turns.
	Client string
	// Grammar, when set, constrains the completion to text it matches (structured output,
	// forced tool calls); see constrain.go for where the mask is applied.
	Grammar *grammar.Grammar
	// KeepControl keeps the text of control tokens in the output, for a parser that reads
	// the model's markup (tool calls); otherwise it is dropped, as llama.cpp does.
	KeepControl bool
}

// Delta is a piece of generated text, handed out as soon as it is final (stop sequences and
// partial UTF-8 are held back until they resolve). Tokens are the completion tokens it
// covers; summed over a generation they are exactly Result.CompletionTokens (a control token
// that shows no text is handed out in a Delta of its own or with the text around it).
type Delta struct {
	Text     string
	Tokens   []int32
	Logprobs []TokenLogprobs // one per token, when the request asked
	// PromptTokens is the prompt's length in tokens, on the first Delta of a generation only
	// (for APIs that report it before the completion ends).
	PromptTokens int
}

// TokenText is a token with its text (Decode of that token alone, which may be a partial
// UTF-8 sequence) and log-probability.
type TokenText struct {
	ID      int32
	Text    string
	Logprob float32
}

// TokenLogprobs is a completion token's log-probability with the most likely alternatives.
type TokenLogprobs struct {
	TokenText
	Top []TokenText
}

// Result summarizes a finished completion.
type Result struct {
	Text             string
	PromptTokens     int
	CompletionTokens int    // the tokens handed out in Deltas; a final end-of-sequence token is not one
	FinishReason     string // "stop" or "length"
	StopSequence     string // the stop sequence that ended the completion, if one did
}
