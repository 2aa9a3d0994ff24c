package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/shard"
)

func runStatus(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newStatusCommand()
	cmd.SetArgs(args)
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.Execute()
	return out.String(), err
}

// TestStatusAgainstSwarm: `strata status` against a real three-node swarm: the table shows
// every node with the layers it serves, its memory offer and measured speed, and --json is
// the node's /health as it is.
func TestStatusAgainstSwarm(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", "5MiB"}})
	s.MustReady(t, 3, 30*time.Second)

	raw, err := runStatus(t, "--api", s.Nodes[1].API, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var h node.Health
	if err := json.Unmarshal([]byte(raw), &h); err != nil {
		t.Fatalf("--json is not /health: %v\n%s", err, raw)
	}
	if !h.Ready || h.Layers != 6 || len(h.Peers) != 3 || h.Range == nil || h.State != "serving" {
		t.Fatalf("--json: ready=%v layers=%d peers=%d range=%v state=%s", h.Ready, h.Layers, len(h.Peers), h.Range, h.State)
	}
	var apis []string
	for _, n := range s.Nodes {
		apis = append(apis, n.API)
	}
	gpu := false
	for _, p := range h.Peers {
		if p.State != "serving" || p.Range.Empty() || p.Memory != 5<<20 || p.MsPerLayer <= 0 || !slices.Contains(apis, p.API) {
			t.Errorf("--json peer %+v: want serving layers, 5 MiB offered, a measured speed and one of the API addresses %v", p, apis)
		}
		gpu = gpu || p.FreeGPU > 0
	}
	if !gpu && strings.Contains(raw, "free_gpu_bytes") {
		t.Errorf("--json shows GPU memory no node has:\n%s", raw)
	}

	table, err := runStatus(t, "--api", s.Nodes[1].API)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("strata status:\n%s", table)
	// Below the peers: what this node's own layers cost (TestStatusLayerMemory checks its form).
	table, mem, ok := strings.Cut(table, "\n\nlayers ")
	if !ok || !strings.Contains(mem, "on this node: weights") {
		t.Errorf("no layer memory below the peers:\n%s", mem)
	}
	lines := strings.Split(strings.TrimRight(table, "\n"), "\n")
	// The placement line (which device holds which layers) follows the node's line; on a
	// machine without GPUs it names the CPU.
	if len(lines) > 3 && strings.HasPrefix(lines[3], "layers ") {
		if !strings.Contains(lines[3], "CPU") && !gpu {
			t.Errorf("placement line %q names no CPU on a machine without GPUs", lines[3])
		}
		lines = slices.Delete(lines, 3, 4)
	}
	// Then the node's speed: announced from its self-benchmark (a test this short measures
	// no lasting change).
	if len(lines) > 3 && strings.HasPrefix(lines[3], "speed  ") {
		if !regexp.MustCompile(`^speed  announces \S+ ms/layer \(self-benchmark\), at start \S+ ms/layer, now `).MatchString(lines[3]) {
			t.Errorf("speed line %q", lines[3])
		}
		lines = slices.Delete(lines, 3, 4)
	} else {
		t.Errorf("no speed line below the node's")
	}
	if len(lines) != 3+1+1+3 {
		t.Fatalf("want 3 summary lines, a blank, a header and 3 peers; got %d lines:\n%s", len(lines), table)
	}
	if lines[0] != "swarm  READY" {
		t.Errorf("first line %q", lines[0])
	}
	if want := fmt.Sprintf("model  tiny-L0-f16-s1 (6 layers, sha256 %s)", h.ModelSHA256[:12]); lines[1] != want {
		t.Errorf("model line %q, want %q", lines[1], want)
	}
	if want := fmt.Sprintf("node   %s (serving)", h.PeerID); lines[2] != want {
		t.Errorf("node line %q, want %q", lines[2], want)
	}
	header := strings.Fields(lines[4])
	wantHeader := []string{"PEER", "STATE", "LAYERS", "CHAIN", "MEMORY", "MS/LAYER", "SESSIONS", "API"}
	if gpu {
		wantHeader = slices.Insert(wantHeader, 5, "FREE", "GPU")
	}
	if !slices.Equal(header, wantHeader) {
		t.Errorf("header %q, want %q", header, wantHeader)
	}
	row := regexp.MustCompile(`^…(\S{8})( \*)?\s+serving\s+\[(\d+),(\d+)\)\s+(\d+)\s+5\.0 MiB\s+(?:-\s+|\S+ \S+\s+)?(\d+\.\d\d)\s+(\d+)\s+(\S+)$`)
	covered := make([]int, 6)
	selfRows := 0
	for _, l := range lines[5:] {
		m := row.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("peer row %q does not read as a serving peer", l)
			continue
		}
		i := slices.IndexFunc(h.Peers, func(p node.PeerHealth) bool { return strings.HasSuffix(p.PeerID, m[1]) })
		if i < 0 {
			t.Errorf("row %q names no peer of /health", l)
			continue
		}
		p := h.Peers[i]
		a, _ := strconv.Atoi(m[3])
		b, _ := strconv.Atoi(m[4])
		ms, _ := strconv.ParseFloat(m[6], 64)
		if (shard.Range{Start: a, End: b}) != p.Range || m[5] != strconv.Itoa(p.Chain) || m[8] != p.API || (m[2] != "") != p.Self || ms <= 0 {
			t.Errorf("row %q disagrees with /health's %+v", l, p)
		}
		if m[2] != "" {
			selfRows++
		}
		for l := a; l < b && l < 6; l++ {
			covered[l]++
		}
	}
	if selfRows != 1 || slices.Contains(covered, 0) {
		t.Errorf("%d rows marked as this node, layer coverage %v", selfRows, covered)
	}

	if _, err := runStatus(t, "--api", "127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "no node answers") || !strings.Contains(err.Error(), "STRATA_API") {
		t.Errorf("status without a node: %v", err)
	}
}

