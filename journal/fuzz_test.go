package journal

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// FuzzDecodeSnapshot: whatever bytes the snapshot store returns, decoding
// fails cleanly or yields a snapshot; it never panics.
func FuzzDecodeSnapshot(f *testing.F) {
	st, _ := anypb.New(&triplanev1.LedgerState{Balance: 7})
	good, _ := proto.Marshal(&triplanev1.Snapshot{Kind: "ledger", ActorId: "a", Seq: 3, State: st})
	f.Add(append([]byte{0, 0, 0, 0}, good...))
	f.Add([]byte{})
	f.Add([]byte("\x00\x00\x00\x00garbage"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeSnapshot(b)
		if err == nil && s == nil {
			t.Fatal("nil snapshot without an error")
		}
	})
}

// FuzzDecodeBatch: a journal message of any content decodes or fails
// cleanly, and decoding its events never panics.
func FuzzDecodeBatch(f *testing.F) {
	p, _ := anypb.New(&triplanev1.LedgerDeposited{Amount: 1})
	good, _ := proto.Marshal(&triplanev1.EventBatch{Kind: "ledger", ActorId: "a", HighestSeq: 1,
		Events: []*triplanev1.Event{{Seq: 1, Payload: p}}})
	f.Add(good)
	f.Add([]byte{0xff, 0xff})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		batch, err := decodeBatch(b, "ledger", "a")
		if err != nil {
			return
		}
		if batch.HighestSeq == 0 || batch.Kind != "ledger" || batch.ActorId != "a" {
			t.Fatalf("accepted %v", batch)
		}
		for _, e := range batch.Events {
			r := &Record{Subject: "s", Seq: e.Seq, Payload: e.Payload}
			_, _ = r.Decode()
			_ = r.Type()
		}
	})
}
