package cli

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestPullAndRunFromHub: `strata model pull hf://...` and `strata run --model hf://...` against a
// local server laid out like the Hugging Face hub give the same text as the file itself.
func TestPullAndRunFromHub(t *testing.T) {
	model := testkit.TinyModel(t)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /strata/tiny-GGUF/resolve/main/tiny.gguf", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/cdn/tiny", http.StatusFound)
	})
	mux.HandleFunc("GET /cdn/tiny", func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, model) })
	srv := httptest.NewServer(mux)
	defer srv.Close()
	t.Setenv("HF_ENDPOINT", srv.URL)
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
