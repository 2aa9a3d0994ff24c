package api

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// generatorBackend serves a real pipeline.Generator the way the node does: one model card,
// with the generator's context length.
type generatorBackend struct {
	gen  *pipeline.Generator
	card pipeline.ModelCard
	// what gen was built from, for tests that build another generator on the same stages
	tok    *shard.Tokenizer
	router pipeline.Router
}

func (b generatorBackend) Models(context.Context) ([]pipeline.ModelCard, error) {
	return []pipeline.ModelCard{b.card}, nil
}

func (b generatorBackend) Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error) {
	return b.gen.Generate(ctx, req, emit)
}

const realContext = 64

// realServer serves the tiny model through in-process stages over ranges, with a context of
// realContext tokens, behind the API.
func realServer(t *testing.T, ranges ...shard.Range) *generatorBackend {
	t.Helper()
	return realServerFor(t, testkit.TinyModel(t), ranges...)
}

// realServerFor is realServer on the model at path.
func realServerFor(t *testing.T, path string, ranges ...shard.Range) *generatorBackend {
	t.Helper()
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	stages, tok := testkit.LoadStages(t, path, ranges, shard.WithMaxContext(realContext), shard.WithMaxSessions(2))
	router := pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF32}
	gen := pipeline.NewGenerator(tok, router, pipeline.WithMaxContext(realContext))
	return &generatorBackend{gen: gen, tok: tok, router: router, card: pipeline.ModelCard{
		ID: "tiny", ContextLength: gen.MaxContext(), ChatTemplate: info.ChatTemplate, BOS: tok.BOS, EOS: tok.EOS, Vocab: info.Vocab, Ready: true,
	}}
}

// TestRealGeneratorErrors: requests a real generator refuses get OpenAI's status, type, param
// and code, plain and streamed, and never a 500.
func TestRealGeneratorErrors(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	ts := startServer(t, b)
	chat, text := "/v1/chat/completions", "/v1/completions"
	user := `"messages":[{"role":"user","content":"hi"}]`
	long := strings.Repeat("word ", 2*realContext)
	tests := []struct {
		name, path, body string
		status           int
		typ, param, code string
	}{
		{"bad json", chat, `{"model":"tiny","messages":[`, 400, "invalid_request_error", "", ""},
		{"unknown model", chat, `{"model":"gpt-17",` + user + `}`, 404, "invalid_request_error", "model", "model_not_found"},
		{"empty messages", chat, `{"model":"tiny","messages":[]}`, 400, "invalid_request_error", "messages", ""},
		{"max_tokens beyond context", chat, `{"model":"tiny",` + user + fmt.Sprintf(`,"max_tokens":%d}`, realContext+1), 400, "invalid_request_error", "max_tokens", "context_length_exceeded"},
		// Within the context alone, but not after the prompt: OpenAI refuses rather than cuts.
		{"prompt plus max_tokens beyond context", chat, `{"model":"tiny",` + user + fmt.Sprintf(`,"max_tokens":%d}`, realContext-1), 400, "invalid_request_error", "messages", "context_length_exceeded"},
		{"prompt plus max_tokens beyond context, streamed", chat, `{"model":"tiny","stream":true,` + user + fmt.Sprintf(`,"max_tokens":%d}`, realContext-1), 400, "invalid_request_error", "messages", "context_length_exceeded"},
		{"prompt beyond context", chat, `{"model":"tiny","messages":[{"role":"user","content":"` + long + `"}]}`, 400, "invalid_request_error", "messages", "context_length_exceeded"},
		{"prompt beyond context, streamed", chat, `{"model":"tiny","stream":true,"messages":[{"role":"user","content":"` + long + `"}]}`, 400, "invalid_request_error", "messages", "context_length_exceeded"},
		{"completion prompt beyond context", text, `{"model":"tiny","prompt":"` + long + `"}`, 400, "invalid_request_error", "prompt", "context_length_exceeded"},
		{"completion prompt plus max_tokens beyond context", text, `{"model":"tiny","prompt":"hi","max_tokens":` + fmt.Sprint(realContext-1) + `}`, 400, "invalid_request_error", "prompt", "context_length_exceeded"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, e := rawPost(t, ts, "POST", tc.path, tc.body, nil)
			if status != tc.status {
				t.Fatalf("status %d, want %d (%v)", status, tc.status, e)
			}
			if p, _ := e["param"].(string); p != tc.param {
				t.Errorf("param %q, want %q (%v)", p, tc.param, e["message"])
			}
			if c, _ := e["code"].(string); c != tc.code {
				t.Errorf("code %q, want %q (%v)", c, tc.code, e["message"])
			}
			if e["type"] != tc.typ {
				t.Errorf("type %v, want %s", e["type"], tc.typ)
			}
		})
	}

	// The official client sees the pipeline's refusal as a typed 400.
	c := client(ts)
	_, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "tiny",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(long)}})
	assertAPIError(t, err, 400, "context_length_exceeded")

	// Without max_tokens the completion runs to the end of the context, as OpenAI's does.
	resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "tiny",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}, Temperature: openai.Float(0)})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Choices[0].FinishReason == "length" && resp.Usage.TotalTokens != realContext {
		t.Fatalf("no max_tokens: usage %+v, finish %s; want the whole context of %d", resp.Usage, resp.Choices[0].FinishReason, realContext)
	}
}

