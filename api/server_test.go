package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/strata-llm/strata/pipeline"
)

// echoBackend is a small deterministic backend: it "generates" its prompt back, one
// whitespace-delimited word per token, honouring MaxTokens and stop sequences the way the
// pipeline does (stop text is never emitted).
type echoBackend struct {
	cards []pipeline.ModelCard
	delay time.Duration // per token
	err   error         // returned before the first token
	// failAfter, if > 0, makes Generate fail with midErr after that many tokens.
	failAfter int
	midErr    error
	panicMsg  string

	mu        sync.Mutex
	last      pipeline.Request
	cancelled chan struct{} // closed when a Generate sees its context cancelled
}

func newEcho() *echoBackend {
	return &echoBackend{
		cards: []pipeline.ModelCard{
			{ID: "llama-test", SHA256: "abc123", ContextLength: 4096, ChatTemplate: llama3Template, BOS: "<|begin_of_text|>", EOS: "<|eot_id|>", Ready: true},
			{ID: "org/partial", ContextLength: 2048, ChatTemplate: llama3Template, Ready: false},
		},
		cancelled: make(chan struct{}),
	}
}

func (b *echoBackend) Models(context.Context) ([]pipeline.ModelCard, error) { return b.cards, nil }

func (b *echoBackend) lastRequest() pipeline.Request {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.last
}

func tokens(s string) []string { return strings.SplitAfter(s, " ") }

func (b *echoBackend) Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error) {
	b.mu.Lock()
	b.last = req
	b.mu.Unlock()
	if b.panicMsg != "" {
		panic(b.panicMsg)
	}
	if b.err != nil {
		return pipeline.Result{}, b.err
	}
	toks := tokens(req.Prompt)
	res := pipeline.Result{PromptTokens: len(toks), FinishReason: "stop"}
	var out strings.Builder
	for i, tok := range toks {
		if req.MaxTokens > 0 && i == req.MaxTokens {
			res.FinishReason = "length"
			break
		}
		if b.failAfter > 0 && i == b.failAfter {
			return res, b.midErr
		}
		if b.delay > 0 {
			select {
			case <-ctx.Done():
				close(b.cancelled)
				return res, ctx.Err()
			case <-time.After(b.delay):
			}
		}
		next := out.String() + tok
		stopped := false
		for _, st := range req.Stop {
			if k := strings.Index(next, st); k >= 0 {
				tok = next[out.Len():k]
				stopped = true
				break
			}
		}
		out.WriteString(tok)
		res.CompletionTokens++
		if tok != "" {
			if err := emit(pipeline.Delta{Text: tok, Tokens: []int32{int32(i)}}); err != nil {
				return res, err
			}
		}
		if stopped {
			break
		}
	}
	res.Text = out.String()
	return res, nil
}

// statusErr is how a backend marks its own client errors.
type statusErr struct {
	status int
	msg    string
}

func (e statusErr) Error() string   { return e.msg }
func (e statusErr) HTTPStatus() int { return e.status }

func startServer(t *testing.T, b Backend, opts ...Option) *httptest.Server {
	t.Helper()
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))), WithClock(fixedNow)}, opts...)
	ts := httptest.NewServer(NewServer(b, opts...))
	t.Cleanup(ts.Close)
	return ts
}

func client(ts *httptest.Server, opts ...option.RequestOption) openai.Client {
	return openai.NewClient(append([]option.RequestOption{
		option.WithBaseURL(ts.URL + "/v1/"),
		option.WithAPIKey(""),
		option.WithMaxRetries(0),
	}, opts...)...)
}

// The prompt the Llama 3 template renders for one user message, minus BOS (the tokenizer's).
func llamaPrompt(user string) string {
	return "<|start_header_id|>user<|end_header_id|>\n\n" + user + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
}

