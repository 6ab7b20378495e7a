package router

import (
	"github.com/triplane-dev/triplane/engine"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// ApplyKvEvent applies one event of a worker's KV event stream, as a KV
// event consumer hands it over in order (kvevents.Sequencer's OnEvent). A
// stored or removed event may carry a chain of blocks under one id: the
// first block moves the worker's last id, the rest are applied without.
func (ix *Index) ApplyKvEvent(worker string, e *triplanev1.KvEvent) {
	id := e.GetEventId()
	switch k := e.Kind.(type) {
	case *triplanev1.KvEvent_Stored:
		parent := k.Stored.GetParentHash()
		for i, h := range k.Stored.GetBlockHashes() {
			ev := engine.KVEvent{ID: id, Kind: engine.KVStored, Hash: h, Parent: parent}
			if i == 0 {
				ix.Apply(worker, ev)
			} else {
				ix.ApplyRepair(worker, ev)
			}
			parent = h
		}
	case *triplanev1.KvEvent_Removed:
		for i, h := range k.Removed.GetBlockHashes() {
			ev := engine.KVEvent{ID: id, Kind: engine.KVRemoved, Hash: h}
			if i == 0 {
				ix.Apply(worker, ev)
			} else {
				ix.ApplyRepair(worker, ev)
			}
		}
	case *triplanev1.KvEvent_Cleared:
		ix.Apply(worker, engine.KVEvent{ID: id, Kind: engine.KVCleared})
	}
}
