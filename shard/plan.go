package shard

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
)

// ErrBadPlanInput is wrapped by every PlanLayers error about malformed input (as opposed to
// a swarm that is merely too small, which is an *InsufficientMemoryError).
var ErrBadPlanInput = errors.New("bad plan input")

// ModelShape is what the planner needs to know about a model: the memory each part costs.
type ModelShape struct {
	Layers          int   // transformer blocks
	LayerBytes      int64 // weights of one block (the largest block, to be safe)
	KVBytesPerToken int64 // KV cache of one token in one block
	EmbedBytes      int64 // token_embd, loaded by the stage that holds layer 0
	HeadBytes       int64 // output_norm + output, loaded by the stage that holds the last layer
	Context         int   // tokens of KV cache to budget per block
	// LayerCosts, when set (one per block), is each block's own memory, weights and KV
	// cache, in place of LayerBytes and KVBytesPerToken*Context: a sliding-window layer keeps
	// only its window of KV, and blocks of one model can differ in weights (dense and
	// mixture-of-experts blocks).
	LayerCosts []int64
}

// LayerCost is the memory one block needs: its weights and its KV cache (the largest block's,
// when blocks differ).
func (m ModelShape) LayerCost() int64 {
	if len(m.LayerCosts) > 0 {
		return slices.Max(m.LayerCosts)
	}
	return m.LayerBytes + m.KVBytesPerToken*int64(m.Context)
}

// layersCost is the memory of layers [a,b).
func (m ModelShape) layersCost(a, b int) int64 {
	if len(m.LayerCosts) == 0 {
		return int64(b-a) * m.LayerCost()
	}
	var n int64
	for _, c := range m.LayerCosts[a:b] {
		n += c
	}
	return n
}

// fitLayers is the most layers that fit in mem wherever they start: the largest k whose
// costliest run of k consecutive blocks fits.
func (m ModelShape) fitLayers(mem int64, worst []int64) int {
	if len(m.LayerCosts) == 0 {
		c := m.LayerCost()
		if c == 0 || mem/c >= int64(m.Layers) {
			return m.Layers
		}
		return int(mem / c)
	}
	k, _ := slices.BinarySearchFunc(worst[1:], mem, func(w, mem int64) int {
		if w <= mem {
			return -1
		}
		return 1
	})
	return k
}

// worstRuns returns, for each k, the most memory k consecutive blocks take (worst[0] = 0).
func (m ModelShape) worstRuns() []int64 {
	if len(m.LayerCosts) == 0 {
		return nil
	}
	prefix := make([]int64, m.Layers+1)
	for l, c := range m.LayerCosts {
		prefix[l+1] = prefix[l] + c
	}
	worst := make([]int64, m.Layers+1)
	for k := 1; k <= m.Layers; k++ {
		for a := 0; a+k <= m.Layers; a++ {
			worst[k] = max(worst[k], prefix[a+k]-prefix[a])
		}
	}
	return worst
}

// RangeBytes is the memory a node serving r needs.
func (m ModelShape) RangeBytes(r Range) int64 {
	if r.Empty() {
		return 0
	}
	n := m.layersCost(max(r.Start, 0), min(r.End, m.Layers))
	if r.Start == 0 {
		n += m.EmbedBytes
	}
	if r.End == m.Layers {
		n += m.HeadBytes
	}
	return n
}

// TotalBytes is the memory one whole copy of the model needs.
func (m ModelShape) TotalBytes() int64 { return m.RangeBytes(Range{0, m.Layers}) }

// maxPlanLayers bounds the planner's work (quadratic in layers): real models have at most a
// few hundred.
const maxPlanLayers = 4096

