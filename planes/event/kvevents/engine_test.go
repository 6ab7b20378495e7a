package kvevents_test

import (
	"testing"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

func TestFromEngineGroupsChainsAndRemovals(t *testing.T) {
	evs := []engine.KVEvent{
		{Kind: engine.KVStored, Hash: 1}, {Kind: engine.KVStored, Hash: 2, Parent: 1}, {Kind: engine.KVStored, Hash: 3, Parent: 2},
		{Kind: engine.KVStored, Hash: 9, Parent: 7}, // another chain
		{Kind: engine.KVRemoved, Hash: 4}, {Kind: engine.KVRemoved, Hash: 5},
		{Kind: engine.KVEventKind(99), Hash: 6}, // unknown: ignored
		{Kind: engine.KVCleared},
	}
	out := kvevents.FromEngine(evs)
	if len(out) != 4 {
		t.Fatalf("%d events, want 4: %v", len(out), out)
	}
	if s := out[0].GetStored(); len(s.BlockHashes) != 3 || s.ParentHash != nil {
		t.Fatalf("first chain: %v", s)
	}
	if s := out[1].GetStored(); len(s.BlockHashes) != 1 || s.GetParentHash() != 7 {
		t.Fatalf("second chain: %v", s)
	}
	if r := out[2].GetRemoved(); len(r.BlockHashes) != 2 || out[3].GetCleared() == nil {
		t.Fatalf("removals and clear: %v", out[2:])
	}
	if kvevents.FromEngine(nil) != nil {
		t.Fatal("no events should give none")
	}
	// A long chain is split, still chained.
	long := make([]engine.KVEvent, kvevents.MaxHashesPerEvent+3)
	for i := range long {
		long[i] = engine.KVEvent{Kind: engine.KVStored, Hash: uint64(i + 1), Parent: uint64(i)}
	}
	out = kvevents.FromEngine(long)
	if len(out) != 2 || len(out[0].GetStored().BlockHashes) != kvevents.MaxHashesPerEvent ||
		out[1].GetStored().GetParentHash() != uint64(kvevents.MaxHashesPerEvent) {
		t.Fatalf("split: %d events", len(out))
	}
}
