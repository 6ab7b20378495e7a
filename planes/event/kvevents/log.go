package kvevents

import (
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
}

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
		ring: make([]*triplanev1.KvEvent, ringSize)}
}

// Size is the encoded size of the batch Append(e) would return now, so an
// event too large to send can be refused before it takes an id. e keeps its
// id.
func (l *Log) Size(e *triplanev1.KvEvent) int {
	id := e.EventId
	e.EventId = l.last + 1
	n := proto.Size(l.batch(e))
	e.EventId = id
	return n
}

// Append numbers e as the next event (it sets e.EventId), applies it to the
// mirror, keeps it in the ring and returns the batch to publish. The log
// keeps e: the caller must not change it afterwards.
func (l *Log) Append(e *triplanev1.KvEvent) *triplanev1.KvEventBatch {
	e.EventId = l.last + 1
	l.last = e.EventId
	apply(&l.blocks, e)
	l.ring[e.EventId%uint64(len(l.ring))] = e
	return l.batch(e)
}

// oneEvent is a batch of one event with its events slice, allocated
// together: a batch goes out per event.
type oneEvent struct {
	batch  triplanev1.KvEventBatch
	events [1]*triplanev1.KvEvent
}

func (l *Log) batch(e *triplanev1.KvEvent) *triplanev1.KvEventBatch {
	b := &oneEvent{events: [1]*triplanev1.KvEvent{e}}
	b.batch.WorkerId, b.batch.Epoch, b.batch.Events, b.batch.HeadEventId = l.worker, l.epoch, b.events[:], e.EventId
	return &b.batch
}

// Heartbeat is a batch without events carrying the latest id, so that a
// consumer that lost the tail notices.
func (l *Log) Heartbeat() *triplanev1.KvEventBatch {
	return &triplanev1.KvEventBatch{WorkerId: l.worker, Epoch: l.epoch, HeadEventId: l.last}
}

// Resend answers req with the range it asks for from the ring, as much of
// it as fits in budget bytes and maxResend events, but at least one event so
// that every answer makes progress; the consumer asks again for the rest. When the ring no longer holds the start
// of the range, the answer is a dump of every block instead, sorted by hash.
func (l *Log) Resend(req *triplanev1.KvResendRequest, budget int64) *triplanev1.KvResendReply {
	reply := &triplanev1.KvResendReply{WorkerId: l.worker, Epoch: l.epoch}
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
	reply.Reply = &triplanev1.KvResendReply_Dump{Dump: dump(&l.blocks, l.last)}
	return reply
}

// Last is the latest event id (0 before the first).
func (l *Log) Last() uint64 { return l.last }

// Blocks is a copy of the worker's blocks as its events describe them.
func (l *Log) Blocks() map[uint64]Block { return toMap(&l.blocks) }
