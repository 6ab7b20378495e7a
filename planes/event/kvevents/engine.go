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
	// Count the events first (the runs as grouped below), so that the
	// list and the stored events each take one allocation: this runs for
	// every engine iteration.
	events, storedRuns := countRuns(evs)
	if events == 0 {
		return nil
	}
	out := make([]*triplanev1.KvEvent, 0, events)
	slab := make([]storedEvent, storedRuns)
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
		var st *storedEvent
		if len(slab) > 0 {
			st, slab = &slab[0], slab[1:]
		} else {
			st = &storedEvent{} // not counted: cannot happen
		}
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

// countRuns counts the events FromEngine makes of evs, and the stored ones
// among them, grouping them the same way.
func countRuns(evs []engine.KVEvent) (events, stored int) {
	var last uint64
	run, kind := 0, engine.KVEventKind(0) // the open run's length and kind
	for _, e := range evs {
		switch e.Kind {
		case engine.KVStored:
			if kind == engine.KVStored && run < MaxHashesPerEvent && e.Parent == last {
				run++
			} else {
				events, stored, run = events+1, stored+1, 1
			}
			last = e.Hash
		case engine.KVRemoved:
			if kind == engine.KVRemoved && run < MaxHashesPerEvent {
				run++
			} else {
				events, run = events+1, 1
			}
		case engine.KVCleared:
			events, run = events+1, 0
		default:
			continue
		}
		kind = e.Kind
	}
	return events, stored
}

// storedEvent is a stored event with its parts, allocated together.
type storedEvent struct {
	event  triplanev1.KvEvent
	kind   triplanev1.KvEvent_Stored
	stored triplanev1.KvBlocksStored
	parent uint64
}

// Publish numbers and sends one event (as from FromEngine); PublishAll
// sends an engine iteration's events together.
func (p *Publisher) Publish(e *triplanev1.KvEvent) error { return p.publish(e) }
