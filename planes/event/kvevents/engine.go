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
	var run []uint64
	var runParent uint64
	var removed []uint64
	flushStored := func() {
		if len(run) == 0 {
			return
		}
		st := &triplanev1.KvBlocksStored{BlockHashes: run}
		if runParent != 0 {
			p := runParent
			st.ParentHash = &p
		}
		out = append(out, &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: st}})
		run = nil
	}
	flushRemoved := func() {
		if len(removed) == 0 {
			return
		}
		out = append(out, &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: removed}}})
		removed = nil
	}
	for _, e := range evs {
		switch e.Kind {
		case engine.KVStored:
			flushRemoved()
			if len(run) > 0 && len(run) < MaxHashesPerEvent && e.Parent == run[len(run)-1] {
				run = append(run, e.Hash)
				continue
			}
			flushStored()
			run, runParent = []uint64{e.Hash}, e.Parent
		case engine.KVRemoved:
			flushStored()
			if len(removed) == MaxHashesPerEvent {
				flushRemoved()
			}
			removed = append(removed, e.Hash)
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

// Publish numbers and sends one event (as from FromEngine).
func (p *Publisher) Publish(e *triplanev1.KvEvent) error { return p.publish(e) }
