package kvevents_test

import (
	"testing"

	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

// FuzzDecodeKvEvents decodes arbitrary bytes as the KV event stream's wire
// messages and validates them: errors, never panics.
func FuzzDecodeKvEvents(f *testing.F) {
	batch := &triplanev1.KvEventBatch{WorkerId: "w1", Epoch: 1, HeadEventId: 2, Events: []*triplanev1.KvEvent{
		{EventId: 1, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2}, ParentHash: proto.Uint64(9)}}},
		{EventId: 2, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{1}}}},
	}}
	reply := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 2,
		Blocks: []*triplanev1.KvDumpBlock{{Hash: 2, ParentHash: proto.Uint64(9)}}}}}
	page := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 2,
		More: true, After: proto.Uint64(1), TotalBlocks: 3, Blocks: []*triplanev1.KvDumpBlock{{Hash: 2, ParentHash: proto.Uint64(9)}}}}}
	pageReq := &triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 1, ToEventId: 5, DumpPages: true, DumpEventId: 2, DumpAfter: proto.Uint64(1)}
	// A one-reply dump whose total is not its number of blocks.
	wrongTotal := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 2,
		TotalBlocks: 5, Blocks: []*triplanev1.KvDumpBlock{{Hash: 2}}}}}
	for _, m := range []proto.Message{batch, reply, page, wrongTotal, &triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 1, ToEventId: 5}, pageReq} {
		data, _ := proto.Marshal(m)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if b, err := event.Decode[*triplanev1.KvEventBatch](data); err == nil {
			_ = kvevents.ValidateBatch(b)
		}
		if r, err := event.Decode[*triplanev1.KvResendReply](data); err == nil {
			_ = kvevents.ValidateReply(r)
		}
		_, _ = event.Decode[*triplanev1.KvResendRequest](data)
	})
}

// framed cuts messages the way FuzzSequencerAndLog reads them: a byte
// saying the length (1..64, as length-1), then the message.
func framed(msgs ...[]byte) []byte {
	var out []byte
	for _, m := range msgs {
		if len(m) == 0 || len(m) > 64 {
			panic("a fuzz seed's message must be 1..64 bytes")
		}
		out = append(append(out, byte(len(m)-1)), m...)
	}
	return out
}

// FuzzSequencerAndLog feeds a Sequencer whatever comes off the wire: each
// input is cut into messages decoded as batches (ingested) or resend
// replies (handed to a repair: dump pages among them), and a Log answers
// resend requests built from fuzzed ranges and dump cursors (from's low
// bits: take pages, continue the dump at to after from), then repairs
// the Sequencer's view of it in pages of a few blocks. Nothing panics,
// the workers tracked stay within their bound, a paged dump never keeps
// more than the bound of blocks, and a view saved and restored is the
// same view.
func FuzzSequencerAndLog(f *testing.F) {
	batch := &triplanev1.KvEventBatch{WorkerId: "w1", Epoch: 1, HeadEventId: 3, Events: []*triplanev1.KvEvent{
		{EventId: 2, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{1, 2}}}},
		{EventId: 3, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{1}}}},
	}}
	dump := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 3,
		Blocks: []*triplanev1.KvDumpBlock{{Hash: 2}}}}}
	page1 := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 3,
		More: true, TotalBlocks: 2, Blocks: []*triplanev1.KvDumpBlock{{Hash: 2}}}}}
	page2 := &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 3,
		After: proto.Uint64(2), TotalBlocks: 2, Blocks: []*triplanev1.KvDumpBlock{{Hash: 5}}}}}
	b, _ := proto.Marshal(batch)
	d, _ := proto.Marshal(dump)
	p1, _ := proto.Marshal(page1)
	p2, _ := proto.Marshal(page2)
	f.Add(framed(b), uint64(1), uint64(3))
	f.Add(framed(b, d), uint64(0), uint64(1<<40))
	f.Add(framed(b, p1, p2), uint64(1), uint64(3))
	f.Add(framed(b, p1, p1, p2), uint64(3), uint64(3))
	f.Fuzz(func(t *testing.T, data []byte, from, to uint64) {
		const maxPending, maxBlocks = 8, 64
		s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxPending: maxPending, MaxWorkers: 4, MaxBlocksPerWorker: maxBlocks})
		log := kvevents.NewLog("w1", 1, 4, 2, nil)
		for len(data) > 0 {
			n := int(data[0])%64 + 1
			data = data[1:]
			msg := data[:min(n, len(data))]
			data = data[len(msg):]
			if b, err := event.Decode[*triplanev1.KvEventBatch](msg); err == nil {
				_, _ = s.Ingest(b)
				for _, e := range b.GetEvents() {
					if e.GetKind() != nil && log.Last() < 256 {
						log.Append(proto.Clone(e).(*triplanev1.KvEvent))
					}
				}
			}
			if r, err := event.Decode[*triplanev1.KvResendReply](msg); err == nil {
				for _, w := range s.Workers() {
					if _, epoch, ok := s.RepairRequest(w); ok {
						_ = s.RepairDone(w, epoch, r, nil)
					}
				}
			}
		}
		req := &triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: from, ToEventId: to, DumpPages: from&1 != 0}
		if from&2 != 0 {
			req.DumpEventId, req.DumpAfter = to, proto.Uint64(from)
		}
		if r := log.Resend(req, int64(from%256)); kvevents.ValidateReply(r) != nil {
			t.Fatalf("the log's answer to %v is invalid: %v", req, kvevents.ValidateReply(r))
		}
		// The Sequencer repairs its view of the log in pages of a few
		// blocks (the log's epoch is 1: a view of another epoch stays as
		// it is, its requests answered with another epoch's replies).
		if _, err := s.Ingest(log.Heartbeat()); err == nil {
			for range 64 {
				req, epoch, ok := s.RepairRequest("w1")
				if !ok {
					break
				}
				if res := s.RepairDone("w1", epoch, log.Resend(req, 48), nil); res.Next != kvevents.RepairAgain && res.Next != kvevents.RepairAfterBackoff {
					break
				}
			}
		}
		if blocks, _ := s.Blocks("w1"); len(blocks) > maxBlocks {
			t.Fatalf("%d blocks kept, bound %d", len(blocks), maxBlocks)
		}
		if len(s.Workers()) > 4 {
			t.Fatalf("%d workers tracked, bound 4", len(s.Workers()))
		}
		view := s.View()
		again := kvevents.NewSequencer(kvevents.SequencerConfig{MaxPending: maxPending, MaxWorkers: 4})
		again.Restore(view)
		if !proto.Equal(again.View(), view) {
			t.Fatal("a restored view differs from the saved one")
		}
	})
}
