package node

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/strata-llm/strata/discovery"
	"github.com/strata-llm/strata/internal/cpulock"
	"github.com/strata-llm/strata/shard"
)

// Several nodes on one machine (trying the swarm before having the machines, or a big host
// split in processes) would otherwise each offer 80% of its free memory, so the planner gives
// each a whole copy of the model, and they would all compute at once on the same cores. So a
// node gossips which machine it runs on, and nodes of one machine split its memory (plan
// side, below) and, unless told otherwise, take turns on its cores (hostCPULock).

// hostID names this machine in gossip: a hash of its machine id and host name, so that the
// id itself is not broadcast, clones of one VM image (same machine id, other names) are
// told apart, and containers (own host names) count as machines of their own. Zero when
// neither is known.
func hostID() [8]byte {
	var id string
	for _, p := range []string{"/etc/machine-id", "/var/lib/dbus/machine-id"} {
		if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			id = strings.TrimSpace(string(b))
			break
		}
	}
	name, _ := os.Hostname()
	if id == "" && name == "" {
		return [8]byte{}
	}
	sum := sha256.Sum256([]byte("strata host\x00" + id + "\x00" + name))
	var h [8]byte
	copy(h[:], sum[:])
	return h
}

// hostCPULock is the CPU lock file the nodes of this machine share when none is given with
// --cpu-lock: one per user, in the temp dir.
func hostCPULock() (string, error) {
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("strata-%d", os.Getuid()))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("cpu lock dir: %w", err)
	}
	return filepath.Join(dir, "cpu.lock"), nil
}

// sharesHost reports whether another live node of this machine is in the view.
func (n *Node) sharesHost() bool {
	if n.members == nil || n.host == nil {
		return false
	}
	me := n.hostID
	if me == ([8]byte{}) {
		return false
	}
	for _, m := range n.members.Members() {
		if m.PeerID != "" && m.PeerID != n.host.ID() && m.Host == me && m.State != discovery.StateDraining {
			return true
		}
	}
	return false
}

// splitHosts applies the machine split to the planner's input: the nodes of one machine
// that offer the default share of its memory (no --max-memory) together offer what the
// largest of their offers says the machine has (each measured the free memory at its own
// start; the first, before any of them loaded a layer, measured the most), in equal parts,
// each no more than it offered itself. And together no more than one copy of the model and
// some slack: replicas on one machine would compute on the same cores, so they serve no
// faster than one chain, which is what the nodes of a machine are tried out for.
// caps is parallel to members; members with an explicit offer are left as they are.
func splitHosts(shape shard.ModelShape, members []discovery.NodeMeta, caps []shard.NodeCapacity) {
	groups := map[[8]byte][]int{}
	for i, m := range members {
		if m.SharedOffer && m.Host != ([8]byte{}) && caps[i].MemoryBytes > 0 {
			groups[m.Host] = append(groups[m.Host], i)
		}
	}
	for _, g := range groups {
		if len(g) < 2 {
			continue
		}
		k := int64(len(g))
		var most int64
		for _, i := range g {
			most = max(most, caps[i].MemoryBytes)
		}
		share := most / k
		if total := shape.TotalBytes(); total > 0 {
			share = min(share, total/k+shape.LayerCost()+max(shape.EmbedBytes, shape.HeadBytes))
		}
		for _, i := range g {
			caps[i].MemoryBytes = min(caps[i].MemoryBytes, share)
		}
	}
}

// stageLock is the CPU lock a stage loaded now takes: --cpu-lock's, else the machine's own
// while another node of it is in the view, else none (a node alone keeps its cores to
// itself, without the lock's wait for other sessions' steps).
func (n *Node) stageLock() *cpulock.Lock {
	switch {
	case n.cpu != nil:
		return n.cpu
	case n.hostCPU != nil && n.sharesHost():
		n.log.Info("other nodes of this machine are in the swarm: computing in turns with them (the machine's CPU lock; --cpu-lock names another)")
		return n.hostCPU
	}
	return nil
}

// benchLock is the lock the self-benchmark takes: nodes of one machine starting together
// then measure one at a time, before they know of each other.
func (n *Node) benchLock() *cpulock.Lock {
	if n.cpu != nil {
		return n.cpu
	}
	return n.hostCPU
}
