// Package router holds the KV-aware routing logic: an index of which worker
// holds which KV blocks, fed by the workers' KV events with gap detection,
// and the choice of a worker for a request (prefix overlap weighed against
// load, or simpler policies). It is pure and deterministic, so the router
// actor, the simulator and replay all run the same code.
package router

import (
	"fmt"
	"math"
	"math/bits"

	"github.com/triplane-dev/triplane/engine"
)

// Index maps block hashes to the workers holding them. It is bounded: past
// MaxBlocks (hash, worker) entries the least recently stored are pruned and
// counted, so a router's memory cannot grow without limit.
//
// Layout (no pointers, so the garbage collector has nothing to mark, and no
// allocation per event once the index has grown to its working size):
//   - workers are interned to small integer slots on first sight (a slot is
//     reused after RemoveWorker);
//   - one open-addressing table maps a block hash to its holders: a bitset
//     of the holders in slots 0-63, their count, and the first of a chain of
//     entries, one per holder;
//   - the (hash, worker) entries live in a slab and are threaded with int32
//     links through three lists: the global LRU (least recently stored
//     first), the worker's blocks, and the hash's holders.
//
// A Stored or Removed event is one table probe and a few slab updates;
// Overlap is one probe and an AND per prompt block. An Index is not safe for
// concurrent use.
type Index struct {
	maxBlocks int

	table []slot // open addressing, linear probing; len a power of two
	mask  uint64
	used  int // occupied slots: distinct hashes

	ents       []entry
	free       int32 // free entries, chained through next
	count      int   // live entries
	head, tail int32 // LRU: least recently stored at head

	ids       map[string]int32 // worker -> slot
	workers   []workerState    // by slot
	freeSlots []int32          // slots of removed workers

	// Pruned counts entries dropped to stay within MaxBlocks; Duplicates
	// counts events at or below a worker's last id.
	Pruned, Duplicates uint64
}

// slot is a block hash's record in the table; n == 0 marks an empty slot.
type slot struct {
	hash   uint64
	holds  uint64 // holders in worker slots 0-63
	holder int32  // first entry of the hash's holder chain
	n      int32  // holders
}

// entry is one (hash, worker) pair.
type entry struct {
	hash         uint64
	worker       int32
	prev, next   int32 // LRU (next also chains free entries)
	wprev, wnext int32 // the worker's entries
	hnext        int32 // the hash's holders
}

type workerState struct {
	name      string
	lastEvent uint64
	first     int32 // first of the worker's entries
}

const (
	nilEntry     = -1
	defaultMax   = 1_000_000
	minTableSize = 64
)

// NewIndex returns an index holding at most maxBlocks (hash, worker)
// entries; 0 means 1,000,000. The index grows to what it holds, up to
// maxBlocks (at most about two billion).
func NewIndex(maxBlocks int) *Index {
	if maxBlocks <= 0 {
		maxBlocks = defaultMax
	}
	maxBlocks = min(maxBlocks, math.MaxInt32-1)
	ix := &Index{maxBlocks: maxBlocks, free: nilEntry, head: nilEntry, tail: nilEntry, ids: map[string]int32{}}
	ix.table = make([]slot, minTableSize)
	ix.mask = minTableSize - 1
	return ix
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
	if last := ix.workers[w].lastEvent; ev.ID > last+1 {
		gap = &Gap{Worker: worker, From: last + 1, To: ev.ID - 1}
	}
	if !ix.apply(w, ev) {
		return nil
	}
	return gap
}

// apply is Apply to worker slot w, without the gap; false for a duplicate.
func (ix *Index) apply(w int32, ev engine.KVEvent) bool {
	ws := &ix.workers[w]
	if ev.ID <= ws.lastEvent {
		ix.Duplicates++
		return false
	}
	ws.lastEvent = ev.ID
	ix.applyKind(w, ev)
	return true
}

// ApplyRepair applies a resent event inside a gap: it is applied without
// moving the worker's last id.
func (ix *Index) ApplyRepair(worker string, ev engine.KVEvent) {
	ix.applyKind(ix.worker(worker), ev)
}

