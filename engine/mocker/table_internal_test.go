package mocker

import (
	"maps"
	"math/rand/v2"
	"testing"
)

// blockTable against a map: random inserts (refused when present),
// lookups and deletions, over hashes that collide in the table and that do
// not.
func TestBlockTableMatchesMap(t *testing.T) {
	for _, span := range []uint64{8, 100, 5000, 1 << 62} {
		rng := rand.New(rand.NewPCG(span, 3))
		var tb blockTable
		ref := map[uint64]int32{}
		for op := range 20000 {
			h := rng.Uint64N(span)
			if rng.IntN(100) < 55 {
				b := int32(rng.IntN(1000))
				_, had := ref[h]
				if tb.insert(h, b) == had {
					t.Fatalf("span %d op %d: insert(%d) when present %v", span, op, h, had)
				}
				if !had {
					ref[h] = b
				}
			} else {
				tb.del(h)
				delete(ref, h)
			}
			if tb.len() != len(ref) {
				t.Fatalf("span %d op %d: len %d, want %d", span, op, tb.len(), len(ref))
			}
			got, ok := tb.get(h)
			want, wok := ref[h]
			if ok != wok || (ok && got != want) {
				t.Fatalf("span %d op %d: get(%d) = %d %v, want %d %v", span, op, h, got, ok, want, wok)
			}
			if op%1000 == 0 {
				m := map[uint64]int32{}
				tb.each(func(h uint64, b int32) { m[h] = b })
				if !maps.Equal(m, ref) {
					t.Fatalf("span %d op %d: %v, want %v", span, op, m, ref)
				}
			}
		}
	}
	var empty blockTable
	empty.del(1)
	if _, ok := empty.get(1); ok || empty.len() != 0 {
		t.Fatal("an empty table is not empty")
	}
}