func (m ModelShape) validate() error {
	switch {
	case m.Layers <= 0 || m.Layers > maxPlanLayers:
		return fmt.Errorf("%w: model has %d layers, want 1 to %d", ErrBadPlanInput, m.Layers, maxPlanLayers)
	case m.LayerBytes < 0, m.KVBytesPerToken < 0, m.EmbedBytes < 0, m.HeadBytes < 0:
		return fmt.Errorf("%w: negative byte count in model shape %+v", ErrBadPlanInput, m)
	case m.Context < 0:
		return fmt.Errorf("%w: negative context %d", ErrBadPlanInput, m.Context)
	case len(m.LayerCosts) != 0 && len(m.LayerCosts) != m.Layers:
		return fmt.Errorf("%w: %d layer costs for %d layers", ErrBadPlanInput, len(m.LayerCosts), m.Layers)
	}
	var sum int64
	for _, c := range m.LayerCosts {
		if c < 0 || c > math.MaxInt64/int64(m.Layers+1)/2 {
			return fmt.Errorf("%w: layer cost %d out of range", ErrBadPlanInput, c)
		}
		sum += c
	}
	if sum > math.MaxInt64/2-m.EmbedBytes-m.HeadBytes {
		return fmt.Errorf("%w: model size overflows int64", ErrBadPlanInput)
	}
	// Every later sum stays below TotalBytes, so checking it once rules out overflow.
	const maxB = math.MaxInt64
	if m.Context > 0 && m.KVBytesPerToken > (maxB-m.LayerBytes)/int64(m.Context) {
		return fmt.Errorf("%w: KV cache per layer overflows int64", ErrBadPlanInput)
	}
	if m.EmbedBytes > maxB-m.HeadBytes {
		return fmt.Errorf("%w: embedding and head bytes overflow int64", ErrBadPlanInput)
	}
	if c := m.LayerCost(); c > 0 && int64(m.Layers) > (maxB-m.EmbedBytes-m.HeadBytes)/c {
		return fmt.Errorf("%w: model size overflows int64", ErrBadPlanInput)
	}
	return nil
}

// NodeCapacity is one live node as the planner sees it.
type NodeCapacity struct {
	ID          string
	MemoryBytes int64   // memory the node offers to its stage
	MsPerLayer  float64 // measured milliseconds per layer per token; 0 when not measured yet
	Current     Range   // what the node serves now (empty if nothing); the plan tries to keep it
	// CurrentChain is the Chain of Current in the plan that assigned it. It only tells apart
	// chains whose stage boundaries coincide, so it may be left 0 when unknown.
	CurrentChain int
}

// Assignment is one node's part of a plan.
type Assignment struct {
	ID    string
	Range Range // empty when the node serves nothing
	Chain int   // the replica chain the node belongs to; -1 when it serves nothing
}

// Plan assigns contiguous layer ranges to nodes. The nodes of one chain tile [0, Layers)
// exactly, so a request can flow through a chain stage by stage; chains are replicas.
type Plan struct {
	Layers      int
	Replicas    int          // number of chains: every layer is served by at least this many nodes
	Assignments []Assignment // one per input node, sorted by ID
}

// Lookup returns the assignment of node id.
func (p Plan) Lookup(id string) (Assignment, bool) {
	i, ok := slices.BinarySearchFunc(p.Assignments, id, func(a Assignment, id string) int {
		return cmp.Compare(a.ID, id)
	})
	if !ok {
		return Assignment{ID: id, Chain: -1}, false
	}
	return p.Assignments[i], true
}

// Chains returns each replica chain's stages in pipeline order.
func (p Plan) Chains() [][]Assignment {
	chains := make([][]Assignment, p.Replicas)
	for _, a := range p.Assignments {
		if a.Chain >= 0 && a.Chain < len(chains) && !a.Range.Empty() {
			chains[a.Chain] = append(chains[a.Chain], a)
		}
	}
	for _, c := range chains {
		slices.SortFunc(c, func(x, y Assignment) int { return cmp.Compare(x.Range.Start, y.Range.Start) })
	}
	return chains
}

// Coverage returns how many nodes serve each layer.
func (p Plan) Coverage() []int {
	cov := make([]int, p.Layers)
	for _, a := range p.Assignments {
		for l := max(a.Range.Start, 0); l < min(a.Range.End, p.Layers); l++ {
			cov[l]++
		}
	}
	return cov
}

// Moved counts the layers nodes must load to go from their Current ranges to this plan:
// layers a node keeps cost nothing, and dropping layers costs nothing either.
func (p Plan) Moved(nodes []NodeCapacity) int {
	moved := 0
	for _, n := range nodes {
		a, ok := p.Lookup(n.ID)
		if !ok || a.Range.Empty() {
			continue
		}
		moved += a.Range.Len() - overlap(a.Range, n.Current)
	}
	return moved
}

// InsufficientMemoryError reports a swarm that cannot hold one copy of the model.
type InsufficientMemoryError struct {
	Layers          int   // layers in the model
	UncoveredLayers int   // layers no arrangement of the nodes could place
	NeededBytes     int64 // one copy of the model, KV cache included
	AvailableBytes  int64 // what all nodes offer together
	MissingBytes    int64 // at least this much more memory is needed
}

