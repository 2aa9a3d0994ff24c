package cli

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-llm/strata/shard"
)

func run(t *testing.T, args ...string) string {
	t.Helper()
	cmd := NewRootCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("strata %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// TestSynthRunSplitQuant is the engine issue's acceptance path: synthesize the tiny model,
// generate whole and split in 3 (same text) for f32, q8_0 and q4_0 weights, and requantize.
func TestSynthRunSplitQuant(t *testing.T) {
	dir := t.TempDir()
	for _, typ := range []string{"f32", "q8_0", "q4_0"} {
		m := filepath.Join(dir, typ+".gguf")
		run(t, "model", "synth", "--preset", "tiny", "--seed", "1", "--type", typ, "--out", m)
		args := []string{"run", "--model", m, "--prompt", "hello", "--max-tokens", "32", "--temperature", "0", "--threads", "1", "--slice-dir", filepath.Join(dir, "slices")}
		whole := run(t, args...)
		split := run(t, append(args, "--split", "3")...)
		if whole != split || len(strings.TrimSpace(whole)) == 0 {
			t.Fatalf("%s: whole %q, split %q", typ, whole, split)
		}
	}
	out := filepath.Join(dir, "requant.gguf")
	run(t, "quant", "--in", filepath.Join(dir, "f32.gguf"), "--out", out, "--type", "q8_0")
	info, err := shard.ReadModelInfo(out)
	if err != nil {
		t.Fatal(err)
	}
	if info.FileType != "Q8_0" {
		t.Fatalf("requantized file type %s", info.FileType)
	}
	// The requantized model still runs, split or whole.
	a := run(t, "run", "--model", out, "--prompt", "hi", "--max-tokens", "8", "--threads", "1", "--slice-dir", filepath.Join(dir, "slices"))
	b := run(t, "run", "--model", out, "--prompt", "hi", "--max-tokens", "8", "--threads", "1", "--split", "2", "--slice-dir", filepath.Join(dir, "slices"))
	if a != b {
		t.Fatalf("requantized: whole %q, split %q", a, b)
	}
	if !strings.Contains(run(t, "model", "info", out), "layers      6") {
		t.Fatal("model info")
	}
}
