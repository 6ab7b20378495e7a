package bench_test

import (
	"context"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/workload"
)

// chatTrace is a small trace shaped like the Mooncake conversation trace:
// every prompt starts with the shared block 0, a conversation's next turn
// repeats its previous prompt and answer and adds a question, and new
// conversations keep starting.
func chatTrace(n int) []workload.Record {
	rng := rand.New(rand.NewPCG(3, 4))
	type conv struct{ ids []int64 }
	var convs []*conv
	next := int64(1)
	fresh := func(k int) []int64 {
		out := make([]int64, k)
		for i := range out {
			out[i], next = next, next+1
		}
		return out
	}
	var recs []workload.Record
	ts := int64(0)
	for range n {
		ts += int64(rng.IntN(400))
		var c *conv
		if len(convs) > 0 && rng.IntN(3) > 0 {
			c = convs[rng.IntN(len(convs))]
		}
		if c == nil || len(c.ids) > 12 {
			c = &conv{ids: append([]int64{0}, fresh(1+rng.IntN(3))...)}
			convs = append(convs, c)
		} else {
			c.ids = append(c.ids, fresh(1+rng.IntN(2))...)
		}
		ids := append([]int64(nil), c.ids...)
		recs = append(recs, workload.Record{Timestamp: ts, InputLength: len(ids) * workload.TraceBlockSize,
			OutputLength: 4 + rng.IntN(28), HashIDs: ids})
	}
	return recs
}