func (e *InsufficientMemoryError) Error() string {
	if e.AvailableBytes >= e.NeededBytes {
		return fmt.Sprintf("not enough memory in the swarm: the model needs %s and the nodes offer %s, "+
			"but in pieces too small for its stages (a layer, the embeddings or the head do not fit); "+
			"about %s more is needed, %d of %d layers have no node",
			HumanBytes(e.NeededBytes), HumanBytes(e.AvailableBytes), HumanBytes(e.MissingBytes),
			e.UncoveredLayers, e.Layers)
	}
	return fmt.Sprintf("not enough memory in the swarm: the model needs %s and the nodes offer %s; "+
		"about %s more is needed, %d of %d layers have no node",
		HumanBytes(e.NeededBytes), HumanBytes(e.AvailableBytes), HumanBytes(e.MissingBytes),
		e.UncoveredLayers, e.Layers)
}

// HumanBytes formats n in binary units (KiB, MiB, GiB, TiB) with one decimal.
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		v /= unit
		if math.Abs(v) < unit || u == "TiB" {
			return fmt.Sprintf("%.1f %s", v, u)
		}
	}
	return "" // unreachable
}

// PlanOption configures PlanLayers.
type PlanOption func(*planConfig)

type planConfig struct {
	maxReplicas int
	tolerance   float64
}

// WithMaxReplicas caps the number of replica chains; 0 (the default) means as many as the
// swarm's memory holds. More chains mean fewer hops per token and survival of node loss;
// fewer chains mean longer pipelines that each hold more free memory.
func WithMaxReplicas(n int) PlanOption { return func(c *planConfig) { c.maxReplicas = n } }

// WithBalanceTolerance sets how much slower than the best balance (as a fraction of the
// slowest stage's time) a chain may be before nodes are moved off their current ranges;
// a stage may also always hold one layer more than its exact share. 0 rebalances as exactly
// as whole layers allow; the default 0.25 (like Petals' balance quality of 0.75) ignores
// speed noise and lets neighbours absorb a leaver's layers without shifting the whole chain.
func WithBalanceTolerance(f float64) PlanOption { return func(c *planConfig) { c.tolerance = f } }

// PlanLayers assigns contiguous layer ranges to nodes. It is a pure function: the same model,
// nodes (in any order) and options give the same plan.
//
// The plan holds as many replica chains as memory allows (each chain's nodes tile every
// layer), gives each node a share of its chain's layers in proportion to its speed within
// its memory, and, among arrangements whose slowest stage is within the balance tolerance
// of the best possible, picks the one that makes nodes load the fewest layers they do not
// already hold (see Plan.Moved). A node may be left without layers when its memory cannot
// hold one layer or its chain does not need it.
func PlanLayers(m ModelShape, nodes []NodeCapacity, opts ...PlanOption) (Plan, error) {
	cfg := planConfig{tolerance: 0.25}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.maxReplicas < 0 {
		return Plan{}, fmt.Errorf("%w: negative max replicas %d", ErrBadPlanInput, cfg.maxReplicas)
	}
	if cfg.tolerance < 0 || math.IsNaN(cfg.tolerance) || math.IsInf(cfg.tolerance, 0) {
		return Plan{}, fmt.Errorf("%w: balance tolerance %v is not a finite fraction >= 0", ErrBadPlanInput, cfg.tolerance)
	}
	if err := m.validate(); err != nil {
		return Plan{}, err
	}
	pl, err := newPlanner(m, nodes, cfg)
	if err != nil {
		return Plan{}, err
	}
	for r := pl.maxChains(); r >= 1; r-- {
		if chains, ok := pl.plan(r); ok {
			return pl.result(chains), nil
		}
	}
	return Plan{}, pl.shortage()
}

