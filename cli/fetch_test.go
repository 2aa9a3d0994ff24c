package cli

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestPullAndRunFromHub: `strata model pull hf://...` and `strata run --model hf://...` against a
// local server laid out like the Hugging Face hub give the same text as the file itself.
func TestPullAndRunFromHub(t *testing.T) {
	model := testkit.TinyModel(t)
	t.Setenv("HF_ENDPOINT", testkit.ServeHub(t, map[string]string{"strata/tiny-GGUF/resolve/main/tiny.gguf": model}))
	t.Setenv("HOME", t.TempDir())

	ref := "hf://strata/tiny-GGUF/tiny.gguf"
	dir := t.TempDir()
	path := strings.TrimSpace(run(t, "model", "pull", ref, "--dir", dir))
	if want := filepath.Join(dir, "hf", "strata", "tiny-GGUF", "main", "tiny.gguf"); path != want {
		t.Fatalf("pulled to %s, want %s", path, want)
	}
	args := []string{"--prompt", "hello", "--max-tokens", "16", "--threads", "1", "--slice-dir", t.TempDir()}
	want := run(t, append([]string{"run", "--model", model}, args...)...)
	got := run(t, append([]string{"run", "--model", ref}, args...)...)
	if got != want {
		t.Fatalf("run from the hub: %q, from the file: %q", got, want)
	}
}