// TestStatusGPUColumn: the table has a GPU column only when some node reports GPU memory.
func TestStatusGPUColumn(t *testing.T) {
	h := node.Health{Ready: true, Model: "m", Layers: 2, PeerID: "p", State: "serving", Peers: []node.PeerHealth{
		{PeerID: "a", State: "serving", Range: shard.Range{Start: 0, End: 1}, Memory: 1 << 30, MsPerLayer: 1},
		{PeerID: "b", State: "serving", Range: shard.Range{Start: 1, End: 2}, Memory: 1 << 30, MsPerLayer: 1},
	}}
	var out bytes.Buffer
	printStatus(&out, h)
	if strings.Contains(out.String(), "GPU") {
		t.Errorf("CPU-only swarm shows a GPU column:\n%s", out.String())
	}
	h.Peers[1].FreeGPU = 24 << 30
	out.Reset()
	printStatus(&out, h)
	if !strings.Contains(out.String(), "FREE GPU") || !strings.Contains(out.String(), "24.0 GiB") || !regexp.MustCompile(`(?m)^a .* - `).MatchString(out.String()) {
		t.Errorf("a node with 24 GiB of GPU memory free:\n%s", out.String())
	}
	t.Logf("\n%s", out.String())

	// The node's own placement: which of its layers sit on which device.
	h.Placement = &node.PlacementHealth{Summary: "CPU [0,1), Vulkan0 [1,2)+head"}
	out.Reset()
	printStatus(&out, h)
	if !strings.Contains(out.String(), "layers CPU [0,1), Vulkan0 [1,2)+head\n") {
		t.Errorf("placement line missing:\n%s", out.String())
	}
}

