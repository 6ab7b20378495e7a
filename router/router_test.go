package router_test

import (
	"container/list"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
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
	var walked []uint64
	ix.BlocksOf("w", func(h uint64) bool { walked = append(walked, h); return true })
	if slices.Sort(walked); !slices.Equal(walked, []uint64{7, 8}) {
		t.Fatalf("BlocksOf walked %v, want 7 and 8", walked)
	}
	walked = walked[:0]
	ix.BlocksOf("w", func(h uint64) bool { walked = append(walked, h); return false })
	ix.BlocksOf("nobody", func(uint64) bool { t.Fatal("a block of an unknown worker"); return false })
	if len(walked) != 1 {
		t.Fatalf("BlocksOf went on after false: %v", walked)
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

// refIndex is the index's semantics written plainly (the original
// implementation): maps of maps and a container/list LRU.
type refIndex struct {
	max                int
	blocks             map[uint64]map[string]*list.Element
	workers            map[string]*refWorker
	lru                *list.List
	pruned, duplicates uint64
}

type refEntry struct {
	hash   uint64
	worker string
}

type refWorker struct {
	last   uint64
	hashes map[uint64]bool
}

func newRef(max int) *refIndex {
	return &refIndex{max: max, blocks: map[uint64]map[string]*list.Element{}, workers: map[string]*refWorker{}, lru: list.New()}
}

func (r *refIndex) worker(id string) *refWorker {
	w := r.workers[id]
	if w == nil {
		w = &refWorker{hashes: map[uint64]bool{}}
		r.workers[id] = w
	}
	return w
}

func (r *refIndex) apply(worker string, ev engine.KVEvent) *router.Gap {
	w := r.worker(worker)
	if ev.ID <= w.last {
		r.duplicates++
		return nil
	}
	var gap *router.Gap
	if ev.ID > w.last+1 {
		gap = &router.Gap{Worker: worker, From: w.last + 1, To: ev.ID - 1}
	}
	w.last = ev.ID
	r.kind(worker, ev)
	return gap
}

func (r *refIndex) kind(worker string, ev engine.KVEvent) {
	r.worker(worker)
	switch ev.Kind {
	case engine.KVStored:
		r.store(worker, ev.Hash)
	case engine.KVRemoved:
		r.remove(worker, ev.Hash)
	case engine.KVCleared:
		r.drop(worker)
	}
}

func (r *refIndex) store(worker string, h uint64) {
	ws := r.blocks[h]
	if ws == nil {
		ws = map[string]*list.Element{}
		r.blocks[h] = ws
	}
	if el, ok := ws[worker]; ok {
		r.lru.MoveToBack(el)
		return
	}
	ws[worker] = r.lru.PushBack(refEntry{h, worker})
	r.worker(worker).hashes[h] = true
	for r.lru.Len() > r.max {
		e := r.lru.Front().Value.(refEntry)
		r.remove(e.worker, e.hash)
		r.pruned++
	}
}

func (r *refIndex) remove(worker string, h uint64) {
	ws := r.blocks[h]
	el, ok := ws[worker]
	if !ok {
		return
	}
	r.lru.Remove(el)
	delete(ws, worker)
	if len(ws) == 0 {
		delete(r.blocks, h)
	}
	delete(r.workers[worker].hashes, h)
}

func (r *refIndex) drop(worker string) {
	if w := r.workers[worker]; w != nil {
		for h := range w.hashes {
			r.remove(worker, h)
		}
	}
}

func (r *refIndex) overlap(hashes []uint64) map[string]int {
	out := map[string]int{}
	for w := range r.workers {
		n := 0
		for _, h := range hashes {
			if _, ok := r.blocks[h][w]; !ok {
				break
			}
			n++
		}
		if n > 0 {
			out[w] = n
		}
	}
	return out
}

// The index against the reference model under random events: gaps,
// duplicates, repairs, clears, resets, removed workers, pruning, and more
// than 64 workers (the holders past the first 64 slots take another path).
func TestIndexMatchesReference(t *testing.T) {
	for _, tc := range []struct {
		name            string
		workers, hashes int
		max, ops        int
		seed            uint64
	}{
		{"few workers, tight bound", 6, 30, 40, 20_000, 1},
		{"few workers, loose bound", 8, 200, 10_000, 20_000, 2},
		{"64 workers", 64, 60, 300, 30_000, 3},
		{"100 workers", 100, 50, 400, 30_000, 4},
		{"one entry", 3, 5, 1, 5_000, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(tc.seed, 9))
			ix, ref := router.NewIndex(tc.max), newRef(tc.max)
			names := make([]string, tc.workers)
			for i := range names {
				names[i] = fmt.Sprintf("w%d", i)
			}
			next := map[string]uint64{}
			// Hashes near each other and far apart, to exercise probing.
			hash := func() uint64 {
				k := uint64(rng.IntN(tc.hashes))
				if k%3 == 0 {
					return k << 40
				}
				return k
			}
			check := func(op int) {
				t.Helper()
				if ix.Len() != ref.lru.Len() || ix.Pruned != ref.pruned || ix.Duplicates != ref.duplicates {
					t.Fatalf("op %d: len %d pruned %d dups %d, want %d %d %d", op, ix.Len(), ix.Pruned, ix.Duplicates,
						ref.lru.Len(), ref.pruned, ref.duplicates)
				}
			}
			for op := range tc.ops {
				w := names[rng.IntN(len(names))]
				switch r := rng.IntN(100); {
				case r < 80: // an event, usually the next one
					id := next[w] + 1
					switch rng.IntN(20) {
					case 0:
						id += uint64(1 + rng.IntN(3)) // a gap
					case 1:
						id = uint64(rng.IntN(int(id))) // a duplicate (or id 0)
					}
					next[w] = max(next[w], id)
					ev := engine.KVEvent{ID: id, Kind: engine.KVStored, Hash: hash()}
					switch k := rng.IntN(100); {
					case k < 35:
						ev.Kind = engine.KVRemoved
					case k < 36:
						ev = engine.KVEvent{ID: id, Kind: engine.KVCleared}
					}
					g1, g2 := ix.Apply(w, ev), ref.apply(w, ev)
					if (g1 == nil) != (g2 == nil) || (g1 != nil && *g1 != *g2) {
						t.Fatalf("op %d: gap %v, want %v", op, g1, g2)
					}
				case r < 90:
					ev := engine.KVEvent{ID: uint64(1 + rng.IntN(5)), Kind: engine.KVStored, Hash: hash()}
					if rng.IntN(2) == 0 {
						ev.Kind = engine.KVRemoved
					}
					ix.ApplyRepair(w, ev)
					ref.kind(w, ev)
				case r < 95:
					hs := make([]uint64, rng.IntN(12))
					for i := range hs {
						hs[i] = hash()
					}
					last := uint64(rng.IntN(50))
					ix.Reset(w, hs, last)
					ref.drop(w)
					ref.worker(w).last = last
					for _, h := range hs {
						ref.store(w, h)
					}
				case r < 97:
					ix.RemoveWorker(w)
					ref.drop(w)
					delete(ref.workers, w)
					delete(next, w)
				default:
					// A query: a prefix some worker holds, then noise.
					var q []uint64
					if hs := ix.Blocks(w); len(hs) > 0 {
						for h := range hs {
							q = append(q, h)
						}
						slices.Sort(q)
						rng.Shuffle(len(q), func(a, b int) { q[a], q[b] = q[b], q[a] })
					}
					for range rng.IntN(4) {
						q = append(q, hash())
					}
					if got, want := ix.Overlap(q), ref.overlap(q); !maps.Equal(got, want) {
						t.Fatalf("op %d: overlap of %v = %v, want %v", op, q, got, want)
					}
					cands := []router.Candidate{{ID: w}, {ID: "stranger", Overlap: 7}}
					for _, n := range names[:min(len(names), 5)] {
						if n != w {
							cands = append(cands, router.Candidate{ID: n})
						}
					}
					want := ref.overlap(q)
					with := ix.WithOverlap(q, cands)
					for _, c := range with {
						if c.Overlap != want[c.ID] {
							t.Fatalf("op %d: WithOverlap %s = %d, want %d", op, c.ID, c.Overlap, want[c.ID])
						}
					}
					if cands[1].Overlap != 7 {
						t.Fatalf("op %d: WithOverlap changed its argument", op)
					}
					if ix.SetOverlap(q, cands); !slices.Equal(cands, with) {
						t.Fatalf("op %d: SetOverlap %v, WithOverlap %v", op, cands, with)
					}
				}
				check(op)
				if op%500 == 0 || op == tc.ops-1 {
					for _, n := range append(names, "never") {
						rw := ref.workers[n]
						var last uint64
						want := map[uint64]bool{}
						if rw != nil {
							last, want = rw.last, rw.hashes
						}
						if ix.LastEvent(n) != last || !maps.Equal(ix.Blocks(n), want) {
							t.Fatalf("op %d: %s: last %d blocks %v, want %d %v", op, n, ix.LastEvent(n), ix.Blocks(n), last, want)
						}
					}
				}
			}
			if ix.Pruned == 0 && tc.max < 1000 {
				t.Fatal("the bound never pruned")
			}
		})
	}
}

