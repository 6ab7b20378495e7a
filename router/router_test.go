package router_test

import (
	"math/rand/v2"
	"testing"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/router"
)

func stored(id, hash, parent uint64) engine.KVEvent {
	return engine.KVEvent{ID: id, Kind: engine.KVStored, Hash: hash, Parent: parent}
}

func TestOverlapIsAPrefix(t *testing.T) {
	ix := router.NewIndex(0)
	ix.Apply("w1", stored(1, 10, 0))
	ix.Apply("w1", stored(2, 11, 10))
	ix.Apply("w1", stored(3, 12, 11))
	ix.Apply("w2", stored(1, 10, 0))
	ix.Apply("w2", stored(2, 12, 11)) // holds block 3 but not block 2
	got := ix.Overlap([]uint64{10, 11, 12, 13})
	if got["w1"] != 3 || got["w2"] != 1 {
		t.Fatalf("overlap = %v, want w1:3 w2:1", got)
	}
}

func TestGapsDuplicatesAndReset(t *testing.T) {
	ix := router.NewIndex(0)
	if g := ix.Apply("w", stored(1, 1, 0)); g != nil {
		t.Fatalf("first event: gap %v", g)
	}
	g := ix.Apply("w", stored(5, 5, 0))
	if g == nil || g.From != 2 || g.To != 4 {
		t.Fatalf("gap = %v, want 2..4", g)
	}
	if ix.Apply("w", stored(3, 3, 0)); ix.Duplicates != 1 {
		t.Fatalf("late event not counted as duplicate")
	}
	ix.ApplyRepair("w", stored(3, 3, 0))
	if !ix.Blocks("w")[3] || ix.LastEvent("w") != 5 {
		t.Fatalf("repair: blocks %v last %d", ix.Blocks("w"), ix.LastEvent("w"))
	}
	ix.Reset("w", []uint64{7, 8}, 9)
	if b := ix.Blocks("w"); len(b) != 2 || !b[7] || ix.LastEvent("w") != 9 {
		t.Fatalf("after reset: %v", b)
	}
	ix.RemoveWorker("w")
	if ix.Len() != 0 || len(ix.Overlap([]uint64{7})) != 0 {
		t.Fatal("removed worker still indexed")
	}
}

func TestBoundedWithPruningCounted(t *testing.T) {
	ix := router.NewIndex(100)
	for i := range uint64(250) {
		ix.Apply("w", stored(i+1, i+1000, 0))
	}
	if ix.Len() != 100 || ix.Pruned != 150 {
		t.Fatalf("len %d pruned %d, want 100 and 150", ix.Len(), ix.Pruned)
	}
	if !ix.Blocks("w")[1249] || ix.Blocks("w")[1000] {
		t.Fatal("pruning should drop the oldest entries")
	}
}

// The index fed by an engine's events (shuffled, some dropped, then
// repaired from the engine's truth) converges to the engine's cache.
func TestConvergesToEngineTruth(t *testing.T) {
	e, err := mocker.New(mocker.Config{BlockSize: 16, NumBlocks: 40})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ix := router.NewIndex(0)
	var gaps []router.Gap
	all := map[uint64]engine.KVEvent{}
	for i := range 30 {
		toks := make([]uint32, 40+rng.IntN(60))
		for k := range toks {
			toks[k] = uint32(rng.IntN(3) * 7) // few distinct prompts: shared prefixes
			if k > 20 {
				toks[k] = uint32(i*100 + k)
			}
		}
		_ = e.Add(engine.Request{ID: string(rune('A' + i)), Tokens: toks, MaxTokens: 5})
		var evs []engine.KVEvent
		for !e.Idle() {
			evs = append(evs, e.Step().Events...)
		}
		for _, ev := range evs {
			all[ev.ID] = ev
		}
		rng.Shuffle(len(evs), func(a, b int) { evs[a], evs[b] = evs[b], evs[a] })
		for _, ev := range evs {
			if rng.IntN(5) == 0 {
				continue // dropped on the way
			}
			if g := ix.Apply("w", ev); g != nil {
				gaps = append(gaps, *g)
			}
		}
	}
	// Shuffled delivery means the index applied some events out of order;
	// the robust repair is the full dump.
	truth := e.Cached()
	hashes := make([]uint64, 0, len(truth))
	for h := range truth {
		hashes = append(hashes, h)
	}
	ix.Reset("w", hashes, ix.LastEvent("w"))
	got := ix.Blocks("w")
	if len(got) != len(truth) {
		t.Fatalf("index %d blocks, engine %d", len(got), len(truth))
	}
	if len(gaps) == 0 {
		t.Fatal("dropping events should have produced gaps")
	}
}

func TestChoose(t *testing.T) {
	ix := router.NewIndex(0)
	for i, h := range []uint64{1, 2, 3, 4} {
		ix.Apply("hot", stored(uint64(i+1), h, 0))
	}
	hashes := []uint64{1, 2, 3, 4, 5, 6}
	req := router.RequestOf(hashes)
	cands := ix.WithOverlap(hashes, []router.Candidate{{ID: "hot", BlocksUsed: 2}, {ID: "cold", BlocksUsed: 0}})
	d, err := router.Choose(router.PolicyKV, router.Params{}, req, cands, 0, 0.5)
	if err != nil || d.Worker != "hot" || d.Overlap != 4 || len(d.Candidates) != 2 {
		t.Fatalf("kv decision %+v %v", d, err)
	}
	// A heavily loaded worker loses despite the overlap.
	cands[0].BlocksUsed = 100
	if d, _ := router.Choose(router.PolicyKV, router.Params{}, req, cands, 0, 0.5); d.Worker != "cold" {
		t.Fatalf("loaded worker chosen: %+v", d)
	}
	if d, _ := router.Choose(router.PolicyLeastLoaded, router.Params{}, req, cands, 0, 0); d.Worker != "cold" {
		t.Fatalf("least-loaded: %+v", d)
	}
	a, _ := router.Choose(router.PolicyRoundRobin, router.Params{}, req, cands, 0, 0)
	b, _ := router.Choose(router.PolicyRoundRobin, router.Params{}, req, cands, 1, 0)
	if a.Worker == b.Worker {
		t.Fatal("round-robin repeated a worker")
	}
	p1, _ := router.Choose(router.PolicyPrefixHash, router.Params{}, req, cands, 0, 0)
	p2, _ := router.Choose(router.PolicyPrefixHash, router.Params{}, req, cands, 7, 0.9)
	if p1.Worker != p2.Worker {
		t.Fatal("prefix-hash is not stable")
	}
	// Temperature samples, reproducibly from the draw.
	seen := map[string]bool{}
	for i := range 20 {
		d, _ := router.Choose(router.PolicyKV, router.Params{Temperature: 1}, req, cands, 0, float64(i)/20)
		seen[d.Worker] = true
	}
	if len(seen) != 2 {
		t.Fatalf("temperature 1 should sometimes pick either worker: %v", seen)
	}
	if _, err := router.Choose(router.PolicyKV, router.Params{}, req, nil, 0, 0); err == nil {
		t.Fatal("no candidates accepted")
	}
	if _, err := router.ParsePolicy("fastest"); err == nil {
		t.Fatal("unknown policy accepted")
	}
}