func TestModels(t *testing.T) {
	ts := startServer(t, newEcho())
	c := client(ts)
	ctx := context.Background()
	page, err := c.Models.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Data) != 2 || page.Data[0].ID != "llama-test" || page.Data[0].OwnedBy != "strata" || page.Data[0].Object != "model" {
		t.Fatalf("models: %+v", page.Data)
	}
	if !strings.Contains(page.RawJSON(), `"context_length":4096`) {
		t.Fatalf("context_length missing: %s", page.RawJSON())
	}
	m, err := c.Models.Get(ctx, "llama-test")
	if err != nil || m.ID != "llama-test" {
		t.Fatalf("get: %+v %v", m, err)
	}
	m, err = c.Models.Get(ctx, "org/partial") // an id with a slash
	if err != nil || m.ID != "org/partial" || !strings.Contains(m.RawJSON(), `"ready":false`) {
		t.Fatalf("get org/partial: %+v %v", m, err)
	}
	_, err = c.Models.Get(ctx, "nope")
	assertAPIError(t, err, 404, "model_not_found")
}

func assertAPIError(t *testing.T, err error, status int, code string) {
	t.Helper()
	var ae *openai.Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T), want an API error %d", err, err, status)
	}
	if ae.StatusCode != status || (code != "" && ae.Code != code) || ae.Message == "" || ae.Type == "" {
		t.Fatalf("API error %d code %q type %q message %q, want %d code %q", ae.StatusCode, ae.Code, ae.Type, ae.Message, status, code)
	}
}

func TestChat(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	c := client(ts)
	resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{
			openai.SystemMessage("  Be terse. "),
			openai.UserMessage("Hello there world"),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>" + llamaPrompt("Hello there world")
	if got := b.lastRequest().Prompt; got != want {
		t.Fatalf("prompt\n%q\nwant\n%q", got, want)
	}
	if len(resp.Choices) != 1 || resp.Choices[0].Message.Content != want || resp.Choices[0].FinishReason != "stop" ||
		resp.Choices[0].Message.Role != "assistant" {
		t.Fatalf("response %+v", resp.Choices)
	}
	n := int64(len(tokens(want)))
	if resp.Usage.PromptTokens != n || resp.Usage.CompletionTokens != n || resp.Usage.TotalTokens != 2*n {
		t.Fatalf("usage %+v, want %d/%d", resp.Usage, n, n)
	}
	if !strings.HasPrefix(resp.ID, "chatcmpl-") || resp.Object != "chat.completion" || resp.Model != "llama-test" || resp.Created != fixedNow().Unix() {
		t.Fatalf("envelope %q %q %q %d", resp.ID, resp.Object, resp.Model, resp.Created)
	}
}

func TestChatSamplingFields(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	c := client(ts)
	_, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model:            "llama-test",
		Messages:         []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		Temperature:      openai.Float(0.7),
		TopP:             openai.Float(0.9),
		Seed:             openai.Int(42),
		FrequencyPenalty: openai.Float(0.2),
		MaxTokens:        openai.Int(100),
	}, option.WithJSONSet("top_k", 40), option.WithJSONSet("min_p", 0.05))
	if err != nil {
		t.Fatal(err)
	}
	p := b.lastRequest().Sampling
	if p.Temperature != 0.7 || p.TopP != 0.9 || p.TopK != 40 || p.MinP != 0.05 || p.Seed != 42 ||
		p.FrequencyPenalty != 0.2 || p.RepeatPenalty != 0 || b.lastRequest().MaxTokens != 100 {
		t.Fatalf("sampling %+v, max_tokens %d", p, b.lastRequest().MaxTokens)
	}

	// Defaults: OpenAI's temperature 1, no truncation, and a random seed chosen here so the
	// pipeline can replay the generation.
	_, err = c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model:    "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	if err != nil {
		t.Fatal(err)
	}
	p = b.lastRequest().Sampling
	if p.Temperature != 1 || p.TopK != 0 || p.TopP != 0 || p.RepeatPenalty != 0 || p.Seed == 0 || b.lastRequest().MaxTokens != 0 {
		t.Fatalf("defaults %+v", p)
	}

	// seed 0 is a real seed to the client, and stays reproducible.
	_, err = c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model:    "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		Seed:     openai.Int(0), Temperature: openai.Float(0),
		MaxCompletionTokens: openai.Int(7),
	})
	if err != nil {
		t.Fatal(err)
	}
	if p := b.lastRequest().Sampling; p.Seed != seedZero || !p.Greedy() || b.lastRequest().MaxTokens != 7 {
		t.Fatalf("seed 0: %+v max %d", p, b.lastRequest().MaxTokens)
	}
}

