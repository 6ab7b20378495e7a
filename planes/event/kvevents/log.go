package kvevents

import (
	"cmp"
	"slices"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/blockmap"
	"github.com/triplane-dev/triplane/fault"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

const (
	defaultRingSize  = 4096
	defaultMaxResend = 1024
)

// Log is the publisher's logic without its lock, ticker or connection, so
// that the simulator runs the very code production runs: it numbers one
// worker's events, keeps the latest in a ring and the blocks they describe in
// a mirror, and answers heartbeats and resend requests from them. The caller
// sends what it returns, in order, and locks (a Log is not safe for
// concurrent use).
type Log struct {
	worker    string
	epoch     uint64
	maxResend int
	faults    fault.Points
	last      uint64                // latest event id
	ring      []*triplanev1.KvEvent // ring[id % len]
	blocks    blockmap.Map[Block]
	// frozen is the paged dump being served (nil when none): see Resend.
	frozen *frozenDump
	// dumpIdle is the heartbeat without a page that drops frozen.
	dumpIdle int
}

// frozenDump is a copy of the mirror as of one event id, sorted by hash,
// from which the pages of one paged dump are served. The worker changes
// between page requests; pages cut from the live mirror would mix states
// (a block removed before its page is read and another stored behind the
// cursor would leave the router with a set of blocks the worker never
// held). A frozen copy makes every page of a dump describe one state: the
// router applies the whole dump at eventID and then the events after it,
// exactly as it did a one-reply dump.
//
// It is bounded: one per log, as large as the mirror, kept in a compact
// form (24 bytes a block, not a protobuf message each); and it is dropped
// at the dumpIdle-th heartbeat without a page asked of it (the routers
// finished or gave up), or replaced when a new dump is needed and it has
// grown too old to share (the ring no longer holds the event after it) or
// holds nothing the requester lacks (its view is at or past it). Its
// lifetime is counted in heartbeats, the log having no clock: the caller
// that knows its heartbeat interval sets the count (SetDumpIdleHeartbeats)
// so that a router retrying a lost page still finds the copy; else a
// retried page may find it gone and the router starts the dump over.
type frozenDump struct {
	eventID uint64
	blocks  []hashedBlock // increasing hash
	idle    int           // heartbeats since a page was served
}

// dumpIdleHeartbeats is the default of the heartbeat without a page that
// drops a frozen dump: the 5th, so the copy outlives its last page by at
// least 4 heartbeat intervals (4 s at the publisher's default of 1 s, above
// a router's repair timeout plus its backoff, 2.1 s by default). The
// Publisher sets more when its interval is short (see dumpIdleFor).
const dumpIdleHeartbeats = 5

// NewLog returns the log of worker's run epoch, which must be above 0 and
// grow across the worker's restarts (consumers start afresh on a newer
// epoch). ringSize (default 4096) events are kept for resends, and at most
// maxResend (default 1024) go in one resend reply. faults is nil in
// production (see FaultDump).
func NewLog(worker string, epoch uint64, ringSize, maxResend int, faults fault.Points) *Log {
	if ringSize <= 0 {
		ringSize = defaultRingSize
	}
	if maxResend <= 0 {
		maxResend = defaultMaxResend
	}
	return &Log{worker: worker, epoch: epoch, maxResend: maxResend, faults: faults,
		ring: make([]*triplanev1.KvEvent, ringSize), dumpIdle: dumpIdleHeartbeats}
}

// SetDumpIdleHeartbeats makes the n-th heartbeat without a page asked of it
// drop the frozen dump (default 5; n below 1 counts as 1): the copy then
// outlives its last page by at least n-1 heartbeat intervals.
func (l *Log) SetDumpIdleHeartbeats(n int) { l.dumpIdle = max(n, 1) }

// Size is the encoded size of the batch Append(e) would return now, so an
// event too large to send can be refused before it takes an id. e keeps its
// id.
func (l *Log) Size(e *triplanev1.KvEvent) int { return l.sizeAlone(e, l.last+1) }

// sizeAlone is the encoded size of a batch of e alone numbered id. e keeps
// its id.
func (l *Log) sizeAlone(e *triplanev1.KvEvent, id uint64) int {
	old := e.EventId
	e.EventId = id
	n := proto.Size(e)
	e.EventId = old
	return l.headerSize(id) + eventFieldSize(n)
}

// Append numbers e as the next event (it sets e.EventId), applies it to the
// mirror, keeps it in the ring and returns the batch to publish. The log
// keeps e: the caller must not change it afterwards.
func (l *Log) Append(e *triplanev1.KvEvent) *triplanev1.KvEventBatch {
	l.record(e)
	// The batch and its one-event list in one allocation: the tests and
	// benchmarks that publish event by event stay cheap.
	b := &oneEvent{events: [1]*triplanev1.KvEvent{e}}
	l.fill(&b.batch, b.events[:])
	return &b.batch
}

// AppendAll numbers events as the next ones, oldest first (it sets their
// EventIds), applies each to the mirror and keeps each in the ring, exactly
// as Append does one by one, and returns the batches to publish, in order:
// as few as possible, each encoded in at most budget bytes, except that a
// batch always holds at least one event (an event larger than budget goes
// out alone, so every batch makes progress; a caller that must bound every
// message refuses such events first, as the Publisher does). An engine
// iteration's events then cost one message instead of one each. No events
// return no batch and take no id. The log keeps the events and the batches
// share events' backing array: the caller must change neither afterwards.
func (l *Log) AppendAll(events []*triplanev1.KvEvent, budget int) []*triplanev1.KvEventBatch {
	if len(events) == 0 {
		return nil
	}
	for _, e := range events {
		l.record(e)
	}
	end := l.batchEnd(events, 0, budget)
	if end == len(events) {
		// The common case, everything in one batch: one allocation.
		b := &oneBatch{}
		l.fill(&b.batch, events)
		b.out[0] = &b.batch
		return b.out[:]
	}
	var out []*triplanev1.KvEventBatch
	for start := 0; start < len(events); start, end = end, l.batchEnd(events, end, budget) {
		b := &triplanev1.KvEventBatch{}
		// Capped, so that appending to one batch's events cannot
		// overwrite the next batch's.
		l.fill(b, events[start:end:end])
		out = append(out, b)
	}
	return out
}

// record numbers e as the next event, applies it to the mirror and keeps
// it in the ring.
func (l *Log) record(e *triplanev1.KvEvent) {
	e.EventId = l.last + 1
	l.last = e.EventId
	apply(&l.blocks, e)
	l.ring[e.EventId%uint64(len(l.ring))] = e
}

// fill makes b the batch of events (numbered, consecutive). Its head is
// its last event's id, not the log's latest: a consumer takes the head as
// an event that exists, and one ahead of the batch's events would start a
// repair for the next batch, already on its way.
func (l *Log) fill(b *triplanev1.KvEventBatch, events []*triplanev1.KvEvent) {
	b.WorkerId, b.Epoch, b.Events, b.HeadEventId = l.worker, l.epoch, events, events[len(events)-1].EventId
}

// batchEnd is the end of the batch that starts at events[start]: as many
// events as fit in budget bytes, at least one. The sizes are worked out
// field by field (what proto.Size of the batch would say, without building
// it or sizing the events again for each candidate end).
func (l *Log) batchEnd(events []*triplanev1.KvEvent, start, budget int) int {
	if fitsSurely(events[start:], budget-l.headerSize(events[len(events)-1].EventId)) {
		return len(events)
	}
	size := 0 // of the events' fields so far
	for i := start; i < len(events); i++ {
		size += eventFieldSize(proto.Size(events[i]))
		if i > start && l.headerSize(events[i].EventId)+size > budget {
			return i
		}
	}
	return len(events)
}

// fitsSurely reports whether events certainly encode, as a batch's
// events, in budget bytes, by an upper bound of each one's size that needs
// no marshalling code: the usual iteration is far below any budget, and
// sizing each event exactly cost as much as numbering it. False is no
// answer: the caller sizes them exactly.
func fitsSurely(events []*triplanev1.KvEvent, budget int) bool {
	// Per event: the batch's field tag and length (6), the id (11), the
	// kind's tag and length (6), a parent hash (11) and the hashes' tag
	// and length (6), then at most 10 bytes per hash. Unknown fields have
	// no bound: those events are sized exactly.
	const perEvent, perHash = 40, 10
	total := 0
	for _, e := range events {
		if len(e.ProtoReflect().GetUnknown()) > 0 {
			return false
		}
		var hashes []uint64
		switch k := e.Kind.(type) {
		case *triplanev1.KvEvent_Stored:
			if k.Stored == nil || len(k.Stored.ProtoReflect().GetUnknown()) > 0 {
				return false
			}
			hashes = k.Stored.BlockHashes
		case *triplanev1.KvEvent_Removed:
			if k.Removed == nil || len(k.Removed.ProtoReflect().GetUnknown()) > 0 {
				return false
			}
			hashes = k.Removed.BlockHashes
		case *triplanev1.KvEvent_Cleared:
			if k.Cleared == nil || len(k.Cleared.ProtoReflect().GetUnknown()) > 0 {
				return false
			}
		case nil:
		default:
			return false
		}
		if total += perEvent + perHash*len(hashes); total > budget {
			return false
		}
	}
	return true
}

// headerSize is the encoded size of a batch's fields other than its events,
// with head as its head.
func (l *Log) headerSize(head uint64) int {
	n := 0
	if l.worker != "" {
		n += protowire.SizeTag(1) + protowire.SizeBytes(len(l.worker))
	}
	if l.epoch != 0 {
		n += protowire.SizeTag(2) + protowire.SizeVarint(l.epoch)
	}
	if head != 0 {
		n += protowire.SizeTag(4) + protowire.SizeVarint(head)
	}
	return n
}

// eventFieldSize is the encoded size of an event of n bytes in a batch's
// events field.
func eventFieldSize(n int) int { return protowire.SizeTag(3) + protowire.SizeBytes(n) }

// oneEvent is a batch of one event with its events slice, allocated
// together.
type oneEvent struct {
	batch  triplanev1.KvEventBatch
	events [1]*triplanev1.KvEvent
}

// oneBatch is AppendAll's answer when it is one batch, allocated together.
type oneBatch struct {
	batch triplanev1.KvEventBatch
	out   [1]*triplanev1.KvEventBatch
}

// Heartbeat is a batch without events carrying the latest id, so that a
// consumer that lost the tail notices. It also ages the frozen dump: the
// log has no clock, and heartbeats are its caller's regular tick.
func (l *Log) Heartbeat() *triplanev1.KvEventBatch {
	if l.frozen != nil {
		if l.frozen.idle++; l.frozen.idle >= l.dumpIdle {
			l.frozen = nil
		}
	}
	return &triplanev1.KvEventBatch{WorkerId: l.worker, Epoch: l.epoch, HeadEventId: l.last}
}

// Resend answers req with the range it asks for from the ring, as much of
// it as fits in budget bytes and maxResend events, but at least one event so
// that every answer makes progress; the consumer asks again for the rest.
// When the ring no longer holds the start of the range, the answer is a
// dump of every block instead, sorted by hash.
//
// A requester that takes dumps in pages (DumpPages) gets the dump's blocks
// that fit in budget bytes (at least one) from a frozen copy of the mirror
// (see frozenDump), and asks for the next page with DumpEventId and
// DumpAfter; while the log still holds that frozen dump, such a request
// gets its next page whatever the ring holds (the router is committed to
// that dump). When it no longer does (expired, or replaced), the request is
// answered as a new one: a range if the ring holds it, else the first page
// of a new dump, and the router starts over. A new paged dump shares the
// frozen one when that is still recent (the ring holds the events after it,
// so the router can follow on from it) and newer than the requester's
// view (else it fills nothing): routers joining together share one copy
// rather than each replacing the other's.
func (l *Log) Resend(req *triplanev1.KvResendRequest, budget int64) *triplanev1.KvResendReply {
	reply := &triplanev1.KvResendReply{WorkerId: l.worker, Epoch: l.epoch}
	if req.DumpAfter != nil && l.frozen != nil && fault.Fire(l.faults, FaultDumpLost) {
		l.frozen = nil
	}
	if req.DumpAfter != nil && l.frozen != nil && l.frozen.eventID == req.DumpEventId {
		reply.Reply = &triplanev1.KvResendReply_Dump{Dump: l.page(req.DumpAfter, budget)}
		return reply
	}
	from, to := req.GetFromEventId(), min(req.GetToEventId(), l.last)
	if from == 0 {
		from = 1
	}
	oldest := uint64(1)
	if l.last > uint64(len(l.ring)) {
		oldest = l.last - uint64(len(l.ring)) + 1
	}
	if from > to {
		// Nothing newer than the consumer has: an empty range.
		reply.Reply = &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{}}
		return reply
	}
	if from >= oldest && !fault.Fire(l.faults, FaultDump) {
		to = min(to, from+uint64(l.maxResend)-1)
		if fault.Fire(l.faults, FaultShortResend) {
			to = from
		}
		r := &triplanev1.KvEventRange{Events: make([]*triplanev1.KvEvent, 0, to-from+1)}
		size := int64(0)
		for id := from; id <= to; id++ {
			e := l.ring[id%uint64(len(l.ring))]
			size += int64(proto.Size(e)) + 8
			if size > budget && len(r.Events) > 0 {
				break
			}
			r.Events = append(r.Events, e)
		}
		reply.Reply = &triplanev1.KvResendReply_Range{Range: r}
		return reply
	}
	if !req.DumpPages {
		// An older router: the whole dump in one reply, as before.
		reply.Reply = &triplanev1.KvResendReply_Dump{Dump: dump(&l.blocks, l.last)}
		return reply
	}
	if f := l.frozen; f == nil || f.eventID+1 < oldest || f.eventID < from {
		l.freeze()
	}
	reply.Reply = &triplanev1.KvResendReply_Dump{Dump: l.page(nil, budget)}
	return reply
}