// pnode is a node inside the planner.
type pnode struct {
	id        string
	mem       int64
	w         float64 // speed weight: layers per ms
	hint      Range   // Current, when non-empty and inside the model
	hintChain int
	fits      bool // hint fits the node's memory
	// caps[first][last] is the most layers the node holds when its range starts at layer 0
	// (first) and/or ends at the last layer (last); 0 when it cannot hold one.
	caps [2][2]int
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// fitsRange reports whether p's memory holds [a,b) in a model of L layers.
func (p *pnode) fitsRange(a, b, L int) bool {
	return b == a || b-a <= p.caps[b2i(a == 0)][b2i(b == L)]
}

// chain is an ordered replica chain and its ranges (parallel slices).
type chain struct {
	order  []*pnode
	ranges []Range
}

type planner struct {
	m     ModelShape
	L     int
	cfg   planConfig
	all   []*pnode // every node, sorted by ID
	elig  []*pnode // nodes that can hold at least one layer, sorted by ID
	hints bool     // some eligible node's current range fits where it is
}

func newPlanner(m ModelShape, nodes []NodeCapacity, cfg planConfig) (*planner, error) {
	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, func(a, b NodeCapacity) int { return cmp.Compare(a.ID, b.ID) })
	pl := &planner{m: m, L: m.Layers, cfg: cfg}
	worst := m.worstRuns()
	var known []float64
	for i, n := range sorted {
		switch {
		case n.ID == "":
			return nil, fmt.Errorf("%w: node with an empty ID", ErrBadPlanInput)
		case i > 0 && sorted[i-1].ID == n.ID:
			return nil, fmt.Errorf("%w: node %q listed twice", ErrBadPlanInput, n.ID)
		case n.MemoryBytes < 0:
			return nil, fmt.Errorf("%w: node %q offers negative memory %d", ErrBadPlanInput, n.ID, n.MemoryBytes)
		case n.MsPerLayer < 0 || math.IsNaN(n.MsPerLayer) || math.IsInf(n.MsPerLayer, 0):
			return nil, fmt.Errorf("%w: node %q has speed %v ms per layer, want a finite value >= 0", ErrBadPlanInput, n.ID, n.MsPerLayer)
		}
		p := &pnode{id: n.ID, mem: n.MemoryBytes}
		for f := range 2 {
			for l := range 2 {
				if rest := n.MemoryBytes - int64(f)*m.EmbedBytes - int64(l)*m.HeadBytes; rest >= 0 {
					p.caps[f][l] = m.fitLayers(rest, worst)
				}
			}
		}
		// A range from an older plan of another model may lie outside this one: it is
		// ignored rather than refused, because it only guides stability.
		if cur := n.Current; !cur.Empty() && cur.Start >= 0 && cur.End <= pl.L {
			p.hint, p.hintChain = cur, n.CurrentChain
			p.fits = p.fitsRange(cur.Start, cur.End, pl.L)
		}
		if n.MsPerLayer > 0 {
			p.w = 1 / n.MsPerLayer
			known = append(known, p.w)
		}
		pl.all = append(pl.all, p)
		if p.caps[0][0] >= 1 {
			pl.elig = append(pl.elig, p)
			pl.hints = pl.hints || p.fits
		}
	}
	// Nodes not measured yet are assumed typical: the median of the measured ones, or all
	// equal when none is measured (then shares follow memory limits only).
	typical := 1.0
	if len(known) > 0 {
		slices.Sort(known)
		typical = known[len(known)/2]
	}
	for _, p := range pl.all {
		if p.w == 0 {
			p.w = typical
		}
	}
	return pl, nil
}

// maxChains is an upper bound on the replica chains the eligible nodes can form.
func (pl *planner) maxChains() int {
	var layers int64
	for _, p := range pl.elig {
		layers += int64(p.caps[0][0])
	}
	r := int(min(layers/int64(pl.L), int64(len(pl.elig))))
	if pl.cfg.maxReplicas > 0 {
		r = min(r, pl.cfg.maxReplicas)
	}
	return r
}

// plan tries to build r chains, first by repairing the current assignment, then afresh.
func (pl *planner) plan(r int) ([]chain, bool) {
	if pl.hints {
		if chains, ok := pl.stable(r); ok {
			return chains, true
		}
	}
	return pl.fresh(r)
}

func (pl *planner) result(chains []chain) Plan {
	// Chains are numbered by the ID of their first stage so the numbering is stable and
	// independent of how they were found.
	slices.SortFunc(chains, func(a, b chain) int { return cmp.Compare(firstID(a), firstID(b)) })
	got := make(map[*pnode]Assignment)
	for ci, c := range chains {
		for i, p := range c.order {
			if !c.ranges[i].Empty() {
				got[p] = Assignment{ID: p.id, Range: c.ranges[i], Chain: ci}
			}
		}
	}
	out := Plan{Layers: pl.L, Replicas: len(chains), Assignments: make([]Assignment, len(pl.all))}
	for i, p := range pl.all {
		a, ok := got[p]
		if !ok {
			a = Assignment{ID: p.id, Chain: -1}
		}
		out.Assignments[i] = a
	}
	return out
}

func firstID(c chain) string {
	for i, r := range c.ranges {
		if r.Start == 0 && !r.Empty() {
			return c.order[i].id
		}
	}
	return ""
}

func (pl *planner) shortage() error {
	e := &InsufficientMemoryError{Layers: pl.L, NeededBytes: pl.m.TotalBytes()}
	for _, p := range pl.all {
		e.AvailableBytes += p.mem
	}
	best := 0
	for _, order := range pl.orders(pl.elig) {
		best = max(best, pl.reach(order, nil))
	}
	e.UncoveredLayers = pl.L - best
	e.MissingBytes = max(e.NeededBytes-e.AvailableBytes, int64(e.UncoveredLayers)*pl.m.LayerCost())
	return e
}

