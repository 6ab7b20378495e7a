package journal_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

// The tests below follow the Akka persistence journal TCK: replay by range
// and bounds, from > to, unknown actor, highest sequence after deletes,
// concurrent writers, retried appends, atomic multi-event appends, and a
// too-large event.

func open(t *testing.T) (*journal.Journal, context.Context) {
	t.Helper()
	n := planetest.StartNATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return j, ctx
}

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func batch(t *testing.T, at time.Time, amounts ...int64) *triplanev1.EventBatch {
	t.Helper()
	b := &triplanev1.EventBatch{CommandId: fmt.Sprint("cmd-", amounts), TimeUnixNanos: at.UnixNano()}
	for _, a := range amounts {
		p, err := anypb.New(&triplanev1.LedgerDeposited{Amount: a})
		if err != nil {
			t.Fatal(err)
		}
		b.Events = append(b.Events, &triplanev1.Event{Payload: p})
	}
	return b
}

// appendN appends n single-event batches, one second apart, amounts 1..n.
func appendN(t *testing.T, ctx context.Context, j *journal.Journal, kind, id string, n int) journal.Position {
	t.Helper()
	pos, err := j.Highest(ctx, kind, id)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		if pos, err = j.Append(ctx, kind, id, pos, batch(t, t0.Add(time.Duration(i)*time.Second), int64(i))); err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	return pos
}

func seqs(t *testing.T, ctx context.Context, j *journal.Journal, kind, id string, q journal.Query) []uint64 {
	t.Helper()
	var out []uint64
	err := j.Read(ctx, kind, id, q, func(r *journal.Record) error {
		ev, err := r.Decode()
		if err != nil {
			return err
		}
		if got := ev.(*triplanev1.LedgerDeposited).Amount; r.Seq <= 5 && got != int64(r.Seq) {
			t.Errorf("event %d holds amount %d", r.Seq, got)
		}
		out = append(out, r.Seq)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestReplayByRangeAndBounds(t *testing.T) {
	j, ctx := open(t)
	pos := appendN(t, ctx, j, "ledger", "a", 5)
	if pos.Seq != 5 {
		t.Fatalf("position after 5 appends = %+v", pos)
	}
	for _, tc := range []struct {
		name string
		q    journal.Query
		want string
	}{
		{"all", journal.Query{}, "[1 2 3 4 5]"},
		{"range", journal.Query{FromSeq: 2, ToSeq: 4}, "[2 3 4]"},
		{"single", journal.Query{FromSeq: 3, ToSeq: 3}, "[3]"},
		{"to past highest", journal.Query{FromSeq: 4, ToSeq: 100}, "[4 5]"},
		{"from past highest", journal.Query{FromSeq: 6}, "[]"},
		{"from > to", journal.Query{FromSeq: 4, ToSeq: 2}, "[]"},
		{"since time", journal.Query{Since: t0.Add(4 * time.Second)}, "[4 5]"},
		{"until time", journal.Query{Until: t0.Add(3 * time.Second)}, "[1 2]"},
		{"after stream position", journal.Query{AfterStream: 2}, "[3 4 5]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "a", tc.q)); got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestUnknownActor(t *testing.T) {
	j, ctx := open(t)
	pos, err := j.Highest(ctx, "ledger", "nobody")
	if err != nil || pos != (journal.Position{}) {
		t.Fatalf("highest of an unknown actor = %+v, %v; want zero", pos, err)
	}
	if got := seqs(t, ctx, j, "ledger", "nobody", journal.Query{}); len(got) != 0 {
		t.Fatalf("read of an unknown actor = %v", got)
	}
}

func TestHighestKeptAfterDeletes(t *testing.T) {
	j, ctx := open(t)
	appendN(t, ctx, j, "ledger", "d", 5)
	if err := j.DeleteTo(ctx, "ledger", "d", 3); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "d", journal.Query{})); got != "[4 5]" {
		t.Errorf("after delete to 3, read %s", got)
	}
	// A deletion to a lower sequence deletes nothing more, whether the
	// last message is the marker or an event after it.
	if err := j.DeleteTo(ctx, "ledger", "d", 1); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "d", journal.Query{})); got != "[4 5]" {
		t.Errorf("after a second delete to 1, read %s", got)
	}
	appendN(t, ctx, j, "ledger", "e", 5)
	if err := j.DeleteTo(ctx, "ledger", "e", 3); err != nil {
		t.Fatal(err)
	}
	pe, err := j.Highest(ctx, "ledger", "e")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Append(ctx, "ledger", "e", pe, batch(t, t0, 6)); err != nil {
		t.Fatal(err)
	}
	if err := j.DeleteTo(ctx, "ledger", "e", 1); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "e", journal.Query{})); got != "[4 5 6]" {
		t.Errorf("after delete to 3, an append and a delete to 1, read %s", got)
	}
	if err := j.DeleteTo(ctx, "ledger", "d", 100); err != nil {
		t.Fatal(err)
	}
	pos, err := j.Highest(ctx, "ledger", "d")
	if err != nil || pos.Seq != 5 {
		t.Fatalf("highest after deleting everything = %+v %v, want 5", pos, err)
	}
	if got := seqs(t, ctx, j, "ledger", "d", journal.Query{}); len(got) != 0 {
		t.Errorf("read after deleting everything = %v", got)
	}
	// Writing goes on from the kept highest sequence.
	pos, err = j.Append(ctx, "ledger", "d", pos, batch(t, t0, 6))
	if err != nil || pos.Seq != 6 {
		t.Fatalf("append after deletes = %+v %v, want seq 6", pos, err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "d", journal.Query{})); got != "[6]" {
		t.Errorf("read after append = %s", got)
	}
}

