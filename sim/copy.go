package sim

import (
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// copyMessage is proto.Clone: each receiver of a bus message gets its own
// deep copy, as each decodes its own in the real system. The KV event
// batches that make most of a serving run's traffic, resend requests and
// replies, and load reports are copied by hand, a batch of one event and
// its event in one allocation (proto.Clone, reflective and an allocation
// per message part, was 5% of a run); anything else, or a message carrying
// unknown fields, goes through proto.Clone. TestCopyMessage, TestCopyResends and
// TestCopyLoadReports check the hand copies against proto.Clone and fail
// when these messages gain a field.
func copyMessage(m proto.Message) proto.Message {
	switch x := m.(type) {
	case *triplanev1.KvEventBatch:
		if x != nil {
			if c := copyBatch(x); c != nil {
				return c
			}
		}
	case *triplanev1.KvResendRequest:
		if x != nil && !hasUnknown(x) {
			c := &triplanev1.KvResendRequest{WorkerId: x.WorkerId, FromEventId: x.FromEventId, ToEventId: x.ToEventId,
				DumpPages: x.DumpPages, DumpEventId: x.DumpEventId}
			if x.DumpAfter != nil {
				after := *x.DumpAfter
				c.DumpAfter = &after
			}
			return c
		}
	case *triplanev1.KvResendReply:
		if x != nil {
			if c := copyResendReply(x); c != nil {
				return c
			}
		}
	case *triplanev1.LoadReport:
		if x != nil {
			if c := copyLoadReport(x); c != nil {
				return c
			}
		}
	}
	return proto.Clone(m)
}

// loadCopy is a copied load report with its time, in one allocation.
type loadCopy struct {
	report triplanev1.LoadReport
	sent   timestamppb.Timestamp
}

// copyLoadReport copies a load report (proto.Clone's reflection was 1.4%
// of a serving run), or returns nil when it does not (unknown fields).
func copyLoadReport(r *triplanev1.LoadReport) *triplanev1.LoadReport {
	if hasUnknown(r) || (r.SentAt != nil && hasUnknown(r.SentAt)) {
		return nil
	}
	x := &loadCopy{}
	c := &x.report
	c.InstanceId, c.Namespace, c.Component = r.InstanceId, r.Namespace, r.Component
	c.ActiveRequests, c.WaitingRequests = r.ActiveRequests, r.WaitingRequests
	c.KvBlocksUsed, c.KvBlocksTotal, c.CacheHitRate, c.Seq = r.KvBlocksUsed, r.KvBlocksTotal, r.CacheHitRate, r.Seq
	if r.SentAt != nil {
		x.sent.Seconds, x.sent.Nanos = r.SentAt.Seconds, r.SentAt.Nanos
		c.SentAt = &x.sent
	}
	return c
}

// copyResendReply copies a resend reply (a range of events or a dump), or
// returns nil when it does not (unknown fields, an event it does not copy).
func copyResendReply(r *triplanev1.KvResendReply) *triplanev1.KvResendReply {
	if hasUnknown(r) {
		return nil
	}
	c := &triplanev1.KvResendReply{WorkerId: r.WorkerId, Epoch: r.Epoch}
	switch k := r.Reply.(type) {
	case *triplanev1.KvResendReply_Range:
		if k.Range == nil || hasUnknown(k.Range) {
			return nil
		}
		rg := &triplanev1.KvEventRange{}
		if n := len(k.Range.Events); n > 0 {
			evs := make([]eventCopy, n) // one allocation for the events
			rg.Events = make([]*triplanev1.KvEvent, n)
			for i, e := range k.Range.Events {
				if !evs[i].copy(e) {
					return nil
				}
				rg.Events[i] = &evs[i].event
			}
		}
		c.Reply = &triplanev1.KvResendReply_Range{Range: rg}
	case *triplanev1.KvResendReply_Dump:
		d := k.Dump
		if d == nil || hasUnknown(d) {
			return nil
		}
		cd := &triplanev1.KvDump{EventId: d.EventId, More: d.More, TotalBlocks: d.TotalBlocks}
		if d.After != nil {
			after := *d.After
			cd.After = &after
		}
		if len(d.Blocks) > 0 {
			// The blocks and their parents in one allocation each.
			blocks := make([]triplanev1.KvDumpBlock, len(d.Blocks))
			parents := make([]uint64, len(d.Blocks))
			cd.Blocks = make([]*triplanev1.KvDumpBlock, len(d.Blocks))
			for i, b := range d.Blocks {
				if b == nil || hasUnknown(b) {
					return nil
				}
				cb := &blocks[i]
				cb.Hash = b.Hash
				if b.ParentHash != nil {
					parents[i] = *b.ParentHash
					cb.ParentHash = &parents[i]
				}
				cd.Blocks[i] = cb
			}
		}
		c.Reply = &triplanev1.KvResendReply_Dump{Dump: cd}
	case nil:
	default:
		return nil
	}
	return c
}

// batchCopy is a copied batch of one event in one allocation with the
// event (with a stored event's parts; a removed event's are allocated
// apart, removals being the rarer).
type batchCopy struct {
	batch  triplanev1.KvEventBatch
	events [1]*triplanev1.KvEvent
	event  eventCopy
}

// eventCopy is a copied event with a stored event's kind and message, and
// room for a few hashes (a decoding sequence stores one block at a time).
type eventCopy struct {
	event  triplanev1.KvEvent
	stored triplanev1.KvEvent_Stored
	st     triplanev1.KvBlocksStored
	parent uint64
	hashes [4]uint64
}

// copyBatch copies a heartbeat or a batch of stored and removed events (a
// worker sends an engine iteration's events in one batch), or returns nil
// when it does not (a cleared event, unknown fields).
func copyBatch(b *triplanev1.KvEventBatch) *triplanev1.KvEventBatch {
	if hasUnknown(b) {
		return nil
	}
	var c *triplanev1.KvEventBatch
	switch len(b.Events) {
	case 0:
		c = &triplanev1.KvEventBatch{}
	case 1:
		x := &batchCopy{}
		if !x.event.copy(b.Events[0]) {
			return nil
		}
		x.events[0] = &x.event.event
		x.batch.Events = x.events[:]
		c = &x.batch
	default:
		// The events in one allocation, as a resend range's.
		evs := make([]eventCopy, len(b.Events))
		c = &triplanev1.KvEventBatch{Events: make([]*triplanev1.KvEvent, len(b.Events))}
		for i, e := range b.Events {
			if !evs[i].copy(e) {
				return nil
			}
			c.Events[i] = &evs[i].event
		}
	}
	c.WorkerId, c.Epoch, c.HeadEventId = b.WorkerId, b.Epoch, b.HeadEventId
	return c
}

// copy makes c a copy of e, a stored or removed event; false when it
// cannot.
func (c *eventCopy) copy(e *triplanev1.KvEvent) bool {
	if e == nil || hasUnknown(e) {
		return false
	}
	switch x := e.Kind.(type) {
	case *triplanev1.KvEvent_Stored:
		if x.Stored == nil || hasUnknown(x.Stored) {
			return false
		}
		if h := x.Stored.BlockHashes; len(h) > 0 && len(h) <= len(c.hashes) {
			c.st.BlockHashes = c.hashes[:copy(c.hashes[:], h):len(h)]
		} else {
			c.st.BlockHashes = cloneHashes(h)
		}
		if x.Stored.ParentHash != nil {
			c.parent = *x.Stored.ParentHash
			c.st.ParentHash = &c.parent
		}
		c.stored.Stored = &c.st
		c.event.Kind = &c.stored
	case *triplanev1.KvEvent_Removed:
		if x.Removed == nil || hasUnknown(x.Removed) {
			return false
		}
		c.event.Kind = &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: cloneHashes(x.Removed.BlockHashes)}}
	default:
		return false
	}
	c.event.EventId = e.EventId
	return true
}

// cloneHashes copies hashes; empty ones are nil, as with proto.Clone.
func cloneHashes(h []uint64) []uint64 {
	if len(h) == 0 {
		return nil
	}
	return append(make([]uint64, 0, len(h)), h...)
}

// hasUnknown reports whether m carries unknown fields (then proto.Clone
// copies it: the hand copies know only the declared fields).
func hasUnknown(m proto.Message) bool { return len(m.ProtoReflect().GetUnknown()) > 0 }
