package node

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/shard"
)

// fakeClock is the tracker's clock in tests: time moves only when the test says.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time      { return c.t }
func (c *fakeClock) add(d time.Duration) { c.t = c.t.Add(d) }
func newFakeClock() *fakeClock           { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }
func testSpeedOptions() SpeedOptions {
	return SpeedOptions{Window: 4, Lasting: 3, LastingFor: 30 * time.Second}
}
func feedWindow(t *speedTracker, ms float64) (float32, bool) {
	var v float32
	var ok bool
	for range t.opt.Window {
		if w, c := t.step(ms, true); c {
			v, ok = w, c
		}
	}
	return v, ok
}

// Noise within the band never changes the announced speed, however long it goes on.
func TestSpeedTrackerHoldsWithinBand(t *testing.T) {
	clk := newFakeClock()
	tr := newSpeedTracker(testSpeedOptions(), 10, 10, clk.now)
	for i := range 200 {
		ms := []float64{7, 14.5, 9, 12, 6.8, 10}[i%6]
		if v, ok := feedWindow(tr, ms); ok {
			t.Fatalf("window %d (%.1f ms): announced %v, want 10 kept", i, ms, v)
		}
		clk.add(10 * time.Second)
	}
	if h := tr.health(); h.AnnouncedMs != 10 || h.Source != "self-benchmark" || h.Steps != 800 {
		t.Fatalf("health %+v", h)
	}
}

// A change beyond the band is announced once it has lasted Lasting measurements and
// LastingFor, as the median of them, rounded like the self-benchmark.
func TestSpeedTrackerLastingChange(t *testing.T) {
	clk := newFakeClock()
	tr := newSpeedTracker(testSpeedOptions(), 128, 128, clk.now) // measured badly at start
	for i := range 5 {                                           // many windows, but within seconds
		if v, ok := feedWindow(tr, 0.8+0.01*float64(i)); ok {
			t.Fatalf("announced %v after %d windows within a second", v, i+1)
		}
		clk.add(time.Second)
	}
	if h := tr.health(); h.Drifting != 5 || math.Abs(h.CurrentMs-0.84) > 1e-9 {
		t.Fatalf("health while drifting: %+v", h)
	}
	clk.add(30 * time.Second)
	v, ok := feedWindow(tr, 0.85)
	if !ok || v != roundSpeed(0.825) {
		t.Fatalf("after a lasting change: announced %v (%v), want %v", v, ok, roundSpeed(0.825))
	}
	if h := tr.health(); h.AnnouncedMs != v || h.Source != "steps" || h.StartMs != 128 || h.Drifting != 0 {
		t.Fatalf("health after the change: %+v", h)
	}
	// The band now sits around the new speed.
	for range 10 {
		clk.add(time.Minute)
		if w, ok := feedWindow(tr, 1.1); ok {
			t.Fatalf("announced %v for a measurement within the band of %v", w, v)
		}
	}
	// The next change waits for the hold (2m) after the last announcement, however lasting.
	clk.add(-10 * time.Minute) // back to just after the announcement
	for i := range 10 {
		if w, ok := feedWindow(tr, 4); ok {
			t.Fatalf("announced %v %d s after the last announcement", w, 10*i)
		}
		clk.add(10 * time.Second)
	}
	clk.add(30 * time.Second)
	if w, ok := feedWindow(tr, 4); !ok || w != 4 {
		t.Fatalf("after the hold: announced %v (%v), want 4", w, ok)
	}
}

// An outlier window, or a drift that reverses, starts the count again.
func TestSpeedTrackerNeedsConsecutiveWindows(t *testing.T) {
	clk := newFakeClock()
	tr := newSpeedTracker(testSpeedOptions(), 2, 2, clk.now)
	for i, ms := range []float64{5, 5, 2, 5, 5, 0.5, 5, 5, 2.1} {
		clk.add(time.Minute)
		if v, ok := feedWindow(tr, ms); ok {
			t.Fatalf("measurement %d (%v ms): announced %v", i, ms, v)
		}
	}
	clk.add(time.Minute)
	feedWindow(tr, 5)
	clk.add(time.Minute)
	feedWindow(tr, 5)
	clk.add(time.Minute)
	if v, ok := feedWindow(tr, 6); !ok || v != roundSpeed(5) {
		t.Fatalf("three slow windows in a row: announced %v (%v), want %v", v, ok, roundSpeed(5))
	}
}

// A window's median ignores a few slow steps (a wait for the cores, a GC pause), and steps
// batched with other sessions' are counted, never measured.
func TestSpeedTrackerStepsOfAWindow(t *testing.T) {
	clk := newFakeClock()
	opt := testSpeedOptions()
	opt.Window = 5
	tr := newSpeedTracker(opt, 4, 4, clk.now)
	for _, ms := range []float64{4, 400, 4.2, 3.9, 300} {
		tr.step(ms, true)
	}
	for range 100 {
		tr.step(0.5, false) // batched: cheap per step, but not comparable
	}
	if h := tr.health(); h.CurrentMs != 4.2 || h.Steps != 5 || h.Batched != 100 || h.Drifting != 0 {
		t.Fatalf("health %+v, want current 4.2 from 5 steps, 100 batched, no drift", h)
	}
	// A move interrupts the window under way: its steps start again.
	tr.step(9, true)
	tr.step(9, true)
	tr.interrupt()
	for range 5 {
		tr.step(4.4, true)
	}
	if h := tr.health(); h.CurrentMs != 4.4 || h.Skipped != 1 {
		t.Fatalf("after a move: health %+v, want current 4.4 from the 5 steps after it", h)
	}
	if anyMoving([]discovery.NodeMeta{{State: discovery.StateServing, LayerEnd: 2}}) ||
		!anyMoving([]discovery.NodeMeta{{State: discovery.StateServing, LayerEnd: 2, NextStart: 0, NextEnd: 1}}) ||
		!anyMoving([]discovery.NodeMeta{{State: discovery.StateLoading}}) {
		t.Fatal("anyMoving: wrong for a serving, a moving or a loading member")
	}
	for _, ms := range []float64{0, -1, math.Inf(1), math.NaN()} {
		if _, ok := tr.step(ms, true); ok {
			t.Fatalf("step of %v ms announced something", ms)
		}
	}
}

