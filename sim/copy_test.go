package sim

import (
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// The hand copy of KV event batches and resends knows every field of the messages it
// copies (a new field must be added there, or this fails), gives what
// proto.Clone gives, and shares nothing with the original.
func TestCopyMessage(t *testing.T) {
	fields := map[proto.Message][]string{
		&triplanev1.KvEventBatch{}:    {"worker_id", "epoch", "events", "head_event_id"},
		&triplanev1.KvEvent{}:         {"event_id", "stored", "removed", "cleared"},
		&triplanev1.KvBlocksStored{}:  {"block_hashes", "parent_hash"},
		&triplanev1.KvBlocksRemoved{}: {"block_hashes"},
		&triplanev1.KvAllCleared{}:    nil,
		&triplanev1.KvResendRequest{}: {"worker_id", "from_event_id", "to_event_id", "dump_pages", "dump_event_id", "dump_after"},
		&triplanev1.KvResendReply{}:   {"worker_id", "epoch", "range", "dump"},
		&triplanev1.KvEventRange{}:    {"events"},
		&triplanev1.KvDump{}:          {"event_id", "blocks", "more", "after", "total_blocks"},
		&triplanev1.KvDumpBlock{}:     {"hash", "parent_hash"},
	}
	for m, want := range fields {
		var got []string
		fs := m.ProtoReflect().Descriptor().Fields()
		for i := range fs.Len() {
			got = append(got, string(fs.Get(i).Name()))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%T has fields %v, the hand copy knows %v: update sim/copy.go", m, got, want)
		}
	}
	parent := uint64(7)
	stored := func() *triplanev1.KvEvent {
		p := parent
		return &triplanev1.KvEvent{EventId: 3, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2, 3}, ParentHash: &p}}}
	}
	raw := protoreflect.RawFields{0x98, 0x06, 0x01} // field 99, varint 1
	unknown := &triplanev1.KvEventBatch{WorkerId: "w", Epoch: 1}
	unknown.ProtoReflect().SetUnknown(raw)
	unknownEvent, unknownStored := stored(), stored()
	unknownEvent.ProtoReflect().SetUnknown(raw)
	unknownStored.GetStored().ProtoReflect().SetUnknown(raw)
	batches := []*triplanev1.KvEventBatch{
		{},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 9},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{stored()}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{{EventId: 3, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{4}}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{{EventId: 3, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2, 3, 4, 5, 6}}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{{EventId: 3, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 4, Events: []*triplanev1.KvEvent{{EventId: 4, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{5, 6}}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 5, Events: []*triplanev1.KvEvent{stored(), {EventId: 4, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{5, 6}}}},
			{EventId: 5, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2, 3, 4, 5, 6}}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 5, Events: []*triplanev1.KvEvent{{EventId: 5, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 6, Events: []*triplanev1.KvEvent{{EventId: 6}}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 4, Events: []*triplanev1.KvEvent{stored(), {EventId: 4, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}}},
		unknown,
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{unknownEvent}},
		{WorkerId: "w1", Epoch: 2, HeadEventId: 3, Events: []*triplanev1.KvEvent{unknownStored}},
	}
	for i, b := range batches {
		// Heartbeats and stored or removed events (the first eight, the
		// last of them an engine iteration of three) take the hand copy;
		// a cleared event (alone or among others), an event without a
		// kind and unknown fields go through proto.Clone.
		if byHand := copyBatch(b) != nil; byHand != (i < 8) {
			t.Fatalf("batch %d: copied by hand %v", i, byHand)
		}
		c := copyMessage(b).(*triplanev1.KvEventBatch)
		if !proto.Equal(c, b) {
			t.Fatalf("batch %d: copy %v of %v", i, c, b)
		}
		want := proto.Clone(c)
		// Change everything the original holds: the copy must not see it.
		b.WorkerId, b.Epoch, b.HeadEventId = "changed", 99, 99
		for _, e := range b.Events {
			e.EventId = 99
			switch k := e.Kind.(type) {
			case *triplanev1.KvEvent_Stored:
				for i := range k.Stored.BlockHashes {
					k.Stored.BlockHashes[i] = 99
				}
				if k.Stored.ParentHash != nil {
					*k.Stored.ParentHash = 99
				}
			case *triplanev1.KvEvent_Removed:
				k.Removed.BlockHashes[0] = 99
			}
		}
		if len(b.Events) > 0 {
			b.Events[0] = nil
		}
		if !proto.Equal(c, want) {
			t.Fatalf("batch %d: the copy changed with the original: %v, want %v", i, c, want)
		}
	}
}

