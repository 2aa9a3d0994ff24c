package node_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestSwarmNodeOnVulkan: a swarm of two nodes, one free to compute its slice on a Vulkan device
// (lavapipe on a machine without a GPU) and one held on the CPU (--devices cpu), streams the
// greedy text `strata run` gives on the CPU. f32 activations on the wire; the Vulkan stage's
// logits differ from the CPU's by about 1e-3 (README, GPUs), far below the tiny model's margins
// over these 16 tokens. It needs ggml's Vulkan library (make vulkan: lib/ollama) and skips
// saying so without it, as on CI.
func TestSwarmNodeOnVulkan(t *testing.T) {
	lib, err := filepath.Abs(filepath.Join("..", "lib", "ollama"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(lib, "libggml-vulkan.so")); err != nil {
		t.Skipf("skipped: ggml's Vulkan backend is not built (no %s/libggml-vulkan.so); `make vulkan` builds it (README, GPUs)", lib)
	}
	t.Parallel()
	const maxTokens = 16
	bin := testkit.BuildStrata(t)
	model := swarmModel(t)
	const user = "tell me a story"
	prompt := chatPrompt(user)
	// The CPU's text: the test's strata binary lies outside the repository, so it finds no
	// GPU library of its own.
	run := exec.Command(bin, "run", "--model", model, "--prompt", prompt, "--max-tokens", fmt.Sprint(maxTokens),
		"--temperature", "0", "--threads", "1")
	run.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "OLLAMA_LIBRARY_PATH=") })
	out, err := run.Output()
	if err != nil {
		t.Fatalf("strata run: %v", err)
	}
	want := jsonText(strings.TrimSuffix(string(out), "\n"))

	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 1, Model: model,
		Args: exactArgs,
		// lavapipe is a CPU-type device, which ggml uses only when named; one lavapipe thread
		// (its threads compute ggml's tiled matmul wrong now and then: README, GPUs).
		Env: []string{"OLLAMA_LIBRARY_PATH=" + lib, "GGML_VK_VISIBLE_DEVICES=0", "LP_NUM_THREADS=1"}})
	if _, err := s.Add(context.Background(), "--devices", "cpu"); err != nil {
		t.Fatal(err)
	}
	s.MustReady(t, 2, 5*time.Minute)

	var onGPU, entry *testkit.Node
	for _, n := range s.Nodes {
		h, err := nodeHealth(n)
		if err != nil {
			t.Fatal(err)
		}
		if h.Range != nil && h.Range.Start == 0 {
			entry = n
		}
		var where string
		if h.Placement != nil {
			where = h.Placement.Summary
			if len(h.Placement.GPUs) > 0 {
				onGPU = n
			}
		}
		t.Logf("node %d: layers %v, placement %q", n.Index, h.Range, where)
	}
	if onGPU == nil || onGPU.Index != 0 {
		t.Fatalf("no node serves layers on Vulkan (want node 0; node 1 runs with --devices cpu)")
	}
	if entry == nil {
		t.Fatal("no node serves layer 0")
	}
	got, err := stream(context.Background(), client(entry), chatParams(user, maxTokens), nil)
	if err != nil || got != want {
		t.Fatalf("stream through the swarm: %v\n got %q\nwant %q (strata run on the CPU)", err, got, want)
	}
}
