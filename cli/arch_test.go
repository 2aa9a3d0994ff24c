package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestArchSynthRunSplit: each family's tiny preset, synthesized by the CLI with q4_0 weights,
// gives the same greedy text whole and as 3 stages (the engine oracle in shard holds the f32
// models to the engine's own forward).
func TestArchSynthRunSplit(t *testing.T) {
	dir := t.TempDir()
	for _, name := range append(testkit.SynthArchs(), "mixtral") {
		arch, synth := name, []string{"--arch", name}
		switch name {
		case "llama":
			continue // TestSynthRunSplitQuant
		case "mixtral": // llama with experts
			arch, synth = "llama", []string{"--arch", "llama", "--experts", "8"}
		}
		m := filepath.Join(dir, name+".gguf")
		run(t, append([]string{"model", "synth", "--preset", "tiny", "--seed", "1", "--type", "q4_0", "--out", m}, synth...)...)
		if info := run(t, "model", "info", m); !strings.Contains(info, "architecture "+arch) {
			t.Fatalf("%s: model info says\n%s", arch, info)
		}
		args := []string{"run", "--model", m, "--prompt", "hello", "--max-tokens", "24", "--threads", "1", "--slice-dir", filepath.Join(dir, "slices")}
		whole := run(t, args...)
		split := run(t, append(args, "--split", "3")...)
		if whole != split || len(strings.TrimSpace(whole)) == 0 {
			t.Fatalf("%s: whole %q, split %q", name, whole, split)
		}
	}
}

// TestUnsupportedArchRefused: a model of an architecture Strata does not run is refused by
// name, with the list it does run, before anything is loaded or listened on.
func TestUnsupportedArchRefused(t *testing.T) {
	dir := t.TempDir()
	m := filepath.Join(dir, "mamba.gguf")
	f, err := os.Create(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := fsggml.WriteGGUF(f, fsggml.KV{"general.architecture": "mamba", "mamba.block_count": uint32(2)}, nil); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, args := range [][]string{
		{"model", "info", m},
		{"run", "--model", m, "--prompt", "hi", "--max-tokens", "1"},
		{"node", "start", "--model", m, "--data-dir", filepath.Join(dir, "node"), "--mdns=false", "--api", "127.0.0.1:0",
			"--listen", "/ip4/127.0.0.1/tcp/0", "--gossip", "127.0.0.1:0"},
	} {
		cmd := NewRootCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(args)
		err := cmd.ExecuteContext(context.Background())
		if err == nil || !strings.Contains(err.Error(), `unsupported architecture "mamba"`) || !strings.Contains(err.Error(), "gemma3, llama, mistral3") {
			t.Errorf("strata %s: %v, want a refusal naming mamba and the supported list", args[0]+" "+args[1], err)
		}
	}
}
