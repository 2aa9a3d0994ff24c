package cli

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-llm/strata/api"
	"github.com/strata-llm/strata/pipeline"
)

// chatTemplate shows the whole conversation to the backend, one "role: content" line each.
const chatTemplate = `{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}assistant:`

// replyBackend answers "reply N to LAST" (N: user turns so far, LAST: the last user line),
// one word per token, optionally slowly.
type replyBackend struct {
	delay time.Duration

	mu       sync.Mutex
	prompts  []string
	requests []pipeline.Request
	started  chan struct{} // receives once per Generate that has emitted its first token
	stopped  chan error    // receives each Generate's context error when it is cut short
}

func newReplyBackend() *replyBackend {
	return &replyBackend{started: make(chan struct{}, 16), stopped: make(chan error, 16)}
}

func (b *replyBackend) Models(context.Context) ([]pipeline.ModelCard, error) {
	return []pipeline.ModelCard{
		{ID: "partial", ContextLength: 1024, ChatTemplate: chatTemplate, Ready: false},
		{ID: "tiny", ContextLength: 1024, ChatTemplate: chatTemplate, Ready: true},
	}, nil
}

func (b *replyBackend) last() (string, pipeline.Request) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.prompts[len(b.prompts)-1], b.requests[len(b.requests)-1]
}

func (b *replyBackend) Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error) {
	b.mu.Lock()
	b.prompts = append(b.prompts, req.Prompt)
	b.requests = append(b.requests, req)
	b.mu.Unlock()
	turns, lastUser := 0, ""
	for _, line := range strings.Split(req.Prompt, "\n") {
		if u, ok := strings.CutPrefix(line, "user: "); ok {
			turns++
			lastUser = u
		}
	}
	reply := fmt.Sprintf("reply %d to %s", turns, lastUser)
	if lastUser == "long" {
		reply = strings.Repeat("la ", 200)
	}
	words := strings.SplitAfter(reply, " ")
	var res pipeline.Result
	for i, w := range words {
		if b.delay > 0 {
			select {
			case <-ctx.Done():
				b.stopped <- ctx.Err()
				return res, ctx.Err()
			case <-time.After(b.delay):
			}
		}
		if err := emit(pipeline.Delta{Text: w}); err != nil {
			b.stopped <- err
			return res, err
		}
		if i == 0 {
			b.started <- struct{}{}
		}
		res.CompletionTokens++
	}
	res.Text, res.FinishReason, res.PromptTokens = reply, "stop", len(req.Prompt)
	return res, nil
}

func startAPI(t *testing.T, b api.Backend, opts ...api.Option) string {
	t.Helper()
	opts = append([]api.Option{api.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)
	ts := httptest.NewServer(api.NewServer(b, opts...))
	t.Cleanup(ts.Close)
	return strings.TrimPrefix(ts.URL, "http://")
}

func runChat(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := NewChatCommand()
	cmd.SetArgs(args)
	cmd.SetIn(strings.NewReader(stdin))
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = cmd.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

func TestChatOneShot(t *testing.T) {
	b := newReplyBackend()
	addr := startAPI(t, b)
	out, _, err := runChat(t, "", "--api", addr, "-p", "hello world", "--system", "Be kind.", "--temperature", "0.3", "--max-tokens", "50")
	if err != nil {
		t.Fatal(err)
	}
	if out != "reply 1 to hello world\n" {
		t.Fatalf("stdout %q", out)
	}
	prompt, req := b.last()
	if prompt != "system: Be kind.\nuser: hello world\nassistant:" {
		t.Fatalf("prompt %q", prompt)
	}
	// --model was not given: the first ready model is chosen.
	if req.Model != "tiny" || req.Sampling.Temperature != 0.3 || req.MaxTokens != 50 {
		t.Fatalf("request %+v", req)
	}

	// -p - reads the prompt from stdin; STRATA_API replaces --api.
	t.Setenv("STRATA_API", "http://"+addr)
	out, _, err = runChat(t, "from stdin", "--model", "tiny", "-p", "-")
	if err != nil || out != "reply 1 to from stdin\n" {
		t.Fatalf("stdin prompt: %q %v", out, err)
	}
	if _, req := b.last(); req.Sampling.Temperature != 1 {
		t.Fatalf("temperature without the flag: %v (want the server's default 1)", req.Sampling.Temperature)
	}
}

func TestChatOneShotErrors(t *testing.T) {
	b := newReplyBackend()
	addr := startAPI(t, b, api.WithAPIKey("k"))
	if _, _, err := runChat(t, "", "--api", addr, "--api-key", "k", "--model", "gpt-9", "-p", "hi"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("unknown model: %v", err)
	}
	if _, _, err := runChat(t, "", "--api", addr, "--model", "tiny", "-p", "hi"); err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "STRATA_API_KEY") {
		t.Fatalf("missing key: %v", err)
	}
	if out, _, err := runChat(t, "", "--api", addr, "--api-key", "k", "-p", "hi"); err != nil || out != "reply 1 to hi\n" {
		t.Fatalf("with key: %q %v", out, err)
	}
	if _, _, err := runChat(t, "", "--api", addr, "--api-key", "k", "-p", "  "); err == nil {
		t.Fatal("empty prompt accepted")
	}
	if _, _, err := runChat(t, "", "--api", addr, "--temperature", "9", "-p", "hi"); err == nil {
		t.Fatal("temperature 9 accepted")
	}
	// Nothing listening: a clear error, not a hang.
	if _, _, err := runChat(t, "", "--api", "127.0.0.1:1", "-p", "hi"); err == nil || !strings.Contains(err.Error(), "127.0.0.1:1") || !strings.Contains(err.Error(), "--api") {
		t.Fatalf("no server: %v", err)
	}
}

func TestChatInteractive(t *testing.T) {
	b := newReplyBackend()
	addr := startAPI(t, b)
	out, stderr, err := runChat(t, "first\n\n   \nsecond\n/clear\nthird\n/exit\nnever sent\n", "--api", addr, "--model", "tiny")
	if err != nil {
		t.Fatal(err)
	}
	want := "reply 1 to first\nreply 2 to second\nreply 1 to third\n"
	if out != want {
		t.Fatalf("stdout %q, want %q (stderr %q)", out, want, stderr)
	}
	b.mu.Lock()
	prompts := b.prompts
	b.mu.Unlock()
	if len(prompts) != 3 {
		t.Fatalf("%d requests, want 3", len(prompts))
	}
	// The second turn carries the whole conversation; /clear forgot it before the third.
	if prompts[1] != "user: first\nassistant: reply 1 to first\nuser: second\nassistant:" {
		t.Fatalf("second prompt %q", prompts[1])
	}
	if prompts[2] != "user: third\nassistant:" {
		t.Fatalf("third prompt %q", prompts[2])
	}

	// Slash commands are commands: an unknown one says so and reaches no model; // sends a
	// message that starts with a slash.
	out, stderr, err = runChat(t, "/foo\n/model\n/model nope\n//etc/hosts\n", "--api", addr, "--model", "tiny")
	if err != nil || out != "reply 1 to /etc/hosts\n" {
		t.Fatalf("slash commands: %q %v (stderr %q)", out, err, stderr)
	}
	for _, want := range []string{"unknown command /foo", "model tiny at", `no model "nope"`} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q: %q", want, stderr)
		}
	}

	// EOF ends the session too, and a failing turn does not.
	out, stderr, err = runChat(t, "one", "--api", addr, "--model", "tiny")
	if err != nil || out != "reply 1 to one\n" {
		t.Fatalf("EOF: %q %v", out, err)
	}
	out, stderr, err = runChat(t, "one\n", "--api", addr, "--model", "partial")
	if err != nil || out != "" || !strings.Contains(stderr, "503") {
		t.Fatalf("failing turn: out %q stderr %q err %v", out, stderr, err)
	}
}

