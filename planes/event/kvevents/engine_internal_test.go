package kvevents

import (
	"math/rand/v2"
	"testing"

	"github.com/triplane-dev/triplane/engine"
)

// countRuns counts what FromEngine makes, for random iterations' events:
// chains, broken chains, removals, clears, runs past MaxHashesPerEvent.
func TestCountRunsMatchesFromEngine(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for iter := range 3000 {
		var evs []engine.KVEvent
		var last uint64
		n := rng.IntN(12)
		if iter%100 == 0 {
			n = MaxHashesPerEvent + 1 + rng.IntN(3000) // long runs split
		}
		for range n {
			switch r := rng.IntN(20); {
			case r < 12:
				parent := last
				if rng.IntN(4) == 0 {
					parent = rng.Uint64N(4) // a new prompt, or a broken chain
				}
				last = rng.Uint64() | 1
				evs = append(evs, engine.KVEvent{Kind: engine.KVStored, Hash: last, Parent: parent})
			case r < 18:
				evs = append(evs, engine.KVEvent{Kind: engine.KVRemoved, Hash: rng.Uint64()})
			case r < 19:
				evs = append(evs, engine.KVEvent{Kind: engine.KVCleared})
			default:
				evs = append(evs, engine.KVEvent{Kind: engine.KVEventKind(9)}) // unknown: skipped
			}
		}
		if iter%100 == 0 {
			// One long chain, then one long run of removals.
			evs = evs[:0]
			for i := range 2*MaxHashesPerEvent + 5 {
				evs = append(evs, engine.KVEvent{Kind: engine.KVStored, Hash: uint64(i + 1), Parent: uint64(i)})
			}
			for i := range MaxHashesPerEvent + 2 {
				evs = append(evs, engine.KVEvent{Kind: engine.KVRemoved, Hash: uint64(i + 1)})
			}
		}
		out := FromEngine(evs)
		stored := 0
		for _, e := range out {
			if e.GetStored() != nil {
				stored++
			}
		}
		events, storedRuns := countRuns(evs)
		if events != len(out) || storedRuns != stored {
			t.Fatalf("iteration %d: counted %d events (%d stored), FromEngine made %d (%d stored)", iter, events, storedRuns, len(out), stored)
		}
		if len(out) > 0 && cap(out) != len(out) {
			t.Fatalf("iteration %d: the list has room for %d events, %d made", iter, cap(out), len(out))
		}
	}
}
