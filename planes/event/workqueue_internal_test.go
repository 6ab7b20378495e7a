package event

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

// A job dead-lettered twice (its Term lost, so it came back and failed
// again) leaves one dead letter, counted once: the dead-letter stream
// recognises the second copy by its message id.
func TestDeadLetterTwiceKeepsOne(t *testing.T) {
	n := planetest.StartNATS(t)
	b, err := New(n.Connect(t), Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := OpenWorkQueue[*triplanev1.EventProbe](ctx, b, QueueConfig{Namespace: "ns", Component: "c", Name: "jobs"})
	if err != nil {
		t.Fatal(err)
	}
	for _, text := range []string{"a", "b"} {
		if _, err := q.Enqueue(ctx, &triplanev1.EventProbe{Text: text}); err != nil {
			t.Fatal(err)
		}
	}
	batch, err := q.cons.Fetch(2, jetstream.FetchContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != 2 {
		t.Fatalf("fetched %d jobs, want 2", len(msgs))
	}
	for _, m := range msgs {
		md, err := m.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		q.deadLetter(ctx, m, md, "first time")
		q.deadLetter(ctx, m, md, "again: the Term was lost")
	}
	dl, err := q.DeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dl) != 2 || dl[0].Value.GetText() != "a" || dl[1].Value.GetText() != "b" {
		t.Fatalf("dead letters %v, want a and b once each", dl)
	}
	if got := planetest.CounterValue(t, b.metrics.DeadLettered); got != 2 {
		t.Fatalf("dead-lettered counted %v, want 2", got)
	}
}
