package router

import (
	"github.com/triplane-dev/triplane/engine"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// ApplyKvEvent applies one event of a worker's KV event stream, as a KV
// event consumer hands it over in order (kvevents.Sequencer's OnEvent). A
// stored or removed event may carry a chain of blocks under one id: the
// first block moves the worker's last id, the rest are applied without.
// The worker is looked up once per event, not per block.
func (ix *Index) ApplyKvEvent(worker string, e *triplanev1.KvEvent) {
	id := e.GetEventId()
	switch k := e.Kind.(type) {
	case *triplanev1.KvEvent_Stored:
		hashes := k.Stored.GetBlockHashes()
		if len(hashes) == 0 {
			return
		}
		w := ix.worker(worker)
		parent := k.Stored.GetParentHash()
		for i, h := range hashes {
			ev := engine.KVEvent{ID: id, Kind: engine.KVStored, Hash: h, Parent: parent}
			if i == 0 {
				ix.apply(w, ev)
			} else {
				ix.applyKind(w, ev)
			}
			parent = h
		}
	case *triplanev1.KvEvent_Removed:
		hashes := k.Removed.GetBlockHashes()
		if len(hashes) == 0 {
			return
		}
		w := ix.worker(worker)
		for i, h := range hashes {
			ev := engine.KVEvent{ID: id, Kind: engine.KVRemoved, Hash: h}
			if i == 0 {
				ix.apply(w, ev)
			} else {
				ix.applyKind(w, ev)
			}
		}
	case *triplanev1.KvEvent_Cleared:
		ix.apply(ix.worker(worker), engine.KVEvent{ID: id, Kind: engine.KVCleared})
	}
}
