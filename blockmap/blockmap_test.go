package blockmap

import (
	"maps"
	"math/rand/v2"
	"testing"
)

type block struct {
	parent    uint64
	hasParent bool
}

// A Map against the runtime's map: random inserts (refused when present),
// sets, deletions and clears, over hashes that crowd the table (small
// ranges, runs that wrap around its end) and that do not; with every seed
// (0 included, where the mixing alone spreads the hashes).
func TestMatchesMap(t *testing.T) {
	for _, span := range []uint64{8, 100, 5000, 1 << 62} {
		for _, seed := range []uint64{0, 1, ^uint64(0), rand.Uint64()} {
			rng := rand.New(rand.NewPCG(span, seed))
			m := Map[block]{seed: seed}
			if seed == 0 {
				m = Map[block]{} // the zero value picks its own
			}
			ref := map[uint64]block{}
			for op := range 20000 {
				h := rng.Uint64N(span)
				b := block{}
				if rng.IntN(2) == 0 {
					b = block{parent: rng.Uint64(), hasParent: true}
				}
				switch r := rng.IntN(100); {
				case r < 30:
					_, had := ref[h]
					if m.Insert(h, b) == had {
						t.Fatalf("span %d op %d: Insert(%d) with it held %v", span, op, h, had)
					}
					if !had {
						ref[h] = b
					}
				case r < 55:
					m.Set(h, b)
					ref[h] = b
				case r < 99:
					m.Delete(h)
					delete(ref, h)
				default:
					m.Clear()
					clear(ref)
				}
				if m.Len() != len(ref) {
					t.Fatalf("span %d op %d: Len %d, want %d", span, op, m.Len(), len(ref))
				}
				got, ok := m.Get(h)
				want, wok := ref[h]
				if ok != wok || got != want {
					t.Fatalf("span %d op %d: Get(%d) = %v %v, want %v %v", span, op, h, got, ok, want, wok)
				}
				if op%1000 == 0 {
					all := map[uint64]block{}
					m.Each(func(h uint64, b block) { all[h] = b })
					if !maps.Equal(all, ref) {
						t.Fatalf("span %d op %d: %v, want %v", span, op, all, ref)
					}
				}
			}
		}
	}
	var empty Map[int32]
	empty.Delete(1)
	empty.Clear()
	empty.Each(func(uint64, int32) { t.Fatal("an empty map has a hash") })
	if _, ok := empty.Get(1); ok || empty.Len() != 0 {
		t.Fatal("an empty map is not empty")
	}
}

// Hashes chosen to share their home slot in a map of one seed spread out
// in a map of another: prompts cannot be chosen to pile blocks up without
// knowing the seed.
func TestSeedSpreadsChosenHashes(t *testing.T) {
	a := Map[int32]{seed: 1}
	a.reserve()
	mask := uint64(1<<12 - 1)
	var chosen []uint64
	for h := uint64(0); len(chosen) < 200; h++ {
		if a.home(h, mask) == 7 {
			chosen = append(chosen, h)
		}
	}
	b := Map[int32]{seed: 2}
	homes := map[uint64]bool{}
	for _, h := range chosen {
		homes[b.home(h, mask)] = true
	}
	if len(homes) < 150 {
		t.Fatalf("200 hashes sharing a home under one seed share %d homes under another", len(homes))
	}
}

// Steady churn allocates nothing once the table grew.
func TestSteadyStateAllocations(t *testing.T) {
	var m Map[block]
	next := uint64(0)
	cycle := func() {
		for range 1000 {
			m.Set(next*0x9e3779b97f4a7c15, block{parent: next, hasParent: true})
			if next >= 512 {
				m.Delete((next - 512) * 0x9e3779b97f4a7c15)
			}
			next++
		}
	}
	cycle()
	if n := testing.AllocsPerRun(10, cycle); n != 0 {
		t.Fatalf("%v allocations per 1,000 sets and deletions", n)
	}
	if m.Len() != 512 {
		t.Fatalf("%d hashes, want 512", m.Len())
	}
}