func (ix *Index) applyKind(w int32, ev engine.KVEvent) {
	switch ev.Kind {
	case engine.KVStored:
		ix.store(w, ev.Hash)
	case engine.KVRemoved:
		ix.remove(w, ev.Hash)
	case engine.KVCleared:
		ix.dropBlocks(w)
	}
}

// Reset replaces everything known about a worker with a full dump of its
// blocks, as of event id last: the fallback when a gap can no longer be
// resent.
func (ix *Index) Reset(worker string, hashes []uint64, last uint64) {
	w := ix.worker(worker)
	ix.dropBlocks(w)
	ix.workers[w].lastEvent = last
	for _, h := range hashes {
		ix.store(w, h)
	}
}

// RemoveWorker drops a worker and its blocks (discovery removed it).
func (ix *Index) RemoveWorker(worker string) {
	w, ok := ix.ids[worker]
	if !ok {
		return
	}
	ix.dropBlocks(w)
	delete(ix.ids, worker)
	ix.workers[w] = workerState{first: nilEntry}
	ix.freeSlots = append(ix.freeSlots, w)
}

// LastEvent is the last event id applied for a worker.
func (ix *Index) LastEvent(worker string) uint64 {
	if w, ok := ix.ids[worker]; ok {
		return ix.workers[w].lastEvent
	}
	return 0
}

// Len is the number of (hash, worker) entries.
func (ix *Index) Len() int { return ix.count }

// Blocks returns the hashes the index holds for a worker.
func (ix *Index) Blocks(worker string) map[uint64]bool {
	out := map[uint64]bool{}
	if w, ok := ix.ids[worker]; ok {
		for e := ix.workers[w].first; e != nilEntry; e = ix.ents[e].wnext {
			out[ix.ents[e].hash] = true
		}
	}
	return out
}

// BlocksOf calls fn with each hash the index holds for a worker, in no
// particular order, until fn returns false; it allocates nothing (checks
// compare an index with a worker's cache this way).
func (ix *Index) BlocksOf(worker string, fn func(hash uint64) bool) {
	w, ok := ix.ids[worker]
	if !ok {
		return
	}
	for e := ix.workers[w].first; e != nilEntry; e = ix.ents[e].wnext {
		if !fn(ix.ents[e].hash) {
			return
		}
	}
}

// worker returns a worker's slot, interning it on first sight in the
// lowest free slot.
func (ix *Index) worker(name string) int32 {
	if w, ok := ix.ids[name]; ok {
		return w
	}
	var w int32
	if n := len(ix.freeSlots); n > 0 {
		low := 0
		for i, s := range ix.freeSlots {
			if s < ix.freeSlots[low] {
				low = i
			}
		}
		w = ix.freeSlots[low]
		ix.freeSlots[low] = ix.freeSlots[n-1]
		ix.freeSlots = ix.freeSlots[:n-1]
	} else {
		w = int32(len(ix.workers))
		ix.workers = append(ix.workers, workerState{})
	}
	ix.workers[w] = workerState{name: name, first: nilEntry}
	ix.ids[name] = w
	return w
}

// spread mixes a block hash into a table position (hashes from tests or
// other sources need not be uniform).
func spread(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}

// find returns the slot holding hash, or -1 and the empty slot where it
// would go.
func (ix *Index) find(hash uint64) (at int, empty uint64) {
	i := spread(hash) & ix.mask
	for {
		s := &ix.table[i]
		if s.n == 0 {
			return -1, i
		}
		if s.hash == hash {
			return int(i), i
		}
		i = (i + 1) & ix.mask
	}
}

// grow doubles the table.
func (ix *Index) grow() {
	old := ix.table
	ix.table = make([]slot, 2*len(old))
	ix.mask = uint64(len(ix.table) - 1)
	for _, s := range old {
		if s.n == 0 {
			continue
		}
		i := spread(s.hash) & ix.mask
		for ix.table[i].n != 0 {
			i = (i + 1) & ix.mask
		}
		ix.table[i] = s
	}
}

