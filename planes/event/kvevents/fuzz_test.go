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
	for _, m := range []proto.Message{batch, reply, &triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 1, ToEventId: 5}} {
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
