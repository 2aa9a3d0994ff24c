package node_test

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// qwenChatPrompt is what the synthesized Qwen 2.5 template renders for one user message.
func qwenChatPrompt(user string) string {
	return "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n" +
		user + "<|im_end|>\n<|im_start|>assistant\n"
}

// TestArchSwarmQwen2: a swarm serving a qwen2 model (biases, NeoX RoPE, its own chat template
// and pre-tokenizer) through the official OpenAI client gives exactly `strata run`'s text for
// the template's prompt, and still does when a node holding layers is killed -9 mid-stream.
func TestArchSwarmQwen2(t *testing.T) {
	model := testkit.Model(t, testkit.SynthOptions{Arch: "qwen2", Preset: "tiny", Seed: 1, Type: "f32"})
	const id, maxTokens = "qwen2-tiny-L0-f32-s1", 64
	st, err := shard.LoadStage(context.Background(), model, shard.Range{Start: 0, End: 6}, shard.WithSliceDir(t.TempDir()), shard.WithThreads(1), shard.WithMaxContext(2048))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := shard.LoadTokenizer(model)
	if err != nil {
		t.Fatal(err)
	}
	g := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: []*shard.Stage{st}, Codec: quant.CodecF16})
	// The stream must outlast the kill: take the first prompt the random model does not end early.
	var user string
	var want pipeline.Result
	for i := range 20 {
		user = fmt.Sprintf("tell me a story, part %d", i)
		if want, err = g.Generate(context.Background(), pipeline.Request{Prompt: qwenChatPrompt(user), MaxTokens: maxTokens}, nil); err != nil {
			t.Fatal(err)
		}
		if want.CompletionTokens == maxTokens {
			break
		}
	}
	st.Close()
	if want.CompletionTokens < maxTokens {
		t.Fatalf("no prompt ran %d tokens", maxTokens)
	}
	bin := testkit.BuildStrata(t)
	out, err := exec.Command(bin, "run", "--model", model, "--prompt", qwenChatPrompt(user), "--max-tokens", fmt.Sprint(maxTokens),
		"--temperature", "0", "--threads", "1").Output()
	if err != nil {
		t.Fatalf("strata run: %v", err)
	}
	if got := strings.TrimSuffix(string(out), "\n"); got != want.Text {
		t.Fatalf("strata run %q, in-process generation %q", got, want.Text)
	}

	// Every node offers two layers: three cover the model and the plan may leave the fourth
	// idle (it takes over after the kill), so ready means at least three serving.
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 4, Model: model, Args: exactArgs})
	s.MustReady(t, 3, 60*time.Second)
	entry, err := s.Add(context.Background(), "--client-only")
	if err != nil {
		t.Fatal(err)
	}
	s.MustReady(t, 3, 30*time.Second)
	p := chatParams(user, maxTokens)
	p.Model = id
	got, err := stream(context.Background(), client(entry), p, nil)
	if err != nil || got != jsonText(want.Text) {
		t.Fatalf("stream: %v\n got %q\nwant %q", err, got, want.Text)
	}
	kill, victim := disruptHolderAt(t, s, entry, 20, (*testkit.Node).Kill)
	got, err = stream(context.Background(), client(entry), p, kill)
	t.Logf("took down %s mid-stream", victim(err, got))
	if err != nil {
		t.Fatalf("stream broke: %v", err)
	}
	if got != jsonText(want.Text) {
		t.Fatalf("stream after kill -9:\n got %q\nwant %q", got, want.Text)
	}
}
