package router_test

import (
	"maps"
	"slices"
	"testing"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

func kvStored(id uint64, parent *uint64, hashes ...uint64) *triplanev1.KvEvent {
	return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: hashes, ParentHash: parent}}}
}

func TestApplyKvEventChainsRemovalsAndClears(t *testing.T) {
	ix := router.NewIndex(1024)
	blocks := func() []uint64 { return slices.Sorted(maps.Keys(ix.Blocks("w"))) }
	ix.ApplyKvEvent("w", kvStored(1, nil, 10, 11, 12))
	p := uint64(12)
	ix.ApplyKvEvent("w", kvStored(2, &p, 13))
	if got := blocks(); !slices.Equal(got, []uint64{10, 11, 12, 13}) {
		t.Fatalf("after stores: %v", got)
	}
	// A chain under one id moves the worker's last id once: no gap.
	if got := ix.LastEvent("w"); got != 2 {
		t.Fatalf("last id %d, want 2", got)
	}
	ix.ApplyKvEvent("w", &triplanev1.KvEvent{EventId: 3, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{11, 13}}}})
	if got := blocks(); !slices.Equal(got, []uint64{10, 12}) {
		t.Fatalf("after removal: %v", got)
	}
	// Bad input beside the good: an event without a kind changes nothing,
	// a repeated id is a duplicate.
	ix.ApplyKvEvent("w", &triplanev1.KvEvent{EventId: 4})
	ix.ApplyKvEvent("w", kvStored(3, nil, 99))
	if got := blocks(); !slices.Equal(got, []uint64{10, 12}) {
		t.Fatalf("after bad events: %v", got)
	}
	ix.ApplyKvEvent("w", &triplanev1.KvEvent{EventId: 5, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}})
	if got := blocks(); len(got) != 0 {
		t.Fatalf("after clear: %v", got)
	}
}