// fresh partitions the eligible nodes into r chains ignoring where they are now (except as
// a tie-breaking order).
func (pl *planner) fresh(r int) ([]chain, bool) {
	groups, ok := pl.partition(r)
	if !ok {
		return nil, false
	}
	chains := make([]chain, len(groups))
	for i, g := range groups {
		c, ok := pl.arrange(g)
		if !ok {
			return nil, false
		}
		chains[i] = c
	}
	return chains, true
}

// partition splits the eligible nodes into r groups that can each hold the model.
// Largest-first onto the emptiest group balances memory; when that fails, filling one group
// at a time (bin covering) wastes less.
func (pl *planner) partition(r int) ([][]*pnode, bool) {
	bySize := slices.Clone(pl.elig)
	slices.SortStableFunc(bySize, func(a, b *pnode) int { return cmp.Compare(b.caps[0][0], a.caps[0][0]) })

	groups := make([][]*pnode, r)
	sums := make([]int, r)
	for _, p := range bySize {
		g := 0
		for i := range sums {
			if sums[i] < sums[g] {
				g = i
			}
		}
		groups[g] = append(groups[g], p)
		sums[g] += p.caps[0][0]
	}
	if pl.allFeasible(groups) {
		return groups, true
	}

	groups = groups[:0]
	var cur, rest []*pnode
	for _, p := range bySize {
		if len(groups) == r {
			rest = append(rest, p)
			continue
		}
		cur = append(cur, p)
		if pl.feasible(cur) {
			groups = append(groups, cur)
			cur = nil
		}
	}
	if len(groups) < r {
		return nil, false
	}
	rest = append(rest, cur...)
	for _, p := range rest {
		g := pl.slowest(groups)
		groups[g] = append(groups[g], p)
	}
	return groups, true
}

func (pl *planner) allFeasible(groups [][]*pnode) bool {
	for _, g := range groups {
		if !pl.feasible(g) {
			return false
		}
	}
	return true
}

// slowest returns the group with the least total speed (lowest index on ties).
func (pl *planner) slowest(groups [][]*pnode) int {
	best, bestW := 0, math.Inf(1)
	for i, g := range groups {
		w := 0.0
		for _, p := range g {
			w += p.w
		}
		if w < bestW {
			best, bestW = i, w
		}
	}
	return best
}

// feasible reports whether the group can hold the model in some order we try.
func (pl *planner) feasible(g []*pnode) bool {
	for _, o := range pl.orders(g) {
		if pl.reach(o, nil) == pl.L {
			return true
		}
	}
	return false
}

// orders lists the pipeline orders worth trying for a group: by current range (stable),
// and that order with the nodes that lose the fewest layers to the embeddings and the head
// moved to the ends (the order that holds the most), or only one of them moved.
func (pl *planner) orders(g []*pnode) [][]*pnode {
	byHint := slices.Clone(g)
	slices.SortStableFunc(byHint, pl.hintCmp)
	hinted := slices.ContainsFunc(g, func(p *pnode) bool { return !p.hint.Empty() })
	return pl.variants(byHint, hinted)
}

// variants returns order with its best end nodes moved to the ends; when keep is set, also
// order itself and the orders moving only one end, which disturb current ranges less.
func (pl *planner) variants(order []*pnode, keep bool) [][]*pnode {
	if len(order) < 2 {
		return [][]*pnode{order}
	}
	f, l := pl.endPair(order)
	move := func(first, last bool) []*pnode {
		out := make([]*pnode, 0, len(order))
		if first {
			out = append(out, order[f])
		}
		for i, p := range order {
			if !(first && i == f) && !(last && i == l) {
				out = append(out, p)
			}
		}
		if last {
			out = append(out, order[l])
		}
		return out
	}
	both := move(true, true)
	if !keep {
		return [][]*pnode{both}
	}
	out := [][]*pnode{order}
	for _, o := range [][]*pnode{move(false, true), move(true, false), both} {
		if !slices.ContainsFunc(out, func(x []*pnode) bool { return slices.Equal(x, o) }) {
			out = append(out, o)
		}
	}
	return out
}