func TestChatStream(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	c := client(ts)
	stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model:         "llama-test",
		Messages:      []openai.ChatCompletionMessageParamUnion{openai.UserMessage("one two three four")},
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	var acc openai.ChatCompletionAccumulator
	var chunks, contentChunks int
	var sawRole, sawUsage bool
	var finish string
	for stream.Next() {
		ch := stream.Current()
		acc.AddChunk(ch)
		chunks++
		if ch.ID == "" || ch.Object != "chat.completion.chunk" {
			t.Fatalf("chunk envelope %+v", ch)
		}
		if len(ch.Choices) == 0 {
			sawUsage = ch.Usage.TotalTokens > 0
			continue
		}
		if ch.Choices[0].Delta.Role == "assistant" {
			sawRole = true
		}
		if ch.Choices[0].Delta.Content != "" {
			contentChunks++
		}
		if ch.Choices[0].FinishReason != "" {
			finish = ch.Choices[0].FinishReason
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	want := llamaPrompt("one two three four")
	if got := acc.Choices[0].Message.Content; got != want {
		t.Fatalf("streamed %q, want %q", got, want)
	}
	if contentChunks != len(tokens(want)) || !sawRole || !sawUsage || finish != "stop" {
		t.Fatalf("content chunks %d (want %d), role %v, usage %v, finish %q", contentChunks, len(tokens(want)), sawRole, sawUsage, finish)
	}
	if n := int64(len(tokens(want))); acc.Usage.PromptTokens != n || acc.Usage.CompletionTokens != n {
		t.Fatalf("usage %+v", acc.Usage)
	}

	// Without include_usage there is no usage chunk; the raw stream ends with [DONE].
	body := `{"model":"llama-test","stream":true,"messages":[{"role":"user","content":"a b"}]}`
	resp, err := http.Post(ts.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" || !strings.HasSuffix(string(raw), "data: [DONE]\n\n") || strings.Contains(string(raw), `"usage"`) {
		t.Fatalf("raw stream (%s):\n%s", resp.Header.Get("Content-Type"), raw)
	}
	for _, ev := range strings.Split(strings.TrimSuffix(string(raw), "\n\n"), "\n\n") {
		if !strings.HasPrefix(ev, "data: ") {
			t.Fatalf("event %q is not a data line", ev)
		}
	}
}

func TestStopAndMaxTokens(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	c := client(ts)
	ctx := context.Background()
	msgs := []openai.ChatCompletionMessageParamUnion{openai.UserMessage("alpha beta gamma delta")}

	resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "llama-test", Messages: msgs,
		Stop: openai.ChatCompletionNewParamsStopUnion{OfString: openai.String("gamma")}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := resp.Choices[0].Message.Content, "<|start_header_id|>user<|end_header_id|>\n\nalpha beta "; got != want || resp.Choices[0].FinishReason != "stop" {
		t.Fatalf("stop string: %q (%s), want %q", got, resp.Choices[0].FinishReason, want)
	}
	if st := b.lastRequest().Stop; len(st) != 1 || st[0] != "gamma" {
		t.Fatalf("stop passed as %q", st)
	}

	resp, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "llama-test", Messages: msgs,
		Stop: openai.ChatCompletionNewParamsStopUnion{OfStringArray: []string{"zzz", "beta"}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Choices[0].Message.Content; got != "<|start_header_id|>user<|end_header_id|>\n\nalpha " {
		t.Fatalf("stop array: %q", got)
	}

	resp, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "llama-test", Messages: msgs, MaxTokens: openai.Int(2)})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Choices[0].FinishReason != "length" || resp.Usage.CompletionTokens != 2 || resp.Choices[0].Message.Content != "<|start_header_id|>user<|end_header_id|>\n\nalpha beta " {
		t.Fatalf("max_tokens: %+v %+v", resp.Choices[0], resp.Usage)
	}
}

func TestCompletions(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	c := client(ts)
	ctx := context.Background()
	resp, err := c.Completions.New(ctx, openai.CompletionNewParams{
		Model:  "llama-test",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("The sky is blue")},
		Stop:   openai.CompletionNewParamsStopUnion{OfString: openai.String("blue")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.lastRequest().Prompt != "The sky is blue" || resp.Choices[0].Text != "The sky is " || resp.Object != "text_completion" ||
		resp.Usage.PromptTokens != 4 || resp.Usage.CompletionTokens != 4 {
		t.Fatalf("completion %+v usage %+v", resp.Choices, resp.Usage)
	}

	stream := c.Completions.NewStreaming(ctx, openai.CompletionNewParams{
		Model:         "llama-test",
		Prompt:        openai.CompletionNewParamsPromptUnion{OfString: openai.String("a b c")},
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	var text strings.Builder
	var finish string
	var total int64
	for stream.Next() {
		ch := stream.Current()
		if len(ch.Choices) > 0 {
			text.WriteString(ch.Choices[0].Text)
			if ch.Choices[0].FinishReason != "" {
				finish = string(ch.Choices[0].FinishReason)
			}
		}
		total += ch.Usage.TotalTokens
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if text.String() != "a b c" || finish != "stop" || total != 6 {
		t.Fatalf("streamed %q finish %q usage total %d", text.String(), finish, total)
	}
}

// rawPost sends body to path and returns the status and the decoded OpenAI error.
func rawPost(t *testing.T, ts *httptest.Server, method, path, body string, header map[string]string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if resp.StatusCode >= 400 {
		if resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s %s: error with content type %q: %s", method, path, resp.Header.Get("Content-Type"), raw)
		}
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%s %s: error body is not JSON: %s", method, path, raw)
		}
		e, ok := out["error"].(map[string]any)
		if !ok {
			t.Fatalf("%s %s: no error object: %s", method, path, raw)
		}
		for _, k := range []string{"message", "type", "param", "code"} {
			if _, ok := e[k]; !ok {
				t.Fatalf("%s %s: error lacks %q: %s", method, path, k, raw)
			}
		}
		return resp.StatusCode, e
	}
	return resp.StatusCode, nil
}

func TestErrors(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b, WithMaxBodyBytes(1<<16))
	chat := "/v1/chat/completions"
	user := `"messages":[{"role":"user","content":"hi"}]`
	tests := []struct {
		name, method, path, body string
		status                   int
		param, code              string
	}{
		{"bad json", "POST", chat, `{"model": "llama-test", "messages": [`, 400, "", ""},
		{"not an object", "POST", chat, `[1,2]`, 400, "", ""},
		{"trailing data", "POST", chat, `{"model":"llama-test",` + user + `} {}`, 400, "", ""},
		{"empty body", "POST", chat, ``, 400, "", ""},
		{"wrong type", "POST", chat, `{"model":"llama-test",` + user + `,"temperature":"hot"}`, 400, "temperature", ""},
		{"unknown model", "POST", chat, `{"model":"gpt-17",` + user + `}`, 404, "model", "model_not_found"},
		{"missing model, two served", "POST", chat, `{` + user + `}`, 400, "model", ""},
		{"empty messages", "POST", chat, `{"model":"llama-test","messages":[]}`, 400, "messages", ""},
		{"no messages", "POST", chat, `{"model":"llama-test"}`, 400, "messages", ""},
		{"bad role", "POST", chat, `{"model":"llama-test","messages":[{"role":"wizard","content":"hi"}]}`, 400, "messages[0].role", ""},
		{"image content", "POST", chat, `{"model":"llama-test","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, 400, "messages[0].content", ""},
		{"content number", "POST", chat, `{"model":"llama-test","messages":[{"role":"user","content":5}]}`, 400, "messages[0].content", ""},
		{"max_tokens beyond context", "POST", chat, `{"model":"llama-test",` + user + `,"max_tokens":5000}`, 400, "max_tokens", "context_length_exceeded"},
		{"max_completion_tokens beyond context", "POST", chat, `{"model":"llama-test",` + user + `,"max_completion_tokens":99999}`, 400, "max_completion_tokens", "context_length_exceeded"},
		{"max_tokens zero", "POST", chat, `{"model":"llama-test",` + user + `,"max_tokens":0}`, 400, "max_tokens", ""},
		{"n=17", "POST", chat, `{"model":"llama-test",` + user + `,"n":17}`, 400, "n", ""},
		{"n=0", "POST", chat, `{"model":"llama-test",` + user + `,"n":0}`, 400, "n", ""},
		{"unknown field", "POST", chat, `{"model":"llama-test",` + user + `,"reasoning_effort":"high"}`, 400, "reasoning_effort", ""},
		{"legacy functions", "POST", chat, `{"model":"llama-test",` + user + `,"functions":[{"name":"f"}]}`, 400, "functions", ""},
		{"store", "POST", chat, `{"model":"llama-test",` + user + `,"store":true}`, 400, "store", ""},
		{"logit_bias key", "POST", chat, `{"model":"llama-test",` + user + `,"logit_bias":{"x":1}}`, 400, "logit_bias", ""},
		{"logit_bias value", "POST", chat, `{"model":"llama-test",` + user + `,"logit_bias":{"5":101}}`, 400, "logit_bias", ""},
		{"top_logprobs without logprobs", "POST", chat, `{"model":"llama-test",` + user + `,"top_logprobs":2}`, 400, "top_logprobs", ""},
		{"top_logprobs 21", "POST", chat, `{"model":"llama-test",` + user + `,"logprobs":true,"top_logprobs":21}`, 400, "top_logprobs", ""},
		{"logprobs int in chat", "POST", chat, `{"model":"llama-test",` + user + `,"logprobs":3}`, 400, "logprobs", ""},
		{"negative repeat_last_n", "POST", chat, `{"model":"llama-test",` + user + `,"repeat_penalty":1.1,"repeat_last_n":-1}`, 400, "repeat_last_n", ""},
		{"temperature 3", "POST", chat, `{"model":"llama-test",` + user + `,"temperature":3}`, 400, "temperature", ""},
		{"top_p 2", "POST", chat, `{"model":"llama-test",` + user + `,"top_p":2}`, 400, "top_p", ""},
		{"top_k negative", "POST", chat, `{"model":"llama-test",` + user + `,"top_k":-1}`, 400, "top_k", ""},
		{"stop wrong type", "POST", chat, `{"model":"llama-test",` + user + `,"stop":5}`, 400, "stop", ""},
		{"tools not functions", "POST", chat, `{"model":"llama-test",` + user + `,"tools":[{"type":"retrieval"}]}`, 400, "tools[0]", ""},
		{"unknown response_format", "POST", chat, `{"model":"llama-test",` + user + `,"response_format":{"type":"yaml"}}`, 400, "response_format.type", ""},
		{"not ready", "POST", chat, `{"model":"org/partial",` + user + `}`, 503, "", ""},
		{"wrong method", "GET", chat, ``, 405, "", "method_not_allowed"},
		{"wrong method models", "POST", "/v1/models", `{}`, 405, "", "method_not_allowed"},
		{"unknown endpoint", "POST", "/v1/audio/speech", `{}`, 404, "", "unknown_url"},
		{"embeddings without input", "POST", "/v1/embeddings", `{"model":"llama-test"}`, 400, "input", ""},
		{"too large", "POST", chat, `{"model":"llama-test","messages":[{"role":"user","content":"` + strings.Repeat("x", 1<<17) + `"}]}`, 413, "", ""},
		{"completion without prompt", "POST", "/v1/completions", `{"model":"llama-test"}`, 400, "prompt", ""},
		{"completion negative token", "POST", "/v1/completions", `{"model":"llama-test","prompt":[1,-2,3]}`, 400, "prompt", ""},
		{"completion mixed token arrays", "POST", "/v1/completions", `{"model":"llama-test","prompt":[[1,2],["a"]]}`, 400, "prompt", ""},
		{"completion empty prompt array", "POST", "/v1/completions", `{"model":"llama-test","prompt":[]}`, 400, "prompt", ""},
		{"completion echo with logprobs", "POST", "/v1/completions", `{"model":"llama-test","prompt":"a","echo":true,"logprobs":1}`, 400, "logprobs", ""},
		{"completion logprobs 21", "POST", "/v1/completions", `{"model":"llama-test","prompt":"a","logprobs":21}`, 400, "logprobs", ""},
		{"completion best_of", "POST", "/v1/completions", `{"model":"llama-test","prompt":"a","best_of":3}`, 400, "best_of", ""},
		{"completion too many choices", "POST", "/v1/completions", `{"model":"llama-test","prompt":["a","b","c"],"n":6}`, 400, "n", ""},
		{"completion unknown field", "POST", "/v1/completions", `{"model":"llama-test","prompt":"a","messages":[]}`, 400, "messages", ""},
		{"completion not ready", "POST", "/v1/completions", `{"model":"org/partial","prompt":"a"}`, 503, "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, e := rawPost(t, ts, tc.method, tc.path, tc.body, nil)
			if status != tc.status {
				t.Fatalf("status %d, want %d (%v)", status, tc.status, e)
			}
			if p, _ := e["param"].(string); p != tc.param {
				t.Errorf("param %q, want %q (%v)", p, tc.param, e["message"])
			}
			if c, _ := e["code"].(string); tc.code != "" && c != tc.code {
				t.Errorf("code %q, want %q", c, tc.code)
			}
			wantType := "invalid_request_error"
			if tc.status >= 500 {
				wantType = "service_unavailable"
			}
			if e["type"] != wantType {
				t.Errorf("type %v, want %s", e["type"], wantType)
			}
		})
	}

	// The official client sees the same errors as typed API errors.
	c := client(ts)
	_, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "llama-test", Messages: []openai.ChatCompletionMessageParamUnion{}})
	assertAPIError(t, err, 400, "")
	_, err = c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "org/partial",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
	assertAPIError(t, err, 503, "")
	stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{Model: "gpt-17",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
	for stream.Next() {
	}
	assertAPIError(t, stream.Err(), 404, "model_not_found")
}

func TestSingleModelNeedsNoName(t *testing.T) {
	b := newEcho()
	b.cards = b.cards[:1]
	ts := startServer(t, b)
	status, e := rawPost(t, ts, "POST", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, nil)
	if status != 200 || b.lastRequest().Model != "llama-test" {
		t.Fatalf("status %d %v model %q", status, e, b.lastRequest().Model)
	}
}

func TestTemplateFailures(t *testing.T) {
	b := newEcho()
	b.cards = append(b.cards,
		pipeline.ModelCard{ID: "strict", ContextLength: 100, Ready: true,
			ChatTemplate: `{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}`},
		pipeline.ModelCard{ID: "broken", ContextLength: 100, Ready: true, ChatTemplate: `{% for m in messages %}`},
		pipeline.ModelCard{ID: "none", ContextLength: 100, Ready: true},
	)
	ts := startServer(t, b)
	sys := `"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]`
	status, e := rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"strict",`+sys+`}`, nil)
	if status != 400 || !strings.Contains(e["message"].(string), "System role not supported") {
		t.Fatalf("raise_exception: %d %v", status, e)
	}
	status, _ = rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"strict","messages":[{"role":"user","content":"u"}]}`, nil)
	if status != 200 {
		t.Fatalf("strict template with a user message: %d", status)
	}
	status, e = rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"broken",`+sys+`}`, nil)
	if status != 500 || e["type"] != "server_error" || !strings.Contains(e["message"].(string), "parsing chat template") {
		t.Fatalf("broken template: %d %v", status, e)
	}
	status, e = rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"none",`+sys+`}`, nil)
	if status != 400 || !strings.Contains(e["message"].(string), "no chat template") {
		t.Fatalf("no template: %d %v", status, e)
	}
}

func TestBackendErrors(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	body := `{"model":"llama-test","messages":[{"role":"user","content":"a b c d"}]}`
	stream := `{"model":"llama-test","stream":true,"messages":[{"role":"user","content":"a b c d"}]}`

	b.err = statusErr{400, "prompt is 5000 tokens, the context is 4096"}
	for _, bd := range []string{body, stream} {
		status, e := rawPost(t, ts, "POST", "/v1/chat/completions", bd, nil)
		if status != 400 || !strings.Contains(e["message"].(string), "context is 4096") {
			t.Fatalf("status error: %d %v", status, e)
		}
	}
	b.err = errors.New("stage 2 unreachable")
	status, e := rawPost(t, ts, "POST", "/v1/chat/completions", body, nil)
	if status != 500 || e["type"] != "server_error" {
		t.Fatalf("plain error: %d %v", status, e)
	}
	b.err = fmt.Errorf("routing: %w", context.DeadlineExceeded)
	if status, _ := rawPost(t, ts, "POST", "/v1/chat/completions", body, nil); status != 504 {
		t.Fatalf("deadline: %d", status)
	}

	// An error after the stream started arrives as an error event, which the client reports.
	b.err = nil
	b.failAfter, b.midErr = 2, errors.New("stage died and no replacement")
	c := client(ts)
	st := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("a b c d")}})
	var got strings.Builder
	for st.Next() {
		if len(st.Current().Choices) > 0 {
			got.WriteString(st.Current().Choices[0].Delta.Content)
		}
	}
	if st.Err() == nil || !strings.Contains(st.Err().Error(), "stage died") || got.Len() == 0 {
		t.Fatalf("mid-stream error: %v after %q", st.Err(), got.String())
	}
}

