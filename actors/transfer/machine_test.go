package transfer

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// step decides cmd on s, applies the events, and returns the decision.
func step(t *testing.T, s *triplanev1.TransferState, msg proto.Message) actors.Decision {
	t.Helper()
	d := Machine{}.Decide(s, actors.Command{Msg: msg, Now: time.Unix(100, 0)})
	for _, e := range d.Events {
		if err := (Machine{}).Apply(s, e); err != nil {
			t.Fatal(err)
		}
	}
	if d.Err == nil && d.Reply != nil && !proto.Equal(d.Reply, s) {
		t.Fatalf("reply %v differs from the state after applying %v", d.Reply, s)
	}
	return d
}

func TestMachineLifecycle(t *testing.T) {
	s := Machine{}.Initial("t1").(*triplanev1.TransferState)
	if d := step(t, s, &triplanev1.TransferAck{From: 0, To: 1}); !errors.Is(d.Err, ErrNotRunning) {
		t.Fatalf("ack before start: %v", d.Err)
	}
	if d := step(t, s, &triplanev1.TransferStart{Blocks: 0, BlockSize: 1}); d.Err == nil {
		t.Fatal("empty transfer started")
	}
	if d := step(t, s, &triplanev1.TransferStart{Blocks: 10, BlockSize: 4, MaxAttempts: 1000}); d.Err == nil {
		t.Fatal("unbounded attempts accepted")
	}
	step(t, s, &triplanev1.TransferStart{Blocks: 10, BlockSize: 4, MaxAttempts: 3})
	if d := step(t, s, &triplanev1.TransferStart{Blocks: 10, BlockSize: 4}); d.Err != nil || len(d.Events) != 0 {
		t.Fatalf("restart of the same session: %v %v", d.Err, d.Events)
	}
	if d := step(t, s, &triplanev1.TransferStart{Blocks: 11, BlockSize: 4}); d.Err == nil {
		t.Fatal("restart with other parameters accepted")
	}
	step(t, s, &triplanev1.TransferAck{From: 0, To: 4})
	if d := step(t, s, &triplanev1.TransferAck{From: 5, To: 6}); d.Err == nil {
		t.Fatal("gap accepted")
	}
	if d := step(t, s, &triplanev1.TransferAck{From: 0, To: 11}); d.Err == nil {
		t.Fatal("ack past the end accepted")
	}
	if d := step(t, s, &triplanev1.TransferAck{From: 0, To: 2}); d.Err != nil || len(d.Events) != 0 {
		t.Fatalf("repeated ack: %v %v", d.Err, d.Events)
	}
	step(t, s, &triplanev1.TransferAttemptFailed{Error: "reset"})
	if s.Status != triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING || s.Attempts != 1 || s.Acked != 4 || s.Bytes != 16 {
		t.Fatalf("after one failure: %v", s)
	}
	step(t, s, &triplanev1.TransferAck{From: 2, To: 10}) // overlapping ack
	if s.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || s.Acked != 10 || s.EndedUnixNano != time.Unix(100, 0).UnixNano() {
		t.Fatalf("not completed: %v", s)
	}
	if d := step(t, s, &triplanev1.TransferCancel{Reason: "late"}); d.Err != nil || len(d.Events) != 0 {
		t.Fatalf("cancel after completion: %v %v", d.Err, d.Events)
	}
}

func TestMachineGivesUpAndCancels(t *testing.T) {
	s := Machine{}.Initial("t2").(*triplanev1.TransferState)
	step(t, s, &triplanev1.TransferStart{Blocks: 3, BlockSize: 4, MaxAttempts: 2})
	step(t, s, &triplanev1.TransferAttemptFailed{Error: "a"})
	step(t, s, &triplanev1.TransferAttemptFailed{Error: "b"})
	if s.Status != triplanev1.TransferStatus_TRANSFER_STATUS_FAILED || s.Attempts != 2 || s.Error != "b" {
		t.Fatalf("did not give up: %v", s)
	}
	if d := step(t, s, &triplanev1.TransferAttemptFailed{Error: "c"}); !errors.Is(d.Err, ErrNotRunning) {
		t.Fatalf("failure after giving up: %v", d.Err)
	}
	c := Machine{}.Initial("t3").(*triplanev1.TransferState)
	step(t, c, &triplanev1.TransferStart{Blocks: 3, BlockSize: 4})
	step(t, c, &triplanev1.TransferCancel{Reason: "client left"})
	if c.Status != triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED || c.MaxAttempts != DefaultMaxAttempts {
		t.Fatalf("not cancelled: %v", c)
	}
	if err := (Machine{}).Apply(c, &triplanev1.LedgerDeposited{}); err == nil {
		t.Fatal("foreign event applied")
	}
	if d := (Machine{}).Decide(c, actors.Command{Msg: &triplanev1.LedgerGet{}}); d.Err == nil {
		t.Fatal("foreign command accepted")
	}
}

// An ack retried after its first append was written (and completed the
// session) is answered, not refused: the simulator's transfer scenario
// found that the refusal failed a finished transfer.
func TestRepeatedAckAfterCompletion(t *testing.T) {
	s := Machine{}.Initial("t2").(*triplanev1.TransferState)
	step(t, s, &triplanev1.TransferStart{Blocks: 4, BlockSize: 8, MaxAttempts: 3})
	step(t, s, &triplanev1.TransferAck{From: 0, To: 4})
	if s.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
		t.Fatalf("status %s", s.Status)
	}
	if d := step(t, s, &triplanev1.TransferAck{From: 0, To: 4}); d.Err != nil || len(d.Events) != 0 {
		t.Fatalf("repeated ack after completion: %v, %d events", d.Err, len(d.Events))
	}
	if d := step(t, s, &triplanev1.TransferAck{From: 0, To: 5}); d.Err == nil {
		t.Fatal("ack past the blocks accepted")
	}
}