// endPair picks distinct first and last nodes losing the fewest layers to the embeddings
// and the head. A node that cannot hold a layer beside them loses everything and more.
func (pl *planner) endPair(g []*pnode) (first, last int) {
	loss := func(p *pnode, f, l int) int {
		if p.caps[f][l] == 0 {
			return 2*pl.L + 1
		}
		return p.caps[0][0] - p.caps[f][l]
	}
	// The best two candidates for each end suffice to find the best distinct pair.
	top2 := func(f, l int) [2]int {
		best := [2]int{-1, -1}
		for i, p := range g {
			switch {
			case best[0] < 0 || loss(p, f, l) < loss(g[best[0]], f, l):
				best[1], best[0] = best[0], i
			case best[1] < 0 || loss(p, f, l) < loss(g[best[1]], f, l):
				best[1] = i
			}
		}
		return best
	}
	fs, ls := top2(1, 0), top2(0, 1)
	bestLoss := math.MaxInt
	for _, f := range fs {
		for _, l := range ls {
			if f < 0 || l < 0 || f == l {
				continue
			}
			if x := loss(g[f], 1, 0) + loss(g[l], 0, 1); x < bestLoss {
				first, last, bestLoss = f, l, x
			}
		}
	}
	return first, last
}

// hintCmp orders nodes by current range, nodes without one last, then by ID.
func (pl *planner) hintCmp(a, b *pnode) int {
	key := func(p *pnode) (int, int) {
		if p.hint.Empty() {
			return pl.L, pl.L
		}
		return p.hint.Start, p.hint.End
	}
	as, ae := key(a)
	bs, be := key(b)
	return cmp.Or(cmp.Compare(as, bs), cmp.Compare(ae, be), cmp.Compare(a.id, b.id))
}

// arrange balances g in the order among candidates that costs least.
func (pl *planner) arrange(g []*pnode) (chain, bool) {
	return pl.best(pl.orders(g))
}

// best solves each order and keeps the cheapest (earliest on ties).
func (pl *planner) best(orders [][]*pnode) (chain, bool) {
	var bc chain
	var bcost cost
	found := false
	for _, o := range orders {
		if c, cst, ok := pl.solve(o); ok && (!found || cst.less(bcost)) {
			bc, bcost, found = c, cst, true
		}
	}
	return bc, found
}

// stable keeps nodes in the chains their current ranges form and repairs those chains:
// nodes that left leave gaps their neighbours fill, new nodes join the chain that needs
// memory most (or is slowest), and only when that cannot make r chains does the caller
// fall back to a fresh partition.
func (pl *planner) stable(r int) ([]chain, bool) {
	// Rebuild the chains from current ranges: each range extends the track whose end is
	// the latest one at or before its start (interval partitioning, best fit).
	var placed []*pnode
	for _, p := range pl.elig {
		if p.fits {
			placed = append(placed, p)
		}
	}
	slices.SortStableFunc(placed, pl.hintCmp)
	var tracks [][]*pnode
	var ends []int
	for _, p := range placed {
		best := -1
		for t, e := range ends {
			if e > p.hint.Start || best >= 0 && e < ends[best] {
				continue
			}
			// Chains whose boundaries coincide are told apart by their old chain number.
			if best < 0 || e > ends[best] || p.hintChain == tracks[t][len(tracks[t])-1].hintChain &&
				p.hintChain != tracks[best][len(tracks[best])-1].hintChain {
				best = t
			}
		}
		if best < 0 {
			tracks = append(tracks, nil)
			ends = append(ends, 0)
			best = len(tracks) - 1
		}
		tracks[best] = append(tracks[best], p)
		ends[best] = p.hint.End
	}
	if len(tracks) > r {
		// Keep the r tracks with the most memory; the others' nodes are redistributed.
		idx := make([]int, len(tracks))
		for i := range idx {
			idx[i] = i
		}
		mem := func(t []*pnode) (s int64) {
			for _, p := range t {
				s += p.mem
			}
			return s
		}
		slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(mem(tracks[b]), mem(tracks[a])) })
		idx = idx[:r]
		slices.Sort(idx)
		kept := make([][]*pnode, 0, r)
		for _, i := range idx {
			kept = append(kept, tracks[i])
		}
		tracks = kept
	}
	for len(tracks) < r {
		tracks = append(tracks, nil)
	}
	in := make(map[*pnode]bool)
	for _, t := range tracks {
		for _, p := range t {
			in[p] = true
		}
	}
	var loose []*pnode
	for _, p := range pl.elig {
		if !in[p] {
			loose = append(loose, p)
		}
	}
	slices.SortStableFunc(loose, func(a, b *pnode) int { return cmp.Compare(b.mem, a.mem) })
	need := pl.m.TotalBytes()
	for _, p := range loose {
		g, deficit := -1, int64(0)
		for i, t := range tracks {
			var have int64
			for _, q := range t {
				have += q.mem
			}
			if d := need - have; d > deficit {
				g, deficit = i, d
			}
		}
		if g < 0 {
			g = pl.slowest(tracks)
		}
		tracks[g] = append(tracks[g], p)
	}

	chains := make([]chain, r)
	ok := make([]bool, r)
	for i, t := range tracks {
		chains[i], ok[i] = pl.arrangeStable(t)
	}
	// A chain that lost too much memory takes a node a sibling chain can spare: the one
	// whose move loads the fewest layers, preferring moves that make the chain whole.
	for moves := 0; ; moves++ {
		g := slices.Index(ok, false)
		if g < 0 {
			return chains, true
		}
		if moves == len(pl.elig) {
			return nil, false
		}
		type steal struct {
			p        *pnode
			from     int
			whole    bool
			moved    int
			gc, fc   chain
			gok, fok bool
		}
		var best *steal
		for h, t := range tracks {
			if h == g || !ok[h] || len(t) < 2 {
				continue
			}
			for _, p := range t {
				fc, fok := pl.arrangeStable(without(t, p))
				if !fok {
					continue
				}
				gc, gok := pl.arrangeStable(append(slices.Clone(tracks[g]), p))
				s := &steal{p: p, from: h, whole: gok, moved: chainMoved(fc), gc: gc, fc: fc, gok: gok, fok: fok}
				if gok {
					s.moved += chainMoved(gc)
				}
				if best == nil || s.whole && !best.whole || s.whole == best.whole &&
					(s.moved < best.moved || s.moved == best.moved && p.mem > best.p.mem) {
					best = s
				}
			}
		}
		if best == nil {
			return nil, false
		}
		tracks[best.from] = without(tracks[best.from], best.p)
		tracks[g] = append(tracks[g], best.p)
		chains[best.from], ok[best.from] = best.fc, best.fok
		chains[g], ok[g] = best.gc, best.gok
	}
}