// TestParseGPULayers: --gpu-layers is auto (Config's 0), a count, or 0 for none (Config's -1).
func TestParseGPULayers(t *testing.T) {
	for in, want := range map[string]int{"auto": 0, "": 0, "AUTO": 0, "0": -1, "12": 12} {
		if got, err := parseGPULayers(in); err != nil || got != want {
			t.Errorf("parseGPULayers(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"-1", "all", "1.5"} {
		if _, err := parseGPULayers(bad); err == nil {
			t.Errorf("parseGPULayers(%q): no error", bad)
		}
	}
}

// TestStatusMarksRetiring: a node moving to a new plan shows its old range as retiring and
// the next one; a node outside every chain shows "-" for its chain, as for its layers.
func TestStatusMarksRetiring(t *testing.T) {
	h := node.Health{Ready: true, Model: "m", Layers: 4, PeerID: "p", State: "serving", Peers: []node.PeerHealth{
		{PeerID: "12D3KooWabcdefghijklmnop", State: "serving", Range: shard.Range{Start: 0, End: 3}, Next: &shard.Range{Start: 0, End: 2}, Memory: 1 << 30},
		{PeerID: "b", State: "joining", Chain: -1, Memory: 1 << 30},
	}}
	var out bytes.Buffer
	printStatus(&out, h)
	if !strings.Contains(out.String(), "…ijklmnop  serving  [0,3) retiring, next [0,2)") || !regexp.MustCompile(`(?m)^b +joining +- +- `).MatchString(out.String()) {
		t.Errorf("status:\n%s", out.String())
	}
}

// TestStatusShowsFetches: slice fetches show their layers, source, bytes, speed, the bytes
// from each peer, dropped peers and whether the slice was checked against a manifest.
func TestStatusShowsFetches(t *testing.T) {
	h := node.Health{Ready: true, Model: "m", Layers: 4, PeerID: "p", State: "loading", Fetches: []node.FetchStatus{
		{Range: shard.Range{Start: 0, End: 2}, From: "peers", Sources: 2, SliceBytes: 4 << 20, TensorBytes: 1 << 20, BytesPerSec: 1 << 20,
			Peers: map[string]int64{"12D3KooWabcdefghijklmnop": 1 << 20}, Dropped: []string{"12D3KooWzyxwvutsrqponmlk"}},
		{Range: shard.Range{Start: 2, End: 4}, From: "hub", Sources: 1, SliceBytes: 2 << 20, TensorBytes: 2 << 20, Done: true,
			Peers: map[string]int64{"hub": 2 << 20}},
	}}
	var out bytes.Buffer
	printStatus(&out, h)
	for _, want := range []string{
		"fetch  layers [0,2) from peers (2 sources): 1.0 MiB of 4.0 MiB, 1.0 MiB/s, fetching",
		"received from …ijklmnop 1.0 MiB",
		"dropped (bytes failed the manifest's check): …rqponmlk",
		"fetch  layers [2,4) from hub (1 sources): 2.0 MiB of 2.0 MiB",
		"done, not yet checked against a manifest",
		"received from hub 2.0 MiB",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}

// TestStatusSpeedLine: the node's speed as announced, measured at start and measured now.
func TestStatusSpeedLine(t *testing.T) {
	for _, c := range []struct {
		sp   node.SpeedHealth
		want string
	}{
		{node.SpeedHealth{StartMs: 128, AnnouncedMs: 128, Source: "self-benchmark"},
			"speed  announces 128 ms/layer (self-benchmark), at start 128 ms/layer, now -\n"},
		{node.SpeedHealth{StartMs: 128, CurrentMs: 0.84, AnnouncedMs: 0.841, Source: "steps", Steps: 96, Batched: 7, Drifting: 0},
			"speed  announces 0.841 ms/layer (steps), at start 128 ms/layer, now 0.84 ms/layer over 96 decode steps alone (7 batched)\n"},
		{node.SpeedHealth{CurrentMs: 3, Steps: 32, Drifting: 1},
			"speed  announces -, at start -, now 3 ms/layer over 32 decode steps alone (0 batched); 1 measurements beyond the band\n"},
	} {
		h := node.Health{Ready: true, Model: "m", Layers: 2, PeerID: "p", State: "serving", Speed: &c.sp}
		var out bytes.Buffer
		printStatus(&out, h)
		if !strings.Contains(out.String(), c.want) {
			t.Errorf("status for %+v:\n%s\nwant the line %q", c.sp, out.String(), c.want)
		}
	}
}