// deleteSlot empties slot i, shifting back the slots after it that probed
// past it (linear probing needs no tombstones).
func (ix *Index) deleteSlot(i uint64) {
	ix.used--
	for {
		ix.table[i] = slot{}
		j := i
		for {
			j = (j + 1) & ix.mask
			if ix.table[j].n == 0 {
				return
			}
			home := spread(ix.table[j].hash) & ix.mask
			// The slot at j may stay unless its home lies cyclically in (i, j].
			if i <= j {
				if i < home && home <= j {
					continue
				}
			} else if i < home || home <= j {
				continue
			}
			ix.table[i] = ix.table[j]
			i = j
			break
		}
	}
}

// holderOf returns w's entry for the hash in slot s, or nilEntry.
func (ix *Index) holderOf(s *slot, w int32) int32 {
	if w < 64 && s.holds&(1<<uint(w)) == 0 {
		return nilEntry
	}
	for e := s.holder; e != nilEntry; e = ix.ents[e].hnext {
		if ix.ents[e].worker == w {
			return e
		}
	}
	return nilEntry
}

func (ix *Index) store(w int32, hash uint64) {
	at, empty := ix.find(hash)
	if at >= 0 {
		if e := ix.holderOf(&ix.table[at], w); e != nilEntry {
			ix.lruUnlink(e)
			ix.lruPush(e)
			return
		}
	} else {
		if 2*(ix.used+1) > len(ix.table) {
			ix.grow()
			_, empty = ix.find(hash)
		}
		ix.table[empty] = slot{hash: hash, holder: nilEntry}
		ix.used++
		at = int(empty)
	}
	e := ix.free
	if e != nilEntry {
		ix.free = ix.ents[e].next
	} else {
		e = int32(len(ix.ents))
		ix.ents = append(ix.ents, entry{})
	}
	s := &ix.table[at]
	ws := &ix.workers[w]
	ix.ents[e] = entry{hash: hash, worker: w, wprev: nilEntry, wnext: ws.first, hnext: s.holder}
	if ws.first != nilEntry {
		ix.ents[ws.first].wprev = e
	}
	ws.first = e
	s.holder = e
	s.n++
	if w < 64 {
		s.holds |= 1 << uint(w)
	}
	ix.lruPush(e)
	ix.count++
	for ix.count > ix.maxBlocks {
		ix.removeEntry(ix.head)
		ix.Pruned++
	}
}

func (ix *Index) remove(w int32, hash uint64) {
	at, _ := ix.find(hash)
	if at < 0 {
		return
	}
	s := &ix.table[at]
	if w < 64 && s.holds&(1<<uint(w)) == 0 {
		return
	}
	prev := int32(nilEntry)
	e := s.holder
	for e != nilEntry && ix.ents[e].worker != w {
		prev, e = e, ix.ents[e].hnext
	}
	if e != nilEntry {
		ix.unlink(uint64(at), prev, e)
	}
}

// removeEntry removes entry e, finding it in its hash's holder chain.
func (ix *Index) removeEntry(e int32) {
	at, _ := ix.find(ix.ents[e].hash)
	prev := int32(nilEntry)
	for x := ix.table[at].holder; x != e; x = ix.ents[x].hnext {
		prev = x
	}
	ix.unlink(uint64(at), prev, e)
}

// unlink removes entry e, which follows prev (nilEntry: first) in the
// holder chain of slot at.
func (ix *Index) unlink(at uint64, prev, e int32) {
	en := &ix.ents[e]
	s := &ix.table[at]
	if prev == nilEntry {
		s.holder = en.hnext
	} else {
		ix.ents[prev].hnext = en.hnext
	}
	if en.worker < 64 {
		s.holds &^= 1 << uint(en.worker)
	}
	if s.n--; s.n == 0 {
		ix.deleteSlot(at)
	}
	if en.wprev != nilEntry {
		ix.ents[en.wprev].wnext = en.wnext
	} else {
		ix.workers[en.worker].first = en.wnext
	}
	if en.wnext != nilEntry {
		ix.ents[en.wnext].wprev = en.wprev
	}
	ix.lruUnlink(e)
	en.next = ix.free
	ix.free = e
	ix.count--
}

