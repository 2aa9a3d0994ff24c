package node

import (
	"os"
	"path/filepath"
	"testing"
)

// node: which --model values name a model to take from the swarm. Cheap: no node starts.
func TestNameInSwarm(t *testing.T) {
	t.Setenv("OLLAMA_MODELS", t.TempDir()) // an empty Ollama store
	file := filepath.Join(t.TempDir(), "m.gguf")
	if err := os.WriteFile(file, []byte("GGUF"), 0o644); err != nil {
		t.Fatal(err)
	}
	join := []string{"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"}
	for _, tc := range []struct {
		model string
		join  []string
		mdns  bool
		want  bool
	}{
		{"llama3.3:70b", join, false, true},         // an Ollama name this machine lacks, joining
		{"tiny-L0-f32-s1", nil, true, true},         // a model ID, peers found by mDNS
		{"llama3.3:70b", nil, false, false},         // no way to find peers: the missing model is an error
		{file, join, false, false},                  // a file this machine holds
		{"/no/such/model.gguf", join, false, false}, // a path stays a path: its absence is an error
		{"missing.gguf", join, false, false},
		{"./model", join, false, false},
		{"hf://owner/repo/m.gguf", join, false, false}, // downloaded (or --slices-only)
		{SwarmModel, join, false, false},               // already the swarm's, by any name
	} {
		c := Config{Model: tc.model, Join: tc.join, MDNS: tc.mdns}
		if got := c.nameInSwarm(); got != tc.want {
			t.Errorf("--model %q (join %v, mdns %v): from the swarm %v, want %v", tc.model, len(tc.join) > 0, tc.mdns, got, tc.want)
		}
	}
}
