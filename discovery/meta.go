package discovery

import (
	"errors"
	"fmt"
	"math"

	"github.com/hashicorp/memberlist"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/vmihailenco/msgpack/v5"
)

// MaxMetaSize is the largest encoded NodeMeta memberlist carries. Memberlist panics on a
// larger one, so every encoding is checked against it first.
const MaxMetaSize = memberlist.MetaMaxSize

// MaxModelName bounds NodeMeta.ModelName: room for a long Ollama name while the metadata
// keeps far below MaxMetaSize.
const MaxModelName = 96

// ErrMetaTooLarge is returned when a NodeMeta encodes to more than MaxMetaSize bytes.
var ErrMetaTooLarge = errors.New("node metadata too large")

// State is what a node is doing with its layers.
type State uint8

const (
	StateIdle     State = iota // serves no layers
	StateLoading               // loading its range; not ready for requests
	StateServing               // serving its range
	StateDraining              // finishing sessions before leaving or changing range
)

func (s State) String() string {
	switch s {
	case StateIdle:
		return "idle"
	case StateLoading:
		return "loading"
	case StateServing:
		return "serving"
	case StateDraining:
		return "draining"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// NodeMeta is what a node tells the swarm about itself through memberlist. It must encode
// to at most MaxMetaSize bytes: with an Ed25519 peer ID, binary multiaddrs and a full
// 32-byte model hash a typical node takes 120-200 bytes. Larger state belongs in libp2p
// protocols, not here.
type NodeMeta struct {
	// Name and Addr come from memberlist (the node's name and its memberlist host:port);
	// they are filled in by Members and events and are not part of the encoding.
	Name string
	Addr string

	PeerID      peer.ID
	Addrs       []ma.Multiaddr // libp2p addresses, without the /p2p/ part
	ModelSHA256 [32]byte       // the model the node serves; zero when none
	// ManifestID is the first 16 bytes of the id (sha256) of the model's weights manifest that
	// the node serves (package weights); zero when none. 128 bits keep a forged manifest with
	// the same prefix out of reach while the metadata stays small.
	ManifestID [16]byte
	// ModelName is the name clients use for the model (what /v1/models lists), so a node
	// started with --model NAME and no file finds the peers serving NAME. At most
	// MaxModelName bytes.
	ModelName  string
	LayerStart int // the served layer range [LayerStart, LayerEnd); empty when none
	LayerEnd   int
	// NextStart and NextEnd are a range the node has loaded and serves beside its current one
	// while it moves to a new plan; it drops the old range only once the swarm's next ranges
	// cover every layer, so a re-plan never leaves a gap.
	NextStart   int
	NextEnd     int
	Chain       int // the replica chain of the range in the plan that assigned it
	State       State
	MemoryBytes int64   // memory the node offers to its stage (the planner's input)
	FreeRAM     uint64  // bytes
	FreeGPU     uint64  // bytes
	MsPerLayer  float32 // measured ms per layer per token; 0 when not measured
	Sessions    uint32  // sessions open now
	APIAddr     string  // host:port of the OpenAI-compatible API, if served
	// Host names the machine the node runs on (a hash of its machine id and host name; zero
	// when unknown), so that nodes sharing one machine can split its memory.
	Host [8]byte
	// SharedOffer says MemoryBytes is the default offer, a share of the machine's free memory
	// rather than a --max-memory: the nodes of one Host split it between them.
	SharedOffer bool
}

// wireMeta is NodeMeta's encoding: one- or two-letter keys keep it small while leaving room
// for fields added later (unknown keys are skipped on decode).
type wireMeta struct {
	Peer  []byte   `msgpack:"p,omitempty"`
	Addrs [][]byte `msgpack:"a,omitempty"`
	Model []byte   `msgpack:"m,omitempty"`
	Mf    []byte   `msgpack:"mf,omitempty"`
	MName string   `msgpack:"mn,omitempty"`
	Start int      `msgpack:"s,omitempty"`
	End   int      `msgpack:"e,omitempty"`
	NextS int      `msgpack:"ns,omitempty"`
	NextE int      `msgpack:"ne,omitempty"`
	Chain int      `msgpack:"c,omitempty"`
	State uint8    `msgpack:"st,omitempty"`
	Mem   int64    `msgpack:"o,omitempty"`
	RAM   uint64   `msgpack:"r,omitempty"`
	GPU   uint64   `msgpack:"g,omitempty"`
	Ms    float32  `msgpack:"ms,omitempty"`
	Sess  uint32   `msgpack:"n,omitempty"`
	API   string   `msgpack:"api,omitempty"`
	Host  []byte   `msgpack:"h,omitempty"`
	Share bool     `msgpack:"so,omitempty"`
}

// Encode returns the metadata as memberlist carries it, or an error wrapping
// ErrMetaTooLarge when it would not fit.
func (n NodeMeta) Encode() ([]byte, error) {
	if n.LayerStart < 0 || n.LayerEnd < n.LayerStart || n.NextStart < 0 || n.NextEnd < n.NextStart {
		return nil, fmt.Errorf("encode node metadata: bad layer range [%d,%d) or next range [%d,%d)", n.LayerStart, n.LayerEnd, n.NextStart, n.NextEnd)
	}
	if math.IsNaN(float64(n.MsPerLayer)) || n.MsPerLayer < 0 {
		return nil, fmt.Errorf("encode node metadata: bad speed %v ms per layer", n.MsPerLayer)
	}
	w := wireMeta{
		Peer:  []byte(n.PeerID),
		Start: n.LayerStart,
		End:   n.LayerEnd,
		NextS: n.NextStart,
		NextE: n.NextEnd,
		Chain: n.Chain,
		State: uint8(n.State),
		Mem:   n.MemoryBytes,
		RAM:   n.FreeRAM,
		GPU:   n.FreeGPU,
		Ms:    n.MsPerLayer,
		Sess:  n.Sessions,
		API:   n.APIAddr,
		MName: n.ModelName,
		Share: n.SharedOffer,
	}
	if len(n.ModelName) > MaxModelName {
		return nil, fmt.Errorf("encode node metadata: model name of %d bytes, at most %d", len(n.ModelName), MaxModelName)
	}
	if n.ModelSHA256 != ([32]byte{}) {
		w.Model = n.ModelSHA256[:]
	}
	if n.ManifestID != ([16]byte{}) {
		w.Mf = n.ManifestID[:]
	}
	if n.Host != ([8]byte{}) {
		w.Host = n.Host[:]
	}
	for _, a := range n.Addrs {
		if a != nil {
			w.Addrs = append(w.Addrs, a.Bytes())
		}
	}
	b, err := msgpack.Marshal(&w)
	if err != nil {
		return nil, fmt.Errorf("encode node metadata: %w", err)
	}
	if len(b) > MaxMetaSize {
		return nil, fmt.Errorf("%w: %d bytes encoded, memberlist carries at most %d (%d libp2p addresses, API address %d bytes)",
			ErrMetaTooLarge, len(b), MaxMetaSize, len(n.Addrs), len(n.APIAddr))
	}
	return b, nil
}

// DecodeNodeMeta parses metadata made by Encode.
func DecodeNodeMeta(b []byte) (NodeMeta, error) {
	var w wireMeta
	if err := msgpack.Unmarshal(b, &w); err != nil {
		return NodeMeta{}, fmt.Errorf("decode node metadata: %w", err)
	}
	n := NodeMeta{
		LayerStart:  w.Start,
		LayerEnd:    w.End,
		NextStart:   w.NextS,
		NextEnd:     w.NextE,
		Chain:       w.Chain,
		State:       State(w.State),
		MemoryBytes: w.Mem,
		FreeRAM:     w.RAM,
		FreeGPU:     w.GPU,
		MsPerLayer:  w.Ms,
		Sessions:    w.Sess,
		APIAddr:     w.API,
		ModelName:   w.MName,
		SharedOffer: w.Share,
	}
	if len(w.MName) > MaxModelName {
		return NodeMeta{}, fmt.Errorf("decode node metadata: model name of %d bytes, at most %d", len(w.MName), MaxModelName)
	}
	if len(w.Peer) > 0 {
		id, err := peer.IDFromBytes(w.Peer)
		if err != nil {
			return NodeMeta{}, fmt.Errorf("decode node metadata: peer ID: %w", err)
		}
		n.PeerID = id
	}
	switch len(w.Model) {
	case 0:
	case len(n.ModelSHA256):
		copy(n.ModelSHA256[:], w.Model)
	default:
		return NodeMeta{}, fmt.Errorf("decode node metadata: model hash of %d bytes, want 32", len(w.Model))
	}
	switch len(w.Mf) {
	case 0:
	case len(n.ManifestID):
		copy(n.ManifestID[:], w.Mf)
	default:
		return NodeMeta{}, fmt.Errorf("decode node metadata: manifest id of %d bytes, want 16", len(w.Mf))
	}
	switch len(w.Host) {
	case 0:
	case len(n.Host):
		copy(n.Host[:], w.Host)
	default:
		return NodeMeta{}, fmt.Errorf("decode node metadata: host id of %d bytes, want 8", len(w.Host))
	}
	for _, b := range w.Addrs {
		a, err := ma.NewMultiaddrBytes(b)
		if err != nil {
			return NodeMeta{}, fmt.Errorf("decode node metadata: libp2p address: %w", err)
		}
		n.Addrs = append(n.Addrs, a)
	}
	if err := n.check(); err != nil {
		return NodeMeta{}, fmt.Errorf("decode node metadata: %w", err)
	}
	return n, nil
}

// maxMetaLayer bounds the layer indices a peer may claim: far above any model (the planner
// caps models at 4096 layers), low enough that no range arithmetic can overflow.
const maxMetaLayer = 1 << 16

// check refuses metadata no honest node sends, so a lying peer's gossip cannot put negative
// ranges, unknown states or NaN speeds in front of the planner and the router.
func (n NodeMeta) check() error {
	for _, r := range [][2]int{{n.LayerStart, n.LayerEnd}, {n.NextStart, n.NextEnd}} {
		if r[0] < 0 || r[1] < r[0] || r[1] > maxMetaLayer {
			return fmt.Errorf("layer range [%d,%d) is not a range of layers", r[0], r[1])
		}
	}
	if n.Chain < -1 || n.Chain > maxMetaLayer {
		return fmt.Errorf("chain %d out of range", n.Chain)
	}
	if n.State > StateDraining {
		return fmt.Errorf("unknown state %d", n.State)
	}
	if n.MemoryBytes < 0 {
		return fmt.Errorf("negative memory offer %d", n.MemoryBytes)
	}
	if ms := float64(n.MsPerLayer); math.IsNaN(ms) || math.IsInf(ms, 0) || ms < 0 {
		return fmt.Errorf("speed %v ms per layer is not a measurement", n.MsPerLayer)
	}
	return nil
}