func TestConcurrentWritersRejected(t *testing.T) {
	j, ctx := open(t)
	pos := appendN(t, ctx, j, "ledger", "c", 2)
	// Two writers both believe they own the actor at pos.
	if _, err := j.Append(ctx, "ledger", "c", pos, batch(t, t0, 3)); err != nil {
		t.Fatal(err)
	}
	_, err := j.Append(ctx, "ledger", "c", pos, batch(t, t0, 33, 34))
	if !errors.Is(err, journal.ErrConflict) {
		t.Fatalf("second writer: %v, want ErrConflict", err)
	}
	// A writer that never read the actor (expects it empty) is refused too.
	_, err = j.Append(ctx, "ledger", "c", journal.Position{}, batch(t, t0, 99))
	if !errors.Is(err, journal.ErrConflict) {
		t.Fatalf("stale writer: %v, want ErrConflict", err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "c", journal.Query{})); got != "[1 2 3]" {
		t.Errorf("journal = %s, want [1 2 3]", got)
	}
}

func TestRetriedAppendDeduplicated(t *testing.T) {
	j, ctx := open(t)
	pos := appendN(t, ctx, j, "ledger", "r", 1)
	b := batch(t, t0, 2)
	first, err := j.Append(ctx, "ledger", "r", pos, b)
	if err != nil {
		t.Fatal(err)
	}
	// The same append again, as after a lost acknowledgement.
	again, err := j.Append(ctx, "ledger", "r", pos, proto.Clone(b).(*triplanev1.EventBatch))
	if err != nil {
		t.Fatalf("retried append: %v", err)
	}
	if again != first {
		t.Errorf("retry returned %+v, first append %+v", again, first)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "r", journal.Query{})); got != "[1 2]" {
		t.Errorf("journal = %s, want [1 2]", got)
	}
}