// chainMoved counts the layers the chain's nodes must load.
func chainMoved(c chain) int {
	n := 0
	for i, p := range c.order {
		n += c.ranges[i].Len() - overlap(c.ranges[i], p.hint)
	}
	return n
}

func without(g []*pnode, p *pnode) []*pnode {
	out := make([]*pnode, 0, len(g))
	for _, q := range g {
		if q != p {
			out = append(out, q)
		}
	}
	return out
}

// maxTrials bounds the insertion positions tried for a new node in a long chain.
const maxTrials = 17

// arrangeStable orders a group by its members' current ranges, places members without one
// into the chain's largest gaps (where nodes left) or else where they cost the fewest moved
// layers, and balances it.
func (pl *planner) arrangeStable(g []*pnode) (chain, bool) {
	var order, newcomers []*pnode
	for _, p := range g {
		if p.hint.Empty() {
			newcomers = append(newcomers, p)
		} else {
			order = append(order, p)
		}
	}
	if len(order) == 0 {
		return pl.arrange(g)
	}
	slices.SortStableFunc(order, pl.hintCmp)
	slices.SortFunc(newcomers, func(a, b *pnode) int { return cmp.Compare(a.id, b.id) })

	// Gaps in the chain's current coverage, largest first.
	cov := make([]bool, pl.L)
	for _, p := range order {
		for l := p.hint.Start; l < p.hint.End; l++ {
			cov[l] = true
		}
	}
	var gaps []Range
	for l := 0; l < pl.L; {
		if cov[l] {
			l++
			continue
		}
		s := l
		for l < pl.L && !cov[l] {
			l++
		}
		gaps = append(gaps, Range{s, l})
	}
	slices.SortStableFunc(gaps, func(a, b Range) int { return cmp.Compare(b.Len(), a.Len()) })
	for len(newcomers) > 0 && len(gaps) > 0 {
		gap, p := gaps[0], newcomers[0]
		gaps, newcomers = gaps[1:], newcomers[1:]
		at := 0
		for at < len(order) && (order[at].hint.Empty() || order[at].hint.Start < gap.Start) {
			at++
		}
		order = slices.Insert(order, at, p)
	}
	for _, p := range newcomers {
		best, bestAt := cost{moved: -1}, len(order)
		for _, at := range trialPositions(len(order)) {
			_, cst, ok := pl.solve(slices.Insert(slices.Clone(order), at, p))
			if ok && (best.moved < 0 || cst.less(best)) {
				best, bestAt = cst, at
			}
		}
		order = slices.Insert(order, bestAt, p)
	}
	if c, ok := pl.best(pl.variants(order, true)); ok {
		return c, true
	}
	return pl.arrange(g)
}

func trialPositions(n int) []int {
	if n+1 <= maxTrials {
		pos := make([]int, n+1)
		for i := range pos {
			pos[i] = i
		}
		return pos
	}
	pos := make([]int, 0, maxTrials)
	for i := range maxTrials {
		pos = append(pos, i*n/(maxTrials-1))
	}
	return slices.Compact(pos)
}