// freeze makes the frozen dump a copy of the mirror now, replacing the one
// there was.
func (l *Log) freeze() {
	l.frozen = &frozenDump{eventID: l.last, blocks: sortedBlocks(&l.blocks)}
}

// page is the page of the frozen dump after the hash after (from the start
// when nil): as many blocks as fit in budget bytes with the reply's other
// fields, at least one (so every page makes progress), in increasing hash
// order.
func (l *Log) page(after *uint64, budget int64) *triplanev1.KvDump {
	f := l.frozen
	f.idle = 0
	start := 0
	if after != nil {
		start, _ = slices.BinarySearchFunc(f.blocks, *after, func(b hashedBlock, h uint64) int { return cmp.Compare(b.hash, h) })
		if start < len(f.blocks) && f.blocks[start].hash == *after {
			start++
		}
	}
	d := &triplanev1.KvDump{EventId: f.eventID, TotalBlocks: uint64(len(f.blocks)), More: true}
	if after != nil {
		a := *after
		d.After = &a
	}
	// Everything but the blocks, sized as the largest it can be: the
	// reply's worker and epoch, the dump field's tag and length (at most 5
	// bytes), the event id, total, more and after.
	size := int64(protowire.SizeTag(1) + protowire.SizeBytes(len(l.worker)) + protowire.SizeTag(2) + protowire.SizeVarint(l.epoch) +
		protowire.SizeTag(4) + 5 + proto.Size(d))
	end := start
	for ; end < len(f.blocks); end++ {
		b := f.blocks[end]
		n := 0
		if b.hash != 0 {
			n += protowire.SizeTag(1) + protowire.SizeVarint(b.hash)
		}
		if b.HasParent {
			n += protowire.SizeTag(2) + protowire.SizeVarint(b.Parent)
		}
		if size += int64(protowire.SizeTag(2) + protowire.SizeBytes(n)); size > budget && end > start {
			break
		}
	}
	d.More = end < len(f.blocks)
	d.Blocks = dumpBlocksOf(f.blocks[start:end])
	return d
}

// Last is the latest event id (0 before the first).
func (l *Log) Last() uint64 { return l.last }

// Blocks is a copy of the worker's blocks as its events describe them.
func (l *Log) Blocks() map[uint64]Block { return toMap(&l.blocks) }
