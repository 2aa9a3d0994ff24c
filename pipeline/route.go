package pipeline

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"slices"
	"strings"

	"github.com/strata-llm/strata/shard"
)

// Candidate is a node serving a range of layers, as membership sees it.
type Candidate struct {
	ID         string   // peer ID
	Addrs      []string // multiaddrs to dial it at
	Range      shard.Range
	MsPerLayer float64 // measured ms per layer per token; 0: unknown
	Sessions   int     // sessions it is running now
}

// hopMs is what one more hop costs in the route score: a loopback or LAN round trip plus the
// activation's serialization, so a route with fewer stages wins between equals.
const hopMs = 1.0

// ErrNoRoute means the live nodes do not cover every layer.
var ErrNoRoute = errors.New("no route through the swarm")

// ChooseRoute picks stages that chain from layer 0 to the last layer with the lowest expected
// time per token: layers times the node's speed, slowed by the sessions it already runs, plus
// a cost per hop. Equal replicas are told apart by a hash of the session, so sessions spread
// over them. avoid, if not nil, excludes nodes (ones that just failed).
func ChooseRoute(cands []Candidate, layers int, session uint64, avoid func(id string) bool) ([]Candidate, error) {
	var usable []Candidate
	for _, c := range cands {
		if c.Range.Empty() || c.Range.Start < 0 || c.Range.End > layers || (avoid != nil && avoid(c.ID)) {
			continue
		}
		usable = append(usable, c)
	}
	// Shortest path over layer boundaries 0..layers; every stage is an edge Start -> End.
	cost := make([]float64, layers+1)
	prev := make([]int, layers+1)
	for i := range cost {
		cost[i], prev[i] = math.Inf(1), -1
	}
	cost[0] = 0
	slices.SortFunc(usable, func(a, b Candidate) int { return a.Range.Start - b.Range.Start })
	for i, c := range usable {
		if math.IsInf(cost[c.Range.Start], 1) {
			continue
		}
		cc := cost[c.Range.Start] + edgeCost(c, session)
		if cc < cost[c.Range.End] {
			cost[c.Range.End], prev[c.Range.End] = cc, i
		}
	}
	if math.IsInf(cost[layers], 1) {
		return nil, noRouteError(usable, layers)
	}
	var route []Candidate
	for b := layers; b > 0; {
		c := usable[prev[b]]
		route = append(route, c)
		b = c.Range.Start
	}
	slices.Reverse(route)
	return route, nil
}

func edgeCost(c Candidate, session uint64) float64 {
	ms := c.MsPerLayer
	if ms <= 0 {
		ms = 1
	}
	load := 1 + 0.5*float64(c.Sessions)
	h := fnv.New64a()
	fmt.Fprintf(h, "%d/%s", session, c.ID)
	jitter := float64(h.Sum64()%1000) / 1e6 // breaks ties between equal replicas per session
	return float64(c.Range.Len())*ms*load + hopMs + jitter
}

// noRouteError names the layers no live node serves, or where the served ranges fail to line up.
func noRouteError(cands []Candidate, layers int) error {
	covered := make([]bool, layers)
	for _, c := range cands {
		for l := c.Range.Start; l < c.Range.End; l++ {
			covered[l] = true
		}
	}
	var gaps []string
	for l := 0; l < layers; {
		if covered[l] {
			l++
			continue
		}
		end := l
		for end < layers && !covered[end] {
			end++
		}
		gaps = append(gaps, shard.Range{Start: l, End: end}.String())
		l = end
	}
	if len(gaps) > 0 {
		return fmt.Errorf("%w: layers %s are served by no live node (of %d layers)", ErrNoRoute, strings.Join(gaps, ", "), layers)
	}
	return fmt.Errorf("%w: every layer is served, but the served ranges do not chain from layer 0 to %d", ErrNoRoute, layers)
}
