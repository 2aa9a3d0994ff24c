package fetch

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeStore lays out a directory the way Ollama's store is: a manifest per name and tag
// pointing at content-addressed blobs.
func fakeStore(t *testing.T, name string, digest string) string {
	t.Helper()
	dir := t.TempDir()
	host, ns, model, tag, err := parseOllamaName(name)
	if err != nil {
		t.Fatal(err)
	}
	mdir := filepath.Join(dir, "manifests", host, ns, model)
	if err := os.MkdirAll(mdir, 0o755); err != nil {
		t.Fatal(err)
	}
	manifest := fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:%s","size":10},
"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:%s","size":4},
{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:%s","size":3}]}`, strings.Repeat("c", 64), digest, strings.Repeat("d", 64))
	if err := os.WriteFile(filepath.Join(mdir, tag), []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "blobs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256-"+digest), []byte("GGUF"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestResolveOllamaNames(t *testing.T) {
	digest := strings.Repeat("ab", 32)
	for _, name := range []string{"llama3.3:70b", "llama3.3", "someone/mixtral:8x7b", "example.com/ns/m:q4"} {
		dir := fakeStore(t, name, digest)
		got, err := ResolveLocal(name, dir)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := filepath.Join(dir, "blobs", "sha256-"+digest); got != want {
			t.Fatalf("%s: %s, want %s", name, got, want)
		}
	}
	t.Setenv("OLLAMA_MODELS", fakeStore(t, "llama3.3:70b", digest))
	if _, err := ResolveLocal("llama3.3:70b", ""); err != nil {
		t.Fatalf("OLLAMA_MODELS: %v", err)
	}
}

func TestResolveModelErrors(t *testing.T) {
	dir := fakeStore(t, "llama3.3:70b", strings.Repeat("ab", 32))
	for name, want := range map[string]string{
		"llama3.3:8b":    "neither a file nor in the Ollama store",
		"/no/such.gguf":  "does not exist",
		"a/b/c/d:e":      "bad model name",
		"../../etc:x":    "does not exist",
		"ns/../../etc:x": "bad model name",
		"missing.gguf":   "does not exist",
	} {
		if _, err := ResolveLocal(name, dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", name, err, want)
		}
	}
	// A manifest that points at a missing blob.
	bad := fakeStore(t, "x:y", strings.Repeat("ef", 32))
	os.Remove(filepath.Join(bad, "blobs", "sha256-"+strings.Repeat("ef", 32)))
	if _, err := ResolveLocal("x:y", bad); err == nil || !strings.Contains(err.Error(), "blob missing") {
		t.Errorf("missing blob: %v", err)
	}
}

func TestDefaultModelFromOllamaStore(t *testing.T) {
	t.Setenv("OLLAMA_MODELS", t.TempDir())
	if _, err := DefaultModel(); err == nil || !strings.Contains(err.Error(), "store is empty") {
		t.Fatalf("empty store: %v", err)
	}
	t.Setenv("OLLAMA_MODELS", fakeStore(t, "llama3.3:70b", strings.Repeat("ab", 32)))
	if m, err := DefaultModel(); err != nil || m != "llama3.3:70b" {
		t.Fatalf("one model: %q %v", m, err)
	}
	dir := fakeStore(t, "someone/mixtral:8x7b", strings.Repeat("ab", 32))
	names, err := OllamaModels(dir)
	if err != nil || len(names) != 1 || names[0] != "someone/mixtral:8x7b" {
		t.Fatalf("names %v %v", names, err)
	}
}
