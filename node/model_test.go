package node_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestNodesServeAHubModel: two node processes given --model hf://... download it from a local
// server laid out like the Hugging Face hub into their data dirs, split it, and answer a chat
// under the file's name with what the local file gives.
func TestNodesServeAHubModel(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := swarmModel(t)
	hub := testkit.ServeHub(t, map[string]string{"strata/tiny-GGUF/resolve/main/tiny-L0-f32-s1.gguf": model})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 2, Model: "hf://strata/tiny-GGUF/tiny-L0-f32-s1.gguf", Env: []string{"HF_ENDPOINT=" + hub},
		Args: []string{"--max-memory", threeLayers, "--codec", "f32"}})
	s.MustReady(t, 2, 60*time.Second)
	for _, n := range s.Nodes {
		p := filepath.Join(n.DataDir, "models", "hf", "strata", "tiny-GGUF", "main", "tiny-L0-f32-s1.gguf")
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("node %d did not keep the download: %v", n.Index, err)
		}
	}
	want := expected(t, model, []string{"hello"}, 16)[0].Text
	c := client(s.Nodes[1])
	resp, err := c.Chat.Completions.New(context.Background(), chatParams("hello", 16))
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Choices[0].Message.Content; got != want {
		t.Fatalf("hub model: %q, local file: %q", got, want)
	}
}