func TestPanicRecovered(t *testing.T) {
	b := newEcho()
	b.panicMsg = "boom"
	var logs bytes.Buffer
	ts := httptest.NewServer(NewServer(b, WithLogger(slog.New(slog.NewTextHandler(&logs, nil)))))
	defer ts.Close()
	status, e := rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"llama-test","messages":[{"role":"user","content":"x"}]}`, nil)
	if status != 500 || e["type"] != "server_error" {
		t.Fatalf("panic: %d %v", status, e)
	}
	if !strings.Contains(logs.String(), "boom") || !strings.Contains(logs.String(), "stack") {
		t.Fatalf("panic not logged: %s", logs.String())
	}
	b.panicMsg = ""
	if status, _ := rawPost(t, ts, "POST", "/v1/chat/completions", `{"model":"llama-test","messages":[{"role":"user","content":"x"}]}`, nil); status != 200 {
		t.Fatalf("server did not survive the panic: %d", status)
	}
}

func TestAuthAndExtraRoutes(t *testing.T) {
	srv := NewServer(newEcho(), WithAPIKey("s3cret"), WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	// The node's own patterns, methods included: "GET /" must not clash with the API's routes.
	srv.Handle("GET /health", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	srv.Handle("GET /", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "dashboard") }))
	srv.Handle("GET /v1/strata/peers", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "peers") }))
	ts := httptest.NewServer(srv)
	defer ts.Close()
	ctx := context.Background()

	c0 := client(ts)
	_, err := c0.Models.List(ctx)
	assertAPIError(t, err, 401, "missing_api_key")
	cw := client(ts, option.WithAPIKey("wrong"))
	_, err = cw.Models.List(ctx)
	assertAPIError(t, err, 401, "invalid_api_key")
	status, e := rawPost(t, ts, "POST", "/v1/chat/completions", `{}`, map[string]string{"Authorization": "Basic czNjcmV0"})
	if status != 401 || e["code"] != "invalid_api_key" {
		t.Fatalf("basic auth: %d %v", status, e)
	}
	c := client(ts, option.WithAPIKey("s3cret"))
	if _, err := c.Models.List(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}}); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{"/health": "ok", "/": "dashboard", "/app.js": "dashboard", "/v1/strata/peers": "peers"} {
		req, _ := http.NewRequest("GET", ts.URL+path, nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != want {
			t.Fatalf("%s: %d %q", path, resp.StatusCode, body)
		}
	}
	// A node route under /v1/ is behind the key; the others are not.
	if resp, err := http.Get(ts.URL + "/v1/strata/peers"); err != nil || resp.StatusCode != 401 {
		t.Fatalf("/v1/strata/peers without a key: %v %v", resp.StatusCode, err)
	}
	if resp, err := http.Get(ts.URL + "/health"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("/health without a key: %v %v", resp.StatusCode, err)
	}
}

// A client that goes away mid-stream cancels the generation's context.
func TestClientDisconnectCancels(t *testing.T) {
	b := newEcho()
	b.delay = 20 * time.Millisecond
	ts := startServer(t, b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	long := strings.Repeat("word ", 500)
	cl := client(ts)
	stream := cl.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(long)}})
	for i := 0; i < 3 && stream.Next(); i++ {
	}
	stream.Close()
	cancel()
	select {
	case <-b.cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("backend context not cancelled 5 s after the client left")
	}

	// Same for a plain (non-streamed) request.
	b2 := newEcho()
	b2.delay = 20 * time.Millisecond
	ts2 := startServer(t, b2)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	cl2 := client(ts2)
	_, err := cl2.Chat.Completions.New(ctx2, openai.ChatCompletionNewParams{Model: "llama-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(long)}})
	if err == nil {
		t.Fatal("expected the client's deadline to end the request")
	}
	select {
	case <-b2.cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("backend context not cancelled after a plain request's client left")
	}
}

// Garbage in never gets a 5xx or a hung connection.
func TestGarbageNeverServerError(t *testing.T) {
	ts := startServer(t, newEcho())
	rng := rand.New(rand.NewPCG(1, 1))
	fragments := []string{`{`, `}`, `[`, `]`, `"model"`, `:`, `,`, `"llama-test"`, `"messages"`, `null`, `1e999`, `-1`,
		`"role"`, `"content"`, `"user"`, `"stop"`, `"max_tokens"`, `"temperature"`, `"\u0000"`, `true`, `"seed"`, `1.5`, `"n"`, `"prompt"`}
	for i := range 400 {
		var body strings.Builder
		for range rng.IntN(20) {
			body.WriteString(fragments[rng.IntN(len(fragments))])
		}
		path := []string{"/v1/chat/completions", "/v1/completions"}[i%2]
		status, e := rawPost(t, ts, "POST", path, body.String(), nil)
		if status >= 500 {
			t.Fatalf("%s %q: %d %v", path, body.String(), status, e)
		}
	}
}

func TestConcurrentRequests(t *testing.T) {
	ts := startServer(t, newEcho())
	c := client(ts)
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Go(func() {
			msg := fmt.Sprintf("request %d says hi", i)
			resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "llama-test",
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(msg)}})
			if err != nil {
				t.Error(err)
				return
			}
			if resp.Choices[0].Message.Content != llamaPrompt(msg) {
				t.Errorf("request %d got %q", i, resp.Choices[0].Message.Content)
			}
		})
	}
	wg.Wait()
}
