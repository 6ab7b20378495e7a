// Package router holds the KV-aware routing logic: an index of which worker
// holds which KV blocks, fed by the workers' KV events with gap detection,
// and the choice of a worker for a request (prefix overlap weighed against
// load, or simpler policies). It is pure and deterministic, so the router
// actor, the simulator and replay all run the same code.
package router

import (
	"container/list"
	"fmt"

	"github.com/triplane-dev/triplane/engine"
)

// Index maps block hashes to the workers holding them. It is bounded: past
// MaxBlocks (hash, worker) entries the least recently stored are pruned and
// counted, so a router's memory cannot grow without limit.
type Index struct {
	maxBlocks int
	blocks    map[uint64]map[string]*list.Element // hash -> worker -> LRU element
	workers   map[string]*workerState
	lru       *list.List // of *entry, least recently stored at the front
	// Pruned counts entries dropped to stay within MaxBlocks; Duplicates
	// counts events at or below a worker's last id.
	Pruned, Duplicates uint64
}

type entry struct {
	hash   uint64
	worker string
}

type workerState struct {
	lastEvent uint64
	hashes    map[uint64]struct{}
}

// NewIndex returns an index holding at most maxBlocks (hash, worker)
// entries; 0 means 1,000,000.
func NewIndex(maxBlocks int) *Index {
	if maxBlocks <= 0 {
		maxBlocks = 1_000_000
	}
	return &Index{maxBlocks: maxBlocks, blocks: map[uint64]map[string]*list.Element{},
		workers: map[string]*workerState{}, lru: list.New()}
}

// Gap is a range of event ids a worker sent that the index has not seen.
type Gap struct {
	Worker   string
	From, To uint64 // inclusive
}

func (g Gap) String() string { return fmt.Sprintf("%s events %d..%d", g.Worker, g.From, g.To) }

// Apply applies one KV event from a worker. An event whose id is not the
// next one is still applied (the newest news wins), and the missing range
// is returned so the caller can ask the worker to resend it; an event at
// or below the last applied id is a duplicate and ignored.
func (ix *Index) Apply(worker string, ev engine.KVEvent) (gap *Gap) {
	w := ix.worker(worker)
	if ev.ID <= w.lastEvent {
		ix.Duplicates++
		return nil
	}
	if ev.ID > w.lastEvent+1 {
		gap = &Gap{Worker: worker, From: w.lastEvent + 1, To: ev.ID - 1}
	}
	w.lastEvent = ev.ID
	ix.applyKind(worker, ev)
	return gap
}

// ApplyRepair applies a resent event inside a gap: it is applied without
// moving the worker's last id.
func (ix *Index) ApplyRepair(worker string, ev engine.KVEvent) {
	ix.worker(worker)
	ix.applyKind(worker, ev)
}

func (ix *Index) applyKind(worker string, ev engine.KVEvent) {
	switch ev.Kind {
	case engine.KVStored:
		ix.store(worker, ev.Hash)
	case engine.KVRemoved:
		ix.remove(worker, ev.Hash)
	case engine.KVCleared:
		ix.dropBlocks(worker)
	}
}

// Reset replaces everything known about a worker with a full dump of its
// blocks, as of event id last: the fallback when a gap can no longer be
// resent.
func (ix *Index) Reset(worker string, hashes []uint64, last uint64) {
	ix.dropBlocks(worker)
	w := ix.worker(worker)
	w.lastEvent = last
	for _, h := range hashes {
		ix.store(worker, h)
	}
}

// RemoveWorker drops a worker and its blocks (discovery removed it).
func (ix *Index) RemoveWorker(worker string) {
	ix.dropBlocks(worker)
	delete(ix.workers, worker)
}

// LastEvent is the last event id applied for a worker.
func (ix *Index) LastEvent(worker string) uint64 {
	if w, ok := ix.workers[worker]; ok {
		return w.lastEvent
	}
	return 0
}

// Len is the number of (hash, worker) entries.
func (ix *Index) Len() int { return ix.lru.Len() }

// Blocks returns the hashes the index holds for a worker.
func (ix *Index) Blocks(worker string) map[uint64]bool {
	out := map[uint64]bool{}
	if w, ok := ix.workers[worker]; ok {
		for h := range w.hashes {
			out[h] = true
		}
	}
	return out
}

func (ix *Index) worker(id string) *workerState {
	w, ok := ix.workers[id]
	if !ok {
		w = &workerState{hashes: map[uint64]struct{}{}}
		ix.workers[id] = w
	}
	return w
}

func (ix *Index) store(worker string, hash uint64) {
	ws := ix.blocks[hash]
	if ws == nil {
		ws = map[string]*list.Element{}
		ix.blocks[hash] = ws
	}
	if el, ok := ws[worker]; ok {
		ix.lru.MoveToBack(el)
		return
	}
	ws[worker] = ix.lru.PushBack(&entry{hash: hash, worker: worker})
	ix.worker(worker).hashes[hash] = struct{}{}
	for ix.lru.Len() > ix.maxBlocks {
		e := ix.lru.Front().Value.(*entry)
		ix.remove(e.worker, e.hash)
		ix.Pruned++
	}
}

func (ix *Index) remove(worker string, hash uint64) {
	ws := ix.blocks[hash]
	el, ok := ws[worker]
	if !ok {
		return
	}
	ix.lru.Remove(el)
	delete(ws, worker)
	if len(ws) == 0 {
		delete(ix.blocks, hash)
	}
	if w, ok := ix.workers[worker]; ok {
		delete(w.hashes, hash)
	}
}

func (ix *Index) dropBlocks(worker string) {
	w, ok := ix.workers[worker]
	if !ok {
		return
	}
	for h := range w.hashes {
		ix.remove(worker, h)
	}
}

// Overlap returns, per worker, how many of the request's blocks (its
// chained hashes, in order) the worker holds as a prefix.
func (ix *Index) Overlap(hashes []uint64) map[string]int {
	out := map[string]int{}
	var alive map[string]bool
	for i, h := range hashes {
		ws := ix.blocks[h]
		if len(ws) == 0 {
			break
		}
		next := map[string]bool{}
		for w := range ws {
			if i == 0 || alive[w] {
				next[w] = true
				out[w] = i + 1
			}
		}
		if len(next) == 0 {
			break
		}
		alive = next
	}
	return out
}
