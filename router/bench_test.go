package router_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/router"
)

// The benchmarks run against an index at a realistic steady state: 64
// workers holding 15,625 blocks each (1,000,000 indexed blocks), filled by
// the KV events of requests that share prefixes as a chat workload does:
// every prompt starts with one of a few system prompts, continues with a
// conversation's earlier turns (each conversation has a home worker and
// lands elsewhere a quarter of the time, so hot prefixes sit on several
// workers) and ends with fresh blocks. A worker that is full evicts its
// oldest block first (a Removed event), as an engine's LRU does.

const (
	benchWorkers   = 64
	benchPerWorker = 15_625 // 64 x 15,625 = 1,000,000 blocks
	systemPrompts  = 8
	systemBlocks   = 4
	conversations  = 50_000
	convBlocks     = 26
)

type workerEvent struct {
	worker int
	ev     engine.KVEvent
}

// kvGen emits the KV events of a cluster of engines serving such prompts.
type kvGen struct {
	rng    *rand.Rand
	names  []string
	nextID []uint64
	held   []map[uint64]struct{}
	ring   [][]uint64 // each worker's blocks, oldest first from head
	head   []int
	system [][]uint64 // chained hashes of the system prompts
	fresh  uint64
}

func newKVGen(seed uint64) *kvGen {
	g := &kvGen{rng: rand.New(rand.NewPCG(seed, 1)), fresh: 1 << 40}
	for w := range benchWorkers {
		g.names = append(g.names, fmt.Sprintf("w%02d", w))
		g.nextID = append(g.nextID, 1)
		g.held = append(g.held, make(map[uint64]struct{}, benchPerWorker))
		g.ring = append(g.ring, make([]uint64, 0, benchPerWorker))
		g.head = append(g.head, 0)
	}
	for s := range systemPrompts {
		g.system = append(g.system, chain(0, uint64(s)<<32, systemBlocks))
	}
	return g
}

// chain returns n chained hashes after parent, derived from seed.
func chain(parent, seed uint64, n int) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		parent = mix(parent ^ mix(seed+uint64(i)+1))
		out[i] = parent
	}
	return out
}

func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// prompt returns the block hashes of a prompt of conversation c: its system
// prompt, its first turns blocks of history, then tail fresh blocks.
func (g *kvGen) prompt(c, turns, tail int) []uint64 {
	sys := g.system[c%systemPrompts]
	conv := chain(sys[len(sys)-1], uint64(c+1)<<20, turns)
	out := append(slices.Clone(sys), conv...)
	if tail > 0 {
		g.fresh++
		out = append(out, chain(out[len(out)-1], g.fresh<<8, tail)...)
	}
	return out
}

// request emits the events of one request on its worker: a Stored event
// for every block the worker does not hold, after a Removed event for its
// oldest block when it is full.
func (g *kvGen) request(out []workerEvent) []workerEvent {
	c := g.rng.IntN(conversations)
	w := c % benchWorkers
	if g.rng.IntN(4) == 0 {
		w = g.rng.IntN(benchWorkers)
	}
	hashes := g.prompt(c, 1+g.rng.IntN(convBlocks), g.rng.IntN(5))
	for i, h := range hashes {
		if _, ok := g.held[w][h]; ok {
			continue
		}
		if len(g.held[w]) == benchPerWorker {
			old := g.ring[w][g.head[w]]
			g.head[w] = (g.head[w] + 1) % benchPerWorker
			delete(g.held[w], old)
			out = append(out, workerEvent{w, engine.KVEvent{ID: g.nextID[w], Kind: engine.KVRemoved, Hash: old}})
			g.nextID[w]++
			g.ring[w][(g.head[w]+benchPerWorker-1)%benchPerWorker] = h
		} else {
			g.ring[w] = append(g.ring[w], h)
		}
		g.held[w][h] = struct{}{}
		var parent uint64
		if i > 0 {
			parent = hashes[i-1]
		}
		out = append(out, workerEvent{w, engine.KVEvent{ID: g.nextID[w], Kind: engine.KVStored, Hash: h, Parent: parent}})
		g.nextID[w]++
	}
	return out
}

// events returns at least n events, whole requests.
func (g *kvGen) events(n int) []workerEvent {
	out := make([]workerEvent, 0, n+64)
	for len(out) < n {
		out = g.request(out)
	}
	return out
}

// cluster is the generator with an index (and a plain map, the baseline)
// fed up to 1,000,000 blocks; built once and shared by the benchmarks,
// which keep feeding it in order.
type cluster struct {
	gen  *kvGen
	ix   *router.Index
	flat map[flatKey]struct{}
}

type flatKey struct {
	worker int
	hash   uint64
}

var (
	clusterOnce sync.Once
	theCluster  *cluster
)