// TestRealGeneratorNoRoute: stages that miss layers are a swarm with no route: 503, as
// service_unavailable, plain and streamed, naming the gap.
func TestRealGeneratorNoRoute(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 2}, shard.Range{Start: 4, End: 6})
	ts := startServer(t, b)
	for _, body := range []string{
		`{"model":"tiny","messages":[{"role":"user","content":"hi"}]}`,
		`{"model":"tiny","stream":true,"messages":[{"role":"user","content":"hi"}]}`,
	} {
		status, e := rawPost(t, ts, "POST", "/v1/chat/completions", body, nil)
		msg, _ := e["message"].(string)
		if status != 503 || e["type"] != "service_unavailable" || !strings.Contains(msg, "expected one starting at layer 2") {
			t.Fatalf("%s: %d %v", body, status, e)
		}
	}
}

// TestNoRouteMidStream: once a stream has started, a route lost for good ends it with an
// OpenAI-style error event (no [DONE]), which clients report with its message.
func TestNoRouteMidStream(t *testing.T) {
	b := newEcho()
	b.failAfter = 2
	b.midErr = fmt.Errorf("stage 12D3 failed and the route could not be rebuilt (8 tries in 30s): open route: %w: layers [2,4) are served by no live node (of 6 layers)", pipeline.ErrNoRoute)
	ts := startServer(t, b)
	resp, err := http.Post(ts.URL+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"llama-test","stream":true,"messages":[{"role":"user","content":"a b c d"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var events []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, d)
		}
	}
	if len(events) < 2 {
		t.Fatalf("events %q", events)
	}
	var last struct {
		Error *apiError `json:"error"`
	}
	if err := json.Unmarshal([]byte(events[len(events)-1]), &last); err != nil || last.Error == nil {
		t.Fatalf("last event %q is not an error (%v); events %q", events[len(events)-1], err, events)
	}
	if last.Error.Type != "service_unavailable" || !strings.Contains(last.Error.Message, "layers [2,4)") {
		t.Fatalf("error event %+v", last.Error)
	}

	c := client(ts)
	st := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("a b c d")}})
	for st.Next() {
	}
	if st.Err() == nil || !strings.Contains(st.Err().Error(), "layers [2,4)") {
		t.Fatalf("client error %v", st.Err())
	}
}

// TestSentencePieceTokenPrompts: a model with a SentencePiece vocabulary (the synthesizer's
// gemma3, Gemma's real vocabulary) answers a prompt of token ids as it answers the same prompt
// in text, with logprobs, through the official client.
func TestSentencePieceTokenPrompts(t *testing.T) {
	path := testkit.Model(t, testkit.SynthOptions{Arch: "gemma3", Preset: "tiny", Seed: 1, Type: "f32"})
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	b := realServerFor(t, path, shard.Range{Start: 0, End: info.Layers / 2}, shard.Range{Start: info.Layers / 2, End: info.Layers})
	c := client(startServer(t, b))
	ctx := context.Background()
	const prompt = "Hello world, once upon a time"
	ids, err := b.gen.Encode(prompt)
	if err != nil {
		t.Fatal(err)
	}
	ids64 := make([]int64, len(ids))
	for i, id := range ids {
		ids64[i] = int64(id)
	}
	text, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(8), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, Logprobs: openai.Int(2)})
	if err != nil {
		t.Fatal(err)
	}
	byIDs, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(8), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: ids64}, Logprobs: openai.Int(2)})
	if err != nil {
		t.Fatal(err)
	}
	if text.Choices[0].Text != byIDs.Choices[0].Text || byIDs.Usage.PromptTokens != int64(len(ids)) {
		t.Fatalf("text prompt %q, id prompt %q (usage %+v)", text.Choices[0].Text, byIDs.Choices[0].Text, byIDs.Usage)
	}
	lp := byIDs.Choices[0].Logprobs
	if int64(len(lp.Tokens)) != byIDs.Usage.CompletionTokens || len(lp.TopLogprobs) != len(lp.Tokens) {
		t.Fatalf("logprobs for %d tokens: %+v", byIDs.Usage.CompletionTokens, lp)
	}
	for i, tok := range lp.Tokens {
		if best, ok := lp.TopLogprobs[i][tok]; !ok || best != lp.TokenLogprobs[i] {
			t.Fatalf("token %d %q logprob %v, top %v", i, tok, lp.TokenLogprobs[i], lp.TopLogprobs[i])
		}
	}
}