func (ix *Index) lruPush(e int32) {
	en := &ix.ents[e]
	en.prev, en.next = ix.tail, nilEntry
	if ix.tail != nilEntry {
		ix.ents[ix.tail].next = e
	} else {
		ix.head = e
	}
	ix.tail = e
}

func (ix *Index) lruUnlink(e int32) {
	en := &ix.ents[e]
	if en.prev != nilEntry {
		ix.ents[en.prev].next = en.next
	} else {
		ix.head = en.next
	}
	if en.next != nilEntry {
		ix.ents[en.next].prev = en.prev
	} else {
		ix.tail = en.prev
	}
}

func (ix *Index) dropBlocks(w int32) {
	for e := ix.workers[w].first; e != nilEntry; {
		next := ix.ents[e].wnext
		ix.removeEntry(e)
		e = next
	}
}

// Overlap returns, per worker, how many of the request's blocks (its
// chained hashes, in order) the worker holds as a prefix. Workers holding
// none are left out.
func (ix *Index) Overlap(hashes []uint64) map[string]int {
	var buf [64]int32
	depth := ix.depths(hashes, buf[:0])
	n := 0
	for _, d := range depth {
		if d > 0 {
			n++
		}
	}
	out := make(map[string]int, n)
	for w, d := range depth {
		if d > 0 {
			out[ix.workers[w].name] = int(d)
		}
	}
	return out
}

// depths returns, by worker slot, how many leading blocks of hashes each
// worker holds, in buf if it is large enough.
func (ix *Index) depths(hashes []uint64, buf []int32) []int32 {
	n := len(ix.workers)
	var depth []int32
	if cap(buf) >= n {
		depth = buf[:n]
		clear(depth)
	} else {
		depth = make([]int32, n)
	}
	if n == 0 || len(hashes) == 0 {
		return depth
	}
	if n > 64 {
		ix.depthsWide(hashes, depth)
		return depth
	}
	// Workers still matching at block i form alive; one that drops out at
	// block i holds i blocks.
	var alive uint64
	i := 0
	for ; i < len(hashes); i++ {
		at, _ := ix.find(hashes[i])
		if at < 0 {
			break
		}
		holds := ix.table[at].holds
		if i == 0 {
			alive = holds
			continue
		}
		next := alive & holds
		for gone := alive &^ next; gone != 0; gone &= gone - 1 {
			depth[bits.TrailingZeros64(gone)] = int32(i)
		}
		if alive = next; alive == 0 {
			return depth
		}
	}
	for ; alive != 0; alive &= alive - 1 {
		depth[bits.TrailingZeros64(alive)] = int32(i)
	}
	return depth
}

// depthsWide is depths for more than 64 worker slots: the bitset has a
// word per 64 slots, and the holders past slot 63 come from the chain.
func (ix *Index) depthsWide(hashes []uint64, depth []int32) {
	words := (len(depth) + 63) / 64
	alive := make([]uint64, words)
	next := make([]uint64, words)
	i := 0
	for ; i < len(hashes); i++ {
		at, _ := ix.find(hashes[i])
		if at < 0 {
			break
		}
		s := &ix.table[at]
		clear(next)
		next[0] = s.holds
		if int(s.n) > bits.OnesCount64(s.holds) {
			for e := s.holder; e != nilEntry; e = ix.ents[e].hnext {
				if w := ix.ents[e].worker; w >= 64 {
					next[w/64] |= 1 << uint(w%64)
				}
			}
		}
		any := uint64(0)
		for k := range next {
			if i > 0 {
				next[k] &= alive[k]
				for gone := alive[k] &^ next[k]; gone != 0; gone &= gone - 1 {
					depth[k*64+bits.TrailingZeros64(gone)] = int32(i)
				}
			}
			any |= next[k]
		}
		alive, next = next, alive
		if any == 0 {
			return
		}
	}
	for k, a := range alive {
		for ; a != 0; a &= a - 1 {
			depth[k*64+bits.TrailingZeros64(a)] = int32(i)
		}
	}
}