func TestRouteSane(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := bench.RouteConfig{Records: chatTrace(300), Workers: 4, BlocksPerWorker: 96, Policies: router.Policies, Seed: 1}
	start := time.Now()
	a, err := bench.Route(ctx, cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replayed %d policies in %s", len(a), time.Since(start))
	var out strings.Builder
	bench.PrintRoute(&out, "small", a)
	t.Log("\n" + out.String())
	if len(a) != len(router.Policies) {
		t.Fatalf("%d results for %d policies", len(a), len(router.Policies))
	}
	byPolicy := map[router.Policy]bench.RouteResult{}
	for _, r := range a {
		byPolicy[r.Policy] = r
		if r.Requests+r.Rejected != 300 || r.Rejected != 0 {
			t.Errorf("%s: %d admitted, %d rejected of 300", r.Policy, r.Requests, r.Rejected)
		}
		if r.HitRatio() > r.Ceiling() {
			t.Errorf("%s: hit ratio %.3f above the infinite cache's %.3f", r.Policy, r.HitRatio(), r.Ceiling())
		}
		// A time to first token cannot exceed the whole simulated span.
		if r.Simulated <= 0 || r.Steps == 0 || r.TTFTp50 <= 0 || r.TTFTp99 > r.Simulated {
			t.Errorf("%s: implausible %+v", r.Policy, r)
		}
	}
	kv, rr := byPolicy[router.PolicyKV], byPolicy[router.PolicyRoundRobin]
	if kv.HitRatio() <= rr.HitRatio() {
		t.Errorf("kv hit ratio %.3f not above round-robin's %.3f", kv.HitRatio(), rr.HitRatio())
	}
	if kv.Ceiling() <= 0.3 {
		t.Errorf("the synthetic trace should share prefixes: ceiling %.3f", kv.Ceiling())
	}

	// Deterministic: a second run gives the same results, bar the wall time.
	b, err := bench.Route(ctx, cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for i := range a {
		x, y := a[i], b[i]
		x.Wall, y.Wall = 0, 0
		if !equalResults(x, y) {
			t.Errorf("%s: two runs differ:\n%+v\n%+v", x.Policy, x, y)
		}
	}
}

func equalResults(a, b bench.RouteResult) bool {
	if len(a.PrefillTokens) != len(b.PrefillTokens) {
		return false
	}
	for i := range a.PrefillTokens {
		if a.PrefillTokens[i] != b.PrefillTokens[i] {
			return false
		}
	}
	a.PrefillTokens, b.PrefillTokens = nil, nil
	return a.Policy == b.Policy && a.Requests == b.Requests && a.Rejected == b.Rejected &&
		a.PromptBlocks == b.PromptBlocks && a.HitBlocks == b.HitBlocks && a.RouterBlocks == b.RouterBlocks &&
		a.CeilingBlocks == b.CeilingBlocks && a.TTFTp50 == b.TTFTp50 && a.TTFTp99 == b.TTFTp99 &&
		a.Simulated == b.Simulated && a.Steps == b.Steps
}

// Routing with load reports and flights, as a frontend does, is
// deterministic too, and kv still finds more cached prefixes than
// round-robin.
func TestRouteWithLoadReports(t *testing.T) {
	cfg := bench.RouteConfig{Records: chatTrace(300), Workers: 4, BlocksPerWorker: 96, Seed: 1,
		Policies: []router.Policy{router.PolicyKV, router.PolicyRoundRobin}, LoadInterval: 500 * time.Millisecond}
	a, err := bench.Route(context.Background(), cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	b, err := bench.Route(context.Background(), cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for i := range a {
		a[i].Wall, b[i].Wall = 0, 0
		if !equalResults(a[i], b[i]) {
			t.Errorf("%s: two runs differ:\n%+v\n%+v", a[i].Policy, a[i], b[i])
		}
		if a[i].Requests != 300 {
			t.Errorf("%s: %d admitted of 300", a[i].Policy, a[i].Requests)
		}
	}
	if a[0].HitRatio() <= a[1].HitRatio() {
		t.Errorf("kv hit ratio %.3f not above round-robin's %.3f", a[0].HitRatio(), a[1].HitRatio())
	}
	// The reports are what kv routes by: with exact loads it decides
	// differently (round-robin reads no load and does not change).
	cfg.LoadInterval = 0
	exact, err := bench.Route(context.Background(), cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	exact[0].Wall, exact[1].Wall = 0, 0
	if equalResults(exact[0], a[0]) || !equalResults(exact[1], a[1]) {
		t.Errorf("kv with reports %+v\nkv with exact loads %+v\nround-robin %+v / %+v", a[0], exact[0], a[1], exact[1])
	}
}

// The ceiling counts a block when an earlier request had the same prefix of
// hash ids, not merely the same id.
func TestRouteCeiling(t *testing.T) {
	rec := func(ts int64, ids ...int64) workload.Record {
		return workload.Record{Timestamp: ts, InputLength: len(ids) * 512, OutputLength: 4, HashIDs: ids}
	}
	recs := []workload.Record{rec(0, 1, 2, 3), rec(10, 1, 2, 4), rec(20, 5, 2), rec(30, 1, 2, 3, 6)}
	rs, err := bench.Route(context.Background(), bench.RouteConfig{Records: recs, Workers: 2, BlocksPerWorker: 16,
		Policies: []router.Policy{router.PolicyKV}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r := rs[0]; r.CeilingBlocks != 5 || r.PromptBlocks != 12 {
		t.Fatalf("ceiling %d of %d blocks, want 5 of 12", r.CeilingBlocks, r.PromptBlocks)
	}
}

func TestRouteRefusesBadConfigs(t *testing.T) {
	recs := chatTrace(5)
	for name, cfg := range map[string]bench.RouteConfig{
		"no records":     {Workers: 2, BlocksPerWorker: 16, Policies: router.Policies},
		"no workers":     {Records: recs, BlocksPerWorker: 16, Policies: router.Policies},
		"no blocks":      {Records: recs, Workers: 2, Policies: router.Policies},
		"no policy":      {Records: recs, Workers: 2, BlocksPerWorker: 16},
		"unknown policy": {Records: recs, Workers: 2, BlocksPerWorker: 16, Policies: []router.Policy{"fastest"}},
		"bad speed-up":   {Records: recs, Workers: 2, BlocksPerWorker: 16, Policies: router.Policies, SpeedUp: -1},
		"bad interval":   {Records: recs, Workers: 2, BlocksPerWorker: 16, Policies: router.Policies, LoadInterval: -time.Second},
		"bad record": {Records: []workload.Record{{InputLength: 1000, OutputLength: 1, HashIDs: []int64{1}}},
			Workers: 2, BlocksPerWorker: 16, Policies: router.Policies},
	} {
		if _, err := bench.Route(context.Background(), cfg, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
