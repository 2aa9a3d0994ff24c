package node

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/internal/testkit"
)

func TestMemoryOfferRule(t *testing.T) {
	for _, c := range []struct {
		cfg       Config
		available int64
		want      int64
	}{
		{Config{}, 10 << 30, 8 << 30},
		{Config{MaxMemory: 3 << 30}, 10 << 30, 3 << 30},
		{Config{ClientOnly: true, MaxMemory: 3 << 30}, 10 << 30, 0},
		{Config{}, 0, 0},
	} {
		if got := memoryOffer(c.cfg, c.available); got != c.want {
			t.Errorf("memoryOffer(%+v, %d) = %d, want %d", c.cfg, c.available, got, c.want)
		}
	}
}

// TestMemoryOfferFixedAtStart: a node without --max-memory offers 80% of the memory free at
// start, and keeps offering that once its own slice is loaded and free memory has shrunk.
func TestMemoryOfferFixedAtStart(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	n, err := Start(context.Background(), Config{
		Model: model, DataDir: t.TempDir(), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, API: "127.0.0.1:0",
		Gossip: "127.0.0.1:0", Threads: 1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	first := n.members.Meta()
	if first.MemoryBytes <= 0 || first.MemoryBytes > int64(first.FreeRAM) {
		t.Fatalf("offers %d bytes with %d free", first.MemoryBytes, first.FreeRAM)
	}
	deadline := time.Now().Add(30 * time.Second)
	for n.Health().State != "serving" {
		if time.Now().After(deadline) {
			t.Fatalf("a lone node is %s after 30 s: %s", n.Health().State, n.Health().Missing)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Shrink free memory by much more than the tiny model does, as a big slice would.
	hog := make([]byte, 512<<20)
	for i := range hog {
		hog[i] = byte(i)
	}
	defer runtime.KeepAlive(hog)
	m := n.meta() // what the node would announce now
	// Other processes move free memory too: its drop is logged, the offer is asserted.
	t.Logf("free RAM %d MiB at start, %d MiB after loading and a 512 MiB allocation", first.FreeRAM>>20, m.FreeRAM>>20)
	if m.MemoryBytes != first.MemoryBytes {
		t.Fatalf("the offer moved from %d to %d bytes: the planner could take layers the node holds", first.MemoryBytes, m.MemoryBytes)
	}
	if m.LayerEnd-m.LayerStart != 6 {
		t.Fatalf("a lone node announces layers [%d,%d), want all 6", m.LayerStart, m.LayerEnd)
	}
}

func TestDrifted(t *testing.T) {
	base := discovery.NodeMeta{FreeRAM: 8 << 30, Sessions: 1, State: discovery.StateServing, LayerEnd: 4}
	for _, c := range []struct {
		name string
		edit func(*discovery.NodeMeta)
		want bool
	}{
		{"unchanged", func(*discovery.NodeMeta) {}, false},
		{"free RAM noise", func(m *discovery.NodeMeta) { m.FreeRAM -= 100 << 20 }, false},
		{"free RAM moved", func(m *discovery.NodeMeta) { m.FreeRAM -= 1 << 30 }, true},
		{"GPU appeared", func(m *discovery.NodeMeta) { m.FreeGPU = 4 << 30 }, true},
		{"session closed", func(m *discovery.NodeMeta) { m.Sessions = 0 }, true},
		{"state", func(m *discovery.NodeMeta) { m.State = discovery.StateDraining }, true},
		{"range", func(m *discovery.NodeMeta) { m.NextEnd = 2 }, true},
	} {
		cur := base
		c.edit(&cur)
		if got := drifted(base, cur); got != c.want {
			t.Errorf("%s: drifted = %v, want %v", c.name, got, c.want)
		}
	}
}