// TestRealTokenPromptsAndLogprobs: through the official client, a prompt of token ids
// continues exactly as the same prompt in text; logprobs come in OpenAI's shapes with the
// greedy token on top; n choices come back as one response; usage counts what was returned.
func TestRealTokenPromptsAndLogprobs(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	ts := startServer(t, b)
	c := client(ts)
	ctx := context.Background()
	const prompt = "Once upon a time"
	ids, err := b.gen.Encode(prompt)
	if err != nil {
		t.Fatal(err)
	}
	ids64 := make([]int64, len(ids))
	for i, id := range ids {
		ids64[i] = int64(id)
	}
	text, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(12), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, Logprobs: openai.Int(3)})
	if err != nil {
		t.Fatal(err)
	}
	byIDs, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(12), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: ids64}})
	if err != nil {
		t.Fatal(err)
	}
	if text.Choices[0].Text != byIDs.Choices[0].Text || text.Usage.PromptTokens != int64(len(ids)) || byIDs.Usage.PromptTokens != int64(len(ids)) {
		t.Fatalf("text prompt %q (usage %+v), id prompt %q (usage %+v)", text.Choices[0].Text, text.Usage, byIDs.Choices[0].Text, byIDs.Usage)
	}
	lp := text.Choices[0].Logprobs
	if int64(len(lp.Tokens)) != text.Usage.CompletionTokens || len(lp.TokenLogprobs) != len(lp.Tokens) || len(lp.TopLogprobs) != len(lp.Tokens) {
		t.Fatalf("logprobs for %d tokens: %+v", text.Usage.CompletionTokens, lp)
	}
	for i, tok := range lp.Tokens {
		best, ok := lp.TopLogprobs[i][tok]
		if !ok || best != lp.TokenLogprobs[i] || lp.TokenLogprobs[i] > 0 {
			t.Fatalf("token %d %q logprob %v, top %v", i, tok, lp.TokenLogprobs[i], lp.TopLogprobs[i])
		}
	}

	// Two prompts of ids; then one prompt, two choices (the stages hold two sessions at once).
	// Their texts are not compared with a run alone: two sessions sharing a stage's KV cache
	// change the shape of its attention sums, and on random weights that flips near-ties (seen
	// in 3 of 8 runs, steps unbatched or not). The counts and indices are exact.
	multi, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(6), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokenArrays: [][]int64{ids64, ids64[:2]}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(multi.Choices) != 2 || multi.Choices[0].Index != 0 || multi.Choices[1].Index != 1 ||
		multi.Usage.CompletionTokens != 2*6 || multi.Usage.PromptTokens != int64(len(ids)+2) {
		t.Fatalf("choices %+v usage %+v", multi.Choices, multi.Usage)
	}
	two, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(6), Temperature: openai.Float(0), N: openai.Int(2),
		Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: ids64}})
	if err != nil {
		t.Fatal(err)
	}
	if len(two.Choices) != 2 || two.Choices[0].Text == "" || two.Choices[1].Text == "" ||
		two.Usage.CompletionTokens != 2*6 || two.Usage.PromptTokens != int64(len(ids)) {
		t.Fatalf("n=2: texts %q %q, alone %q, usage %d/%d", two.Choices[0].Text, two.Choices[1].Text, multi.Choices[0].Text, two.Usage.CompletionTokens, two.Usage.PromptTokens)
	}

	// Echo: the prompt, then the completion.
	echo, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", MaxTokens: openai.Int(12), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, Echo: openai.Bool(true)})
	if err != nil || echo.Choices[0].Text != prompt+text.Choices[0].Text {
		t.Fatalf("echo %+v %v", echo.Choices, err)
	}

	// Chat logprobs, streamed: one entry per token, top alternatives best first.
	st := c.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: "tiny", MaxTokens: openai.Int(10), Temperature: openai.Float(0),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}, Logprobs: openai.Bool(true), TopLogprobs: openai.Int(2),
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}})
	var entries []openai.ChatCompletionTokenLogprob
	var used int64
	for st.Next() {
		ch := st.Current()
		if len(ch.Choices) > 0 {
			entries = append(entries, ch.Choices[0].Logprobs.Content...)
		}
		used += ch.Usage.CompletionTokens
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	if int64(len(entries)) != used || used == 0 {
		t.Fatalf("%d logprob entries for %d completion tokens", len(entries), used)
	}
	for _, e := range entries {
		if len(e.TopLogprobs) != 2 || e.TopLogprobs[0].Logprob != e.Logprob || e.TopLogprobs[1].Logprob > e.Logprob || len(e.Bytes) != len(e.Token) {
			t.Fatalf("entry %+v", e)
		}
	}

	// A token id outside the vocabulary is the client's mistake.
	_, err = c.Completions.New(ctx, openai.CompletionNewParams{Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: []int64{1, 1 << 30}}})
	assertAPIError(t, err, 400, "")
}

func (b generatorBackend) Embed(ctx context.Context, req pipeline.EmbedRequest) (pipeline.EmbedResult, error) {
	return b.gen.Embed(ctx, req)
}
