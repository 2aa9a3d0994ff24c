package pipeline

import (
	"errors"
	"strings"
	"testing"

	"github.com/strata-llm/strata/shard"
)

func r(a, b int) shard.Range { return shard.Range{Start: a, End: b} }

func ids(route []Candidate) string {
	var s []string
	for _, c := range route {
		s = append(s, c.ID)
	}
	return strings.Join(s, ",")
}

func TestChooseRouteChains(t *testing.T) {
	cands := []Candidate{{ID: "c", Range: r(8, 12)}, {ID: "a", Range: r(0, 4)}, {ID: "b", Range: r(4, 8)}}
	route, err := ChooseRoute(cands, 12, 1, nil)
	if err != nil || ids(route) != "a,b,c" {
		t.Fatalf("route %q, %v", ids(route), err)
	}
}

func TestChooseRoutePrefersFastAndIdle(t *testing.T) {
	cands := []Candidate{
		{ID: "slow", Range: r(0, 6), MsPerLayer: 5},
		{ID: "fast", Range: r(0, 6), MsPerLayer: 1},
		{ID: "busy", Range: r(6, 12), MsPerLayer: 1, Sessions: 8},
		{ID: "idle", Range: r(6, 12), MsPerLayer: 1},
	}
	route, err := ChooseRoute(cands, 12, 1, nil)
	if err != nil || ids(route) != "fast,idle" {
		t.Fatalf("route %q, %v", ids(route), err)
	}
	// Fewer hops win between otherwise equal routes.
	cands = []Candidate{{ID: "x", Range: r(0, 6)}, {ID: "y", Range: r(6, 12)}, {ID: "whole", Range: r(0, 12)}}
	if route, _ = ChooseRoute(cands, 12, 1, nil); ids(route) != "whole" {
		t.Fatalf("route %q, want the single stage", ids(route))
	}
}

func TestChooseRouteSpreadsSessionsOverReplicas(t *testing.T) {
	cands := []Candidate{{ID: "a1", Range: r(0, 6)}, {ID: "a2", Range: r(0, 6)}, {ID: "b1", Range: r(6, 12)}, {ID: "b2", Range: r(6, 12)}}
	seen := map[string]int{}
	for s := uint64(0); s < 200; s++ {
		route, err := ChooseRoute(cands, 12, s, nil)
		if err != nil {
			t.Fatal(err)
		}
		seen[ids(route)]++
	}
	if len(seen) != 4 {
		t.Fatalf("200 sessions used routes %v, want all 4 combinations", seen)
	}
}

func TestChooseRouteAvoidsAndExplains(t *testing.T) {
	cands := []Candidate{{ID: "a", Range: r(0, 4)}, {ID: "b", Range: r(4, 8)}, {ID: "b2", Range: r(4, 8)}, {ID: "c", Range: r(8, 12)}}
	route, err := ChooseRoute(cands, 12, 1, func(id string) bool { return id == "b" })
	if err != nil || ids(route) != "a,b2,c" {
		t.Fatalf("route %q, %v", ids(route), err)
	}
	_, err = ChooseRoute(cands, 12, 1, func(id string) bool { return strings.HasPrefix(id, "b") })
	if !errors.Is(err, ErrNoRoute) || !strings.Contains(err.Error(), "layers [4,8) are served by no live node") {
		t.Fatalf("error %v", err)
	}
	_, err = ChooseRoute([]Candidate{{ID: "a", Range: r(0, 5)}, {ID: "b", Range: r(4, 12)}}, 12, 1, nil)
	if !errors.Is(err, ErrNoRoute) || !strings.Contains(err.Error(), "do not chain") {
		t.Fatalf("error %v", err)
	}
}
