package router_test

import (
	"testing"

	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/router"
)

func TestCommandCarriesTheShellsView(t *testing.T) {
	cands := []router.Candidate{
		{ID: "a", Active: 2, Waiting: 1, BlocksUsed: 10, BlocksTotal: 100, Overlap: 3, PendingPrefill: 4},
		{ID: "b", BlocksTotal: 100},
	}
	p := router.Params{OverlapWeight: 2, Temperature: 0.5, WaitingPrefill: 3}
	c := routerm.Command("req-1", router.PolicyKV, p, []uint64{7, 8, 9}, cands)
	if c.RequestId != "req-1" || c.Policy != "kv" || c.Blocks != 3 || c.FirstHash != 7 ||
		c.OverlapWeight != 2 || c.Temperature != 0.5 || c.WaitingPrefill != 3 || len(c.Candidates) != 2 {
		t.Fatalf("command %v", c)
	}
	a := c.Candidates[0]
	if a.Worker != "a" || a.Active != 2 || a.Waiting != 1 || a.BlocksUsed != 10 || a.BlocksTotal != 100 || a.Overlap != 3 || a.PendingPrefill != 4 {
		t.Fatalf("candidate %v", a)
	}
	if c.Candidates[1].Worker != "b" {
		t.Fatalf("second candidate %v", c.Candidates[1])
	}
	// More candidates than the command has room for beside it.
	var many []router.Candidate
	for i := range 20 {
		many = append(many, router.Candidate{ID: string(rune('a' + i)), Active: i})
	}
	m := routerm.Command("req-3", router.PolicyKV, p, []uint64{1}, many)
	if len(m.Candidates) != 20 {
		t.Fatalf("%d candidates, want 20", len(m.Candidates))
	}
	for i, c := range m.Candidates {
		if c.Worker != many[i].ID || int(c.Active) != i {
			t.Fatalf("candidate %d: %v", i, c)
		}
	}
	// No prompt blocks: no first hash, and the actor refuses no candidates.
	if e := routerm.Command("req-2", router.PolicyKV, p, nil, nil); e.FirstHash != 0 || e.Blocks != 0 || len(e.Candidates) != 0 {
		t.Fatalf("empty command %v", e)
	}
}
