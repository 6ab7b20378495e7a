package kvevents

import (
	"maps"
	"math/rand/v2"
	"testing"
)

// blockSet against a map: random stores, replacements, removals and
// clears, over hashes that collide in the table (small ranges) and that do
// not.
func TestBlockSetMatchesMap(t *testing.T) {
	for _, span := range []uint64{8, 100, 5000, 1 << 62} {
		rng := rand.New(rand.NewPCG(span, 1))
		var s blockSet
		ref := map[uint64]Block{}
		for op := range 20000 {
			h := rng.Uint64N(span)
			switch r := rng.IntN(100); {
			case r < 55:
				b := Block{}
				if rng.IntN(2) == 0 {
					b = Block{Parent: rng.Uint64(), HasParent: true}
				}
				s.set(h, b)
				ref[h] = b
			case r < 99:
				s.del(h)
				delete(ref, h)
			default:
				s.clear()
				clear(ref)
			}
			if s.len() != len(ref) {
				t.Fatalf("span %d op %d: len %d, want %d", span, op, s.len(), len(ref))
			}
			got, ok := s.get(h)
			want, wok := ref[h]
			if ok != wok || got != want {
				t.Fatalf("span %d op %d: get(%d) = %v %v, want %v %v", span, op, h, got, ok, want, wok)
			}
			if op%1000 == 0 {
				if m := s.toMap(); !maps.Equal(m, ref) {
					t.Fatalf("span %d op %d: %v, want %v", span, op, m, ref)
				}
				for k, v := range ref {
					if b, ok := s.get(k); !ok || b != v {
						t.Fatalf("span %d op %d: get(%d) = %v %v, want %v", span, op, k, b, ok, v)
					}
				}
			}
		}
	}
	var empty blockSet
	empty.del(3)
	empty.clear()
	if _, ok := empty.get(3); ok || empty.len() != 0 || len(empty.toMap()) != 0 {
		t.Fatal("an empty set is not empty")
	}
}

// Steady churn of a worker's blocks allocates nothing once the table grew.
func TestBlockSetSteadyStateAllocations(t *testing.T) {
	var s blockSet
	next := uint64(0)
	cycle := func() {
		for range 1000 {
			s.set(next*0x9e3779b97f4a7c15, Block{Parent: next, HasParent: true})
			if next >= 512 {
				s.del((next - 512) * 0x9e3779b97f4a7c15)
			}
			next++
		}
	}
	cycle()
	if n := testing.AllocsPerRun(10, cycle); n != 0 {
		t.Fatalf("%v allocations per 1,000 stores and removals", n)
	}
	if s.len() != 512 {
		t.Fatalf("%d blocks, want 512", s.len())
	}
}
