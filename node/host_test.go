package node

import (
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/shard"
)

func testPeerIDs(t *testing.T, k int) []peer.ID {
	t.Helper()
	ids := make([]peer.ID, k)
	for i := range ids {
		_, pub, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		if ids[i], err = peer.IDFromPublicKey(pub); err != nil {
			t.Fatal(err)
		}
	}
	return ids
}

// The README's one-machine recipe without --max-memory: three nodes of one machine, each of
// which measured enough free memory for the whole model, would be three replicas; split, they
// are one chain of three stages. A node of another machine, or one given --max-memory, keeps
// its offer.
func TestNodesOfOneMachineSplitIt(t *testing.T) {
	const gib = 1 << 30
	shape := shard.ModelShape{Layers: 32, LayerBytes: 200 << 20, KVBytesPerToken: 128 << 10, Context: 2048,
		EmbedBytes: 500 << 20, HeadBytes: 500 << 20} // 32 x 456 MiB + 1000 MiB = 15.25 GiB
	machine := [8]byte{1}
	ids := testPeerIDs(t, 5)
	metas := []discovery.NodeMeta{
		{PeerID: ids[0], MemoryBytes: 19 * gib, Host: machine, SharedOffer: true}, // started first
		{PeerID: ids[1], MemoryBytes: 18 * gib, Host: machine, SharedOffer: true},
		{PeerID: ids[2], MemoryBytes: 17 * gib, Host: machine, SharedOffer: true},
	}
	var unsplit []discovery.NodeMeta // as before machines were told apart
	for _, m := range metas {
		m.Host = [8]byte{}
		unsplit = append(unsplit, m)
	}
	whole, err := shard.PlanLayers(shape, capacitiesOf(shape, unsplit))
	if err != nil {
		t.Fatal(err)
	}
	if whole.Replicas != 3 {
		t.Fatalf("without the split: %d replicas, want 3 (each node holds the whole model)", whole.Replicas)
	}
	caps := capacitiesOf(shape, metas)
	share := min(int64(19*gib)/3, shape.TotalBytes()/3+shape.LayerCost()+500<<20)
	for i, c := range caps {
		if c.MemoryBytes != share {
			t.Errorf("node %d plans with %d bytes, want %d", i, c.MemoryBytes, share)
		}
	}
	plan, err := shard.PlanLayers(shape, caps)
	if err != nil {
		t.Fatal(err)
	}
	if plan.Replicas != 1 {
		t.Fatalf("split: %d replicas, want one chain", plan.Replicas)
	}
	for _, id := range ids[:3] {
		if a, _ := plan.Lookup(id.String()); a.Range.Empty() {
			t.Errorf("node %s serves nothing in %+v", id, plan.Assignments)
		}
	}

	// The machine's free memory bounds the split too: a node that measured less keeps less.
	small := []discovery.NodeMeta{
		{PeerID: ids[0], MemoryBytes: 6 * gib, Host: machine, SharedOffer: true},
		{PeerID: ids[1], MemoryBytes: 2 * gib, Host: machine, SharedOffer: true},
		{PeerID: ids[2], MemoryBytes: 8 * gib, Host: [8]byte{2}, SharedOffer: true}, // alone on its machine
		{PeerID: ids[3], MemoryBytes: 7 * gib, Host: machine},                       // --max-memory
		{PeerID: ids[4], MemoryBytes: 9 * gib, SharedOffer: true},                   // machine unknown
	}
	want := []int64{3 * gib, 2 * gib, 8 * gib, 7 * gib, 9 * gib}
	for i, c := range capacitiesOf(shape, small) {
		if c.MemoryBytes != want[i] {
			t.Errorf("node %d plans with %d bytes, want %d", i, c.MemoryBytes, want[i])
		}
	}
}

// The machine id is stable and never zero where the machine has a name.
func TestHostID(t *testing.T) {
	if a, b := hostID(), hostID(); a != b || a == ([8]byte{}) {
		t.Fatalf("hostID: %x then %x", a, b)
	}
}