func TestCopyResends(t *testing.T) {
	p := uint64(5)
	msgs := []proto.Message{
		&triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 3, ToEventId: 9},
		&triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 3, ToEventId: 9, DumpPages: true},
		&triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 3, ToEventId: 9, DumpPages: true, DumpEventId: 7, DumpAfter: proto.Uint64(4)},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{}}},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{Events: []*triplanev1.KvEvent{
			{EventId: 3, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2}, ParentHash: &p}}},
			{EventId: 4, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{1}}}},
		}}}},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{Events: []*triplanev1.KvEvent{
			{EventId: 5, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}, // through proto.Clone
		}}}},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 7, Blocks: []*triplanev1.KvDumpBlock{
			{Hash: 1}, {Hash: 2, ParentHash: &p},
		}}}},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 7, More: true, TotalBlocks: 9,
			Blocks: []*triplanev1.KvDumpBlock{{Hash: 1}, {Hash: 2, ParentHash: &p}}}}},
		&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 2, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 7, After: proto.Uint64(2), TotalBlocks: 3,
			Blocks: []*triplanev1.KvDumpBlock{{Hash: 3}}}}},
	}
	for i, m := range msgs {
		c := copyMessage(m)
		if !proto.Equal(c, m) {
			t.Fatalf("message %d: copy %v of %v", i, c, m)
		}
		want := proto.Clone(c)
		// Change everything the original holds.
		switch x := m.(type) {
		case *triplanev1.KvResendRequest:
			x.WorkerId, x.FromEventId, x.ToEventId, x.DumpPages, x.DumpEventId = "changed", 0, 0, false, 0
			if x.DumpAfter != nil {
				*x.DumpAfter = 99
			}
		case *triplanev1.KvResendReply:
			x.WorkerId, x.Epoch = "changed", 0
			switch r := x.Reply.(type) {
			case *triplanev1.KvResendReply_Range:
				for _, e := range r.Range.Events {
					e.EventId = 99
					if st := e.GetStored(); st != nil {
						st.BlockHashes[0] = 99
						*st.ParentHash = 99
					}
					if rm := e.GetRemoved(); rm != nil {
						rm.BlockHashes[0] = 99
					}
				}
				r.Range.Events = nil
			case *triplanev1.KvResendReply_Dump:
				for _, b := range r.Dump.Blocks {
					b.Hash = 99
					if b.ParentHash != nil {
						*b.ParentHash = 98
					}
				}
				r.Dump.EventId, r.Dump.More, r.Dump.TotalBlocks = 99, !r.Dump.More, 99
				if r.Dump.After != nil {
					*r.Dump.After = 99
				}
			}
			x.Reply = nil
		}
		if !proto.Equal(c, want) {
			t.Fatalf("message %d: the copy changed with the original: %v, want %v", i, c, want)
		}
	}
}

// A load report's hand copy knows its fields, equals proto.Clone's and
// shares nothing; unknown fields go through proto.Clone.
func TestCopyLoadReports(t *testing.T) {
	fields := map[proto.Message][]string{
		&triplanev1.LoadReport{}: {"instance_id", "namespace", "component", "active_requests", "waiting_requests",
			"kv_blocks_used", "kv_blocks_total", "cache_hit_rate", "seq", "sent_at"},
		&timestamppb.Timestamp{}: {"seconds", "nanos"},
	}
	for m, want := range fields {
		var got []string
		fs := m.ProtoReflect().Descriptor().Fields()
		for i := range fs.Len() {
			got = append(got, string(fs.Get(i).Name()))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%T has fields %v, the hand copy knows %v: update sim/copy.go", m, got, want)
		}
	}
	full := func() *triplanev1.LoadReport {
		return &triplanev1.LoadReport{InstanceId: "w1", Namespace: "ns", Component: "c", ActiveRequests: 1, WaitingRequests: 2,
			KvBlocksUsed: 3, KvBlocksTotal: 4, CacheHitRate: 0.5, Seq: 6, SentAt: &timestamppb.Timestamp{Seconds: 7, Nanos: 8}}
	}
	raw := protoreflect.RawFields{0x98, 0x06, 0x01}
	unknown, unknownTime := full(), full()
	unknown.ProtoReflect().SetUnknown(raw)
	unknownTime.SentAt.ProtoReflect().SetUnknown(raw)
	for i, r := range []*triplanev1.LoadReport{{}, {InstanceId: "w"}, full(), unknown, unknownTime} {
		if byHand := copyLoadReport(r) != nil; byHand != (i < 3) {
			t.Fatalf("report %d: copied by hand %v", i, byHand)
		}
		c := copyMessage(r).(*triplanev1.LoadReport)
		if !proto.Equal(c, r) {
			t.Fatalf("report %d: copy %v of %v", i, c, r)
		}
		want := proto.Clone(c)
		r.InstanceId, r.Seq = "changed", 99
		if r.SentAt != nil {
			r.SentAt.Seconds = 99
		}
		if !proto.Equal(c, want) {
			t.Fatalf("report %d: the copy changed with the original: %v, want %v", i, c, want)
		}
	}
}
