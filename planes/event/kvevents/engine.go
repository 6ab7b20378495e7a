package kvevents

import (
	"github.com/triplane-dev/triplane/engine"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// MaxHashesPerEvent bounds the blocks one stored or removed event carries,
// so an event stays far below the event plane's payload limit (a publisher
// refuses an event over half of it).
const MaxHashesPerEvent = 4096

// FromEngine turns an engine iteration's KV events into the events a worker
// publishes, without ids (the Log numbers them): a run of stored blocks that
// chain (each the parent of the next) becomes one stored event, a run of
// removals one removed event, each at most MaxHashesPerEvent blocks. A
// parent of 0 means the run starts a prompt. Real workers and the simulator
// both publish through it.
func FromEngine(evs []engine.KVEvent) []*triplanev1.KvEvent {
	var out []*triplanev1.KvEvent
	// Runs take turns (a stored run ends before a removed one starts and
	// the other way round), so every run's hashes are consecutive in one
	// backing array, each run capped at its length: one allocation for the
	// hashes of an iteration.
	var all []uint64
	start := 0 // of the current run in all
	run := func() []uint64 { return all[start:len(all):len(all)] }
	var runParent uint64
	stored, removed := false, false // a run of that kind is open
	flushStored := func() {
		if !stored {
			return
		}
		st := &storedEvent{}
		st.stored.BlockHashes = run()
		if runParent != 0 {
			st.parent = runParent
			st.stored.ParentHash = &st.parent
		}
		st.kind.Stored = &st.stored
		st.event.Kind = &st.kind
		out = append(out, &st.event)
		stored, start = false, len(all)
	}
	flushRemoved := func() {
		if !removed {
			return
		}
		out = append(out, &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: run()}}})
		removed, start = false, len(all)
	}
	for _, e := range evs {
		switch e.Kind {
		case engine.KVStored:
			flushRemoved()
			if n := len(all) - start; stored && n < MaxHashesPerEvent && e.Parent == all[len(all)-1] {
				all = append(all, e.Hash)
				continue
			}
			flushStored()
			if all == nil {
				all = make([]uint64, 0, len(evs))
			}
			all = append(all, e.Hash)
			stored, runParent = true, e.Parent
		case engine.KVRemoved:
			flushStored()
			if len(all)-start == MaxHashesPerEvent {
				flushRemoved()
			}
			if all == nil {
				all = make([]uint64, 0, len(evs))
			}
			all = append(all, e.Hash)
			removed = true
		case engine.KVCleared:
			flushStored()
			flushRemoved()
			out = append(out, &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}})
		}
	}
	flushStored()
	flushRemoved()
	return out
}

// storedEvent is a stored event with its parts, allocated together.
type storedEvent struct {
	event  triplanev1.KvEvent
	kind   triplanev1.KvEvent_Stored
	stored triplanev1.KvBlocksStored
	parent uint64
}

// Publish numbers and sends one event (as from FromEngine).
func (p *Publisher) Publish(e *triplanev1.KvEvent) error { return p.publish(e) }