// cost ranks arrangements: fewest layers loaded by nodes that serve now (which disrupts
// their chain), then the smoothest speed balance (sum of layers²/speed is least when layers
// are proportional to speed), then the fewest layers loaded by nodes that serve nothing
// yet. So a joining node takes its fair share from its neighbours, who only drop layers.
type cost struct {
	moved int
	sq    float64
	fresh int
}

func (a cost) less(b cost) bool {
	if a.moved != b.moved {
		return a.moved < b.moved
	}
	if a.sq != b.sq {
		return a.sq < b.sq
	}
	return a.fresh < b.fresh
}

func overlap(a, b Range) int { return max(0, min(a.End, b.End)-max(a.Start, b.Start)) }

// floorLayers turns a time budget into whole layers, forgiving float rounding.
func floorLayers(x float64, L int) int {
	if x >= float64(L) {
		return L
	}
	return int(math.Floor(x + 1e-9))
}

// reach returns the furthest layer b such that the nodes of order, in that order, can tile
// [0,b), each holding at most limit(i) layers (nil: no limit beyond memory).
func (pl *planner) reach(order []*pnode, limit func(i int) int) int {
	L := pl.L
	cur, next := make([]bool, L+1), make([]bool, L+1)
	cur[0] = true
	for i, p := range order {
		lim := p.caps[0][0]
		if limit != nil {
			lim = min(lim, limit(i))
		}
		for b := 0; b <= L; b++ {
			next[b] = cur[b]
			for a := b - 1; !next[b] && a >= 0 && b-a <= lim; a-- {
				next[b] = cur[a] && p.fitsRange(a, b, L)
			}
		}
		cur, next = next, cur
	}
	for b := L; b > 0; b-- {
		if cur[b] {
			return b
		}
	}
	return 0
}

// solve balances a chain in a fixed order. It finds the smallest possible time of the
// slowest stage (layers × ms per layer) T*, then among tilings where no stage exceeds
// T*·(1+tolerance) picks the one of least cost.
func (pl *planner) solve(order []*pnode) (chain, cost, bool) {
	L := pl.L
	if len(order) == 0 || pl.reach(order, nil) < L {
		return chain{}, cost{}, false
	}
	var ts []float64
	for _, p := range order {
		for n := 1; n <= p.caps[0][0]; n++ {
			ts = append(ts, float64(n)/p.w)
		}
	}
	slices.Sort(ts)
	ts = slices.Compact(ts)
	limitAt := func(t float64) func(int) int {
		return func(i int) int { return floorLayers(t*order[i].w, L) }
	}
	i := sort.Search(len(ts), func(i int) bool { return pl.reach(order, limitAt(ts[i])) == L })
	if i == len(ts) {
		return chain{}, cost{}, false // cannot happen: the largest candidate is no limit at all
	}
	// One layer of slack on top of the tolerance keeps rounding from moving layers back
	// and forth in short chains.
	limit := func(j int) int {
		return max(limitAt(ts[i]*(1+pl.cfg.tolerance))(j), limitAt(ts[i])(j)+1)
	}

	// best[i][b]: least cost for the first i nodes to tile [0,b); from[i][b]: where node i-1 starts.
	k := len(order)
	inf := cost{moved: math.MaxInt}
	best := make([][]cost, k+1)
	from := make([][]int, k+1)
	for i := range best {
		best[i] = make([]cost, L+1)
		from[i] = make([]int, L+1)
		for b := range best[i] {
			best[i][b] = inf
		}
	}
	best[0][0] = cost{}
	for i, p := range order {
		lim := min(p.caps[0][0], limit(i))
		for b := 0; b <= L; b++ {
			for a := b; a >= 0 && b-a <= lim; a-- {
				prev := best[i][a]
				if prev.moved == math.MaxInt || !p.fitsRange(a, b, L) {
					continue
				}
				n := b - a
				c := cost{moved: prev.moved, sq: prev.sq + float64(n*n)/p.w, fresh: prev.fresh}
				if p.hint.Empty() {
					c.fresh += n
				} else {
					c.moved += n - overlap(Range{a, b}, p.hint)
				}
				if c.less(best[i+1][b]) {
					best[i+1][b], from[i+1][b] = c, a
				}
			}
		}
	}
	if best[k][L].moved == math.MaxInt {
		return chain{}, cost{}, false
	}
	ranges := make([]Range, k)
	for i, b := k, L; i > 0; i-- {
		a := from[i][b]
		if a < b {
			ranges[i-1] = Range{a, b}
		}
		b = a
	}
	return chain{order: order, ranges: ranges}, best[k][L], true
}
