package api

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestOfficialNodeClients runs the official npm clients (openai, ollama, @anthropic-ai/sdk)
// from testdata/clients/clients.mjs against a real generator behind the server. It skips
// when node or the packages are absent (scripts/install-deps.sh installs them with npm ci).
func TestOfficialNodeClients(t *testing.T) {
	if testing.Short() {
		t.Skip("starts node: not in -short")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed; the official Node clients are not tested")
	}
	dir := filepath.Join("testdata", "clients")
	for _, p := range []string{"openai", "ollama", "@anthropic-ai/sdk"} {
		if _, err := os.Stat(filepath.Join(dir, "node_modules", p, "package.json")); err != nil {
			t.Skipf("npm package %s is not installed (run scripts/install-deps.sh, or npm ci in %s)", p, dir)
		}
	}
	b := structuredServer(t) // room in the context for tool descriptions
	ts := startServer(t, b, WithAPIKey("secret"))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute) // a hang guard only
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "clients.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "STRATA_URL="+ts.URL, "STRATA_MODEL=tiny", "STRATA_KEY=secret")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), "ok") {
		t.Fatalf("node clients: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