// syncBuffer is a bytes.Buffer safe for the loop's writes and the test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Ctrl-C while an answer streams stops that answer (the server cancels the generation) and
// the chat goes on; Ctrl-C at the prompt ends it.
func TestChatInterrupt(t *testing.T) {
	b := newReplyBackend()
	b.delay = 10 * time.Millisecond
	addr := startAPI(t, b)
	inR, inW := io.Pipe()
	var out, errOut syncBuffer
	s, err := newChatSession(chatOptions{api: addr, model: "tiny"}, inR, &out, &errOut)
	if err != nil {
		t.Fatal(err)
	}
	sig := make(chan os.Signal, 1)
	s.interrupts = sig
	done := make(chan error, 1)
	go func() { done <- s.loop(context.Background()) }()

	io.WriteString(inW, "long\n")
	select {
	case <-b.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the answer never started")
	}
	waitFor(t, func() bool { return strings.HasPrefix(out.String(), "la la ") }, &out, &errOut)
	sig <- os.Interrupt
	select {
	case err := <-b.stopped:
		if err == nil {
			t.Fatal("generation stopped without an error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server's generation was not cancelled by Ctrl-C")
	}
	waitFor(t, func() bool { return strings.Contains(errOut.String(), "[answer stopped]") }, &out, &errOut)

	io.WriteString(inW, "again\n")
	waitFor(t, func() bool { return strings.HasSuffix(out.String(), "reply 2 to again\n") }, &out, &errOut)
	if prompt, _ := b.last(); !strings.HasPrefix(prompt, "user: long\nassistant: la la") {
		t.Fatalf("the partial answer is not in the history: %q", prompt)
	}

	sig <- os.Interrupt // at the prompt: quit
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Ctrl-C at the prompt did not end the chat")
	}
	inW.Close()
}

func waitFor(t *testing.T, cond func() bool, out, errOut *syncBuffer) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within 10 s; stdout %q stderr %q", out.String(), errOut.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAPIBaseURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:8080":           "http://127.0.0.1:8080/v1/",
		":9000":                    "http://127.0.0.1:9000/v1/",
		"http://node:8080/":        "http://node:8080/v1/",
		"https://swarm.example/v1": "https://swarm.example/v1/",
	} {
		if got, err := apiBaseURL(in); err != nil || got != want {
			t.Errorf("apiBaseURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := apiBaseURL(" "); err == nil {
		t.Error("empty address accepted")
	}
}

// The engine's load-time lines that say nothing on a CPU go to debug; others pass.
func TestQuietEngine(t *testing.T) {
	var b strings.Builder
	l := slog.New(quietEngine{slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelInfo})})
	l.Info("", "architecture", "llama")
	l.Info("offloaded 0/9 layers to GPU")
	l.Info("offloaded 3/9 layers to GPU")
	l.With("k", 1).Info("self-benchmark")
	if got := b.String(); strings.Contains(got, "architecture") || strings.Contains(got, "0/9") ||
		!strings.Contains(got, "3/9") || !strings.Contains(got, "self-benchmark") {
		t.Fatalf("logged:\n%s", got)
	}
}