func warmCluster(b *testing.B) *cluster {
	b.Helper()
	clusterOnce.Do(func() {
		c := &cluster{gen: newKVGen(42), ix: router.NewIndex(benchWorkers*benchPerWorker + 1),
			flat: make(map[flatKey]struct{}, benchWorkers*benchPerWorker)}
		for c.ix.Len() < benchWorkers*benchPerWorker {
			c.apply(c.gen.events(100_000))
		}
		theCluster = c
	})
	if theCluster.ix.Pruned != 0 {
		b.Fatalf("the index pruned %d blocks: the workload outgrew it", theCluster.ix.Pruned)
	}
	return theCluster
}

func (c *cluster) apply(evs []workerEvent) {
	for _, e := range evs {
		if gap := c.ix.Apply(c.gen.names[e.worker], e.ev); gap != nil {
			panic(gap)
		}
		c.applyFlat(e)
	}
}

func (c *cluster) applyFlat(e workerEvent) {
	k := flatKey{e.worker, e.ev.Hash}
	if e.ev.Kind == engine.KVStored {
		c.flat[k] = struct{}{}
	} else {
		delete(c.flat, k)
	}
}

// BenchmarkIngest measures KV events applied to an index holding 1,000,000
// blocks over 64 workers, on one goroutine: the events of whole requests,
// a Removed before each Stored once a worker is full. The baseline applies
// the same events to a plain Go map keyed by (worker, hash), as large,
// in the same run.
func BenchmarkIngest(b *testing.B) {
	c := warmCluster(b)
	evs := c.gen.events(b.N)
	names := c.gen.names
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		e := &evs[i]
		c.ix.Apply(names[e.worker], e.ev)
	}
	b.StopTimer()
	elapsed := b.Elapsed()
	start := time.Now()
	for i := range b.N {
		c.applyFlat(evs[i])
	}
	base := time.Since(start)
	c.apply(evs[b.N:]) // the rest of the last request, untimed
	rate := float64(b.N) / elapsed.Seconds()
	baseRate := float64(b.N) / base.Seconds()
	b.ReportMetric(rate, "events/s")
	b.ReportMetric(baseRate, "map-events/s")
	b.ReportMetric(rate/baseRate, "x-map")
}

// BenchmarkDecision measures one routing decision against the same index
// (1,000,000 blocks, 64 workers): Index.WithOverlap for a prompt of about
// 30 blocks (a system prompt, a conversation's history that some workers
// hold, a few new blocks) and Choose with the kv policy, timed one by one
// for p50 and p99. The baseline, timed in the same loop, is the bare
// Index.Overlap call on the same prompt.
func BenchmarkDecision(b *testing.B) {
	c := warmCluster(b)
	rng := rand.New(rand.NewPCG(7, 7))
	const prompts = 4096
	reqs := make([][]uint64, prompts)
	for i := range reqs {
		reqs[i] = c.gen.prompt(rng.IntN(conversations), convBlocks, 2) // 4 + 26 + 2 = 32 blocks
	}
	cands := make([]router.Candidate, benchWorkers)
	for w := range cands {
		// Up to 16 running requests of about 30 blocks each.
		active := rng.IntN(17)
		cands[w] = router.Candidate{ID: c.gen.names[w], Active: active, BlocksUsed: active*30 + rng.IntN(30), BlocksTotal: benchPerWorker}
	}
	dec := make([]time.Duration, 0, b.N)
	bare := make([]time.Duration, 0, b.N)
	var overlap, best, matched int
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		hashes := reqs[i%prompts]
		t0 := time.Now()
		d, err := router.Choose(router.PolicyKV, router.Params{}, router.RequestOf(hashes), c.ix.WithOverlap(hashes, cands), uint64(i), 0.5)
		t1 := time.Now()
		ov := c.ix.Overlap(hashes)
		t2 := time.Now()
		if err != nil {
			b.Fatal(err)
		}
		overlap += d.Overlap
		matched += len(ov)
		most := 0
		for _, n := range ov {
			most = max(most, n)
		}
		best += most
		dec = append(dec, t1.Sub(t0))
		bare = append(bare, t2.Sub(t1))
	}
	b.StopTimer()
	slices.Sort(dec)
	slices.Sort(bare)
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	p := func(s []time.Duration, q float64) time.Duration { return s[min(int(q*float64(len(s))), len(s)-1)] }
	b.ReportMetric(us(p(dec, 0.50)), "p50-us")
	b.ReportMetric(us(p(dec, 0.99)), "p99-us")
	b.ReportMetric(us(p(bare, 0.50)), "overlap-p50-us")
	b.ReportMetric(us(p(bare, 0.99)), "overlap-p99-us")
	b.ReportMetric(float64(p(dec, 0.99))/float64(max(p(bare, 0.99), 1)), "p99-x-overlap")
	b.ReportMetric(float64(overlap)/float64(b.N), "chosen-overlap")
	b.ReportMetric(float64(best)/float64(b.N), "best-overlap")
	b.ReportMetric(float64(matched)/float64(b.N), "workers-matched")
}
