package cli

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-llm/strata/p2p"
)

// TestSwarmKeyCommand: the key written to a file or printed loads as a swarm key; an
// existing file is never overwritten.
func TestSwarmKeyCommand(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "swarm.key")
	run := func(arg string) (string, error) {
		cmd := newSwarmKeyCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(io.Discard)
		cmd.SetArgs([]string{arg})
		err := cmd.Execute()
		return out.String(), err
	}
	if _, err := run(path); err != nil {
		t.Fatal(err)
	}
	if _, err := p2p.LoadSwarmKey(path); err != nil {
		t.Fatalf("written key does not load: %v", err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v (%v), want 0600", st.Mode(), err)
	}
	before, _ := os.ReadFile(path)
	if _, err := run(path); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("an existing key file: %v, want a refusal that says it exists", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("a refused write changed the key file")
	}

	printed, err := run("-")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(printed, "/key/swarm/psk/1.0.0/\n/base16/\n") || printed == string(before) {
		t.Fatalf("printed key %q: want a new key in the swarm.key format", printed)
	}
	copyPath := filepath.Join(dir, "printed.key")
	if err := os.WriteFile(copyPath, []byte(printed), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := p2p.LoadSwarmKey(copyPath); err != nil {
		t.Fatalf("printed key does not load: %v", err)
	}
}