func TestAtomicMultiEventAppend(t *testing.T) {
	j, ctx := open(t)
	pos, err := j.Append(ctx, "ledger", "m", journal.Position{}, batch(t, t0, 1, 2, 3))
	if err != nil || pos.Seq != 3 {
		t.Fatalf("append of 3 events = %+v %v", pos, err)
	}
	var streamSeqs []uint64
	var last []bool
	err = j.Read(ctx, "ledger", "m", journal.Query{}, func(r *journal.Record) error {
		streamSeqs = append(streamSeqs, r.StreamSeq)
		last = append(last, r.LastInBatch)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(streamSeqs) != 3 || streamSeqs[0] != streamSeqs[2] || fmt.Sprint(last) != "[false false true]" {
		t.Errorf("events should share one message: stream seqs %v, last %v", streamSeqs, last)
	}
	// A conflicting multi-event append writes none of its events.
	_, err = j.Append(ctx, "ledger", "m", journal.Position{}, batch(t, t0, 7, 8))
	if !errors.Is(err, journal.ErrConflict) {
		t.Fatalf("conflicting append: %v", err)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "m", journal.Query{})); got != "[1 2 3]" {
		t.Errorf("journal = %s", got)
	}
}

func TestLargeEventRefused(t *testing.T) {
	j, ctx := open(t)
	big, err := anypb.New(&triplanev1.NodeIdentity{NodeId: string(make([]byte, j.MaxPayload()))})
	if err != nil {
		t.Fatal(err)
	}
	_, err = j.Append(ctx, "ledger", "big", journal.Position{}, &triplanev1.EventBatch{Events: []*triplanev1.Event{{Payload: big}}})
	if !errors.Is(err, journal.ErrTooLarge) {
		t.Fatalf("large event: %v, want ErrTooLarge", err)
	}
	t.Logf("error says: %v", err)
	if pos, _ := j.Highest(ctx, "ledger", "big"); pos.Seq != 0 {
		t.Errorf("large event was written: %+v", pos)
	}
}

func TestBadNames(t *testing.T) {
	j, ctx := open(t)
	for _, name := range [][2]string{{"", "x"}, {"ledger", ""}, {"led.ger", "x"}, {"ledger", "a.b"}, {"ledger", "a*"}, {"ledger", "a b"}, {"ledger", ">"}} {
		_, err := j.Append(ctx, name[0], name[1], journal.Position{}, batch(t, t0, 1))
		if !errors.Is(err, journal.ErrBadName) {
			t.Errorf("append to %q/%q: %v, want ErrBadName", name[0], name[1], err)
		}
	}
}

func TestActorsAndUnknownEventType(t *testing.T) {
	j, ctx := open(t)
	appendN(t, ctx, j, "ledger", "x", 2)
	appendN(t, ctx, j, "ledger", "y", 1)
	bad := &triplanev1.EventBatch{Events: []*triplanev1.Event{{Payload: &anypb.Any{TypeUrl: "type.googleapis.com/triplane.v1.NoSuchEvent", Value: []byte{1}}}}}
	if _, err := j.Append(ctx, "other", "z", journal.Position{}, bad); err != nil {
		t.Fatal(err)
	}
	actors, err := j.Actors(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%s/%s@%d of %d", actors[0].Kind, actors[0].ID, actors[0].Highest, len(actors)); got != "ledger/x@2 of 3" {
		t.Errorf("actors = %+v", actors)
	}
	err = j.Read(ctx, "other", "z", journal.Query{}, func(r *journal.Record) error {
		_, err := r.Decode()
		return err
	})
	var de *journal.DecodeError
	if !errors.As(err, &de) || de.Subject != "triplane.journal.other.z" || de.Seq != 1 {
		t.Fatalf("unknown event type: %v", err)
	}
}

// A message on an actor's subject that the journal did not write for it
// (an empty publish, another actor's batch) is an error where it is read,
// never the actor's end: an empty message would parse as highest sequence
// 0, and the actor would recover empty and append over its history.
func TestForeignMessageOnAnActorsSubject(t *testing.T) {
	n := planetest.StartNATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nc := n.Connect(t)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, ctx, j, "ledger", "a", 3)
	pb := appendN(t, ctx, j, "ledger", "b", 1)
	other, err := proto.Marshal(&triplanev1.EventBatch{Kind: "ledger", ActorId: "b", HighestSeq: 1,
		Events: []*triplanev1.Event{{Seq: 1, Payload: batch(t, t0, 1).Events[0].Payload}}})
	if err != nil {
		t.Fatal(err)
	}
	for id, data := range map[string][]byte{"empty": nil, "copy-of-b": other} {
		appendN(t, ctx, j, "ledger", id, 2)
		if _, err := js.Publish(ctx, j.Subject("ledger", id), data); err != nil {
			t.Fatal(err)
		}
		var de *journal.DecodeError
		if _, err := j.Highest(ctx, "ledger", id); !errors.As(err, &de) {
			t.Errorf("%s: highest: %v, want a DecodeError", id, err)
		}
		err := j.Read(ctx, "ledger", id, journal.Query{}, func(*journal.Record) error { return nil })
		if !errors.As(err, &de) {
			t.Errorf("%s: read: %v, want a DecodeError", id, err)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("triplane journal remove-stray %d", de.StreamSeq)) {
			t.Errorf("%s: the error does not say how to remove the message: %v", id, err)
		}
		if err := j.DeleteTo(ctx, "ledger", id, 1); !errors.As(err, &de) {
			t.Errorf("%s: delete: %v, want a DecodeError", id, err)
		}
		// A batch of events is not removed; the stray message is, and the
		// actor reads again.
		if _, err := j.RemoveStray(ctx, de.StreamSeq-1); !errors.Is(err, journal.ErrNotStray) {
			t.Errorf("%s: removing a batch of events: %v, want ErrNotStray", id, err)
		}
		if what, err := j.RemoveStray(ctx, de.StreamSeq); err != nil || !strings.Contains(what, j.Subject("ledger", id)) {
			t.Fatalf("%s: remove the stray message: %q %v", id, what, err)
		}
		if got := seqs(t, ctx, j, "ledger", id, journal.Query{}); len(got) != 2 {
			t.Errorf("%s: after the stray message went, reads %v", id, got)
		}
	}
	if got, err := j.Highest(ctx, "ledger", "b"); err != nil || got != pb {
		t.Errorf("the actor whose batch was copied: %v %v", got, err)
	}
	if got := seqs(t, ctx, j, "ledger", "a", journal.Query{}); len(got) != 3 {
		t.Errorf("an actor nobody wrote to reads %v", got)
	}
}

// A time-bounded read is a prefix of the journal: a command whose time is
// earlier than the one before it (its node's clock behind) after the bound
// is not read, and leaves no gap.
func TestUntilIsAPrefixWhenClocksGoBack(t *testing.T) {
	j, ctx := open(t)
	pos := journal.Position{}
	var err error
	for i, at := range []time.Duration{1500 * time.Millisecond, 10 * time.Second, 5 * time.Second} {
		if pos, err = j.Append(ctx, "ledger", "a", pos, batch(t, t0.Add(at), int64(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "a", journal.Query{Until: t0.Add(6 * time.Second)})); got != "[1]" {
		t.Fatalf("until 6s: %s, want [1] (seq 3 at 5s follows seq 2 at 10s)", got)
	}
	if got := fmt.Sprint(seqs(t, ctx, j, "ledger", "a", journal.Query{Until: t0.Add(11 * time.Second)})); got != "[1 2 3]" {
		t.Fatalf("until 11s: %s", got)
	}
}