// Steady-state ingestion and decisions allocate nothing (bar WithOverlap's
// copy of the candidates; SetOverlap fills them in place).
func TestIndexSteadyStateAllocations(t *testing.T) {
	ix := router.NewIndex(1000)
	id := uint64(0)
	cycle := func() {
		for k := range uint64(2000) {
			id++
			ix.Apply("a", stored(id, k%1500, 0))
			id++
			ix.Apply("a", engine.KVEvent{ID: id, Kind: engine.KVRemoved, Hash: (k + 700) % 1500})
		}
	}
	cycle()
	if n := testing.AllocsPerRun(5, cycle); n != 0 {
		t.Fatalf("%v allocations per 4,000 events", n)
	}
	q := []uint64{1, 2, 3, 4, 5}
	cands := []router.Candidate{{ID: "a"}, {ID: "b"}}
	if n := testing.AllocsPerRun(100, func() { ix.WithOverlap(q, cands) }); n > 1 {
		t.Fatalf("WithOverlap: %v allocations", n)
	}
	if n := testing.AllocsPerRun(100, func() { ix.SetOverlap(q, cands) }); n != 0 {
		t.Fatalf("SetOverlap: %v allocations", n)
	}
}

// The kv cost: the defaults, the charge for waiting requests and the tie
// break.
func TestChooseCost(t *testing.T) {
	req := router.Request{Blocks: 10}
	cost := func(d router.Decision, id string) float64 {
		for _, s := range d.Candidates {
			if s.ID == id {
				return s.Cost
			}
		}
		t.Fatalf("%s not scored", id)
		return 0
	}
	cands := []router.Candidate{
		{ID: "a", Active: 3, Waiting: 2, BlocksUsed: 40, Overlap: 4},
		{ID: "b", Active: 1, BlocksUsed: 10},
	}
	d, _ := router.Choose(router.PolicyKV, router.Params{}, req, cands, 0, 0)
	// a: 8 x (6 + 6 x 2) + 40 = 184; b: 8 x 10 + 10 = 90.
	if cost(d, "a") != 184 || cost(d, "b") != 90 || d.Worker != "b" {
		t.Fatalf("default costs %+v", d)
	}
	d, _ = router.Choose(router.PolicyKV, router.Params{OverlapWeight: 1, WaitingPrefill: -1}, req, cands, 0, 0)
	if cost(d, "a") != 46 || cost(d, "b") != 20 {
		t.Fatalf("weight 1, no waiting charge: %+v", d)
	}
	d, _ = router.Choose(router.PolicyKV, router.Params{OverlapWeight: 2, WaitingPrefill: 1}, req, cands, 0, 0)
	if cost(d, "a") != 56 || cost(d, "b") != 30 {
		t.Fatalf("weight 2, waiting prefill 1: %+v", d)
	}
	// A burst: requests just sent to a worker wait in its queue and hold
	// no blocks, so without the charge the same worker stays cheapest.
	burst := []router.Candidate{{ID: "a", Overlap: 1}, {ID: "b", Overlap: 1}, {ID: "c", Overlap: 1}}
	seen := map[string]int{}
	for range 6 {
		d, _ := router.Choose(router.PolicyKV, router.Params{}, req, burst, 0, 0)
		seen[d.Worker]++
		for i := range burst {
			if burst[i].ID == d.Worker {
				burst[i].Active++
				burst[i].Waiting++
			}
		}
	}
	if seen["a"] != 2 || seen["b"] != 2 || seen["c"] != 2 {
		t.Fatalf("a burst of 6 over 3 idle workers went %v", seen)
	}
	// Equal costs: the fewest active requests wins, then the first id.
	tie := []router.Candidate{{ID: "c", Active: 1}, {ID: "b", Active: 2}, {ID: "a", Active: 1}}
	if d, _ := router.Choose(router.PolicyKV, router.Params{WaitingPrefill: -1}, req, tie, 0, 0); d.Worker != "a" {
		t.Fatalf("tie went to %s", d.Worker)
	}
	tie[2].Active = 3
	if d, _ := router.Choose(router.PolicyKV, router.Params{WaitingPrefill: -1}, req, tie, 0, 0); d.Worker != "c" {
		t.Fatalf("tie went to %s", d.Worker)
	}
	// Choose is pure: the order of the candidates does not matter.
	for range 20 {
		rand.Shuffle(len(cands), func(i, j int) { cands[i], cands[j] = cands[j], cands[i] })
		if d, _ := router.Choose(router.PolicyKV, router.Params{Temperature: 0.5}, req, cands, 0, 0.3); d.Worker != "b" {
			t.Fatalf("order changed the decision: %+v", d)
		}
	}
}