// A node that announced no speed (its model came from the swarm, so it ran no self-benchmark)
// announces its first lasting measurement.
func TestSpeedTrackerFirstMeasurement(t *testing.T) {
	clk := newFakeClock()
	tr := newSpeedTracker(SpeedOptions{Lasting: 2, LastingFor: -1}, 0, 0, clk.now)
	if v, ok := tr.window(3, "re-benchmark"); ok {
		t.Fatalf("announced %v after one measurement", v)
	}
	if v, ok := tr.window(3.2, "re-benchmark"); !ok || v != roundSpeed(3.1) {
		t.Fatalf("announced %v (%v), want %v", v, ok, roundSpeed(3.1))
	}
	if h := tr.health(); h.Source != "re-benchmark" || h.StartMs != 0 {
		t.Fatalf("health %+v", h)
	}
}

// stageWork weighs a stage's step by the self-benchmark's layer: the blocks it holds, and the
// LM head on the last stage.
func TestStageWork(t *testing.T) {
	m := &shard.ModelInfo{Layers: 4, LayerBytes: []int64{100, 100, 100, 100}, HeadBytes: 150, EmbedBytes: 150}
	for _, c := range []struct {
		r    shard.Range
		want float64
	}{
		{shard.Range{Start: 0, End: 2}, 2},
		{shard.Range{Start: 1, End: 2}, 1},
		{shard.Range{Start: 2, End: 4}, 3.5},
		{shard.Range{Start: 0, End: 4}, 5.5},
	} {
		if got := stageWork(m, c.r); got != c.want {
			t.Errorf("stageWork(%s) = %v, want %v", c.r, got, c.want)
		}
	}
}

// A speed the tracker announces moves layers: a node found lastingly four times slower than
// it measured at start gives layers to the others, through the plan every node computes from
// the gossiped metadata; a speed within the band announces nothing and moves nothing.
func TestSpeedChangeMovesLayers(t *testing.T) {
	shape := shard.ModelShape{Layers: 12, LayerBytes: 1 << 20, KVBytesPerToken: 256, Context: 2048}
	ids := make([]peer.ID, 3)
	metas := make([]discovery.NodeMeta, 3)
	for i := range metas {
		_, pub, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		if ids[i], err = peer.IDFromPublicKey(pub); err != nil {
			t.Fatal(err)
		}
		// 9 MiB holds 6 of the 1.5 MiB layers: one chain of three nodes.
		metas[i] = discovery.NodeMeta{PeerID: ids[i], MemoryBytes: 9 << 20, MsPerLayer: 2, State: discovery.StateServing, Chain: 0}
	}
	plan := func() shard.Plan {
		t.Helper()
		p, err := shard.PlanLayers(shape, capacitiesOf(shape, metas))
		if err != nil {
			t.Fatal(err)
		}
		for i := range metas { // every node moves to its part, as replan does
			a, _ := p.Lookup(ids[i].String())
			metas[i].LayerStart, metas[i].LayerEnd, metas[i].Chain = a.Range.Start, a.Range.End, a.Chain
		}
		return p
	}
	ranges := func(p shard.Plan) string {
		var s []string
		for _, id := range ids {
			a, _ := p.Lookup(id.String())
			s = append(s, a.Range.String())
		}
		return fmt.Sprint(s)
	}
	before := plan()
	if got := plan(); ranges(got) != ranges(before) {
		t.Fatalf("the plan moved with nothing changed: %s then %s", ranges(before), ranges(got))
	}
	slow, _ := before.Lookup(ids[1].String())

	clk := newFakeClock()
	tr := newSpeedTracker(testSpeedOptions(), 2, 2, clk.now)
	// Slower, but within the band: nothing is announced, and the plan stays.
	for range 6 {
		clk.add(time.Minute)
		if v, ok := feedWindow(tr, 2.8); ok {
			t.Fatalf("announced %v for a measurement within the band", v)
		}
	}
	// Lastingly four times slower.
	var v float32
	for range 4 {
		clk.add(time.Minute)
		if w, ok := feedWindow(tr, 8); ok {
			v = w
		}
	}
	if v != 8 {
		t.Fatalf("announced %v, want 8", v)
	}
	metas[1].MsPerLayer = v
	after := plan()
	now, _ := after.Lookup(ids[1].String())
	t.Logf("plan before %s, after node 1 announced %v ms per layer: %s", ranges(before), v, ranges(after))
	if now.Range.Len() >= slow.Range.Len() {
		t.Fatalf("node 1 serves %s after announcing it is 4x slower, %s before", now.Range, slow.Range)
	}
	if again := plan(); ranges(again) != ranges(after) {
		t.Fatalf("the plan kept moving: %s then %s", ranges(after), ranges(again))
	}
}
