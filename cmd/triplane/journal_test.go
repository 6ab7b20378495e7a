package main

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

// `triplane journal remove-stray` deletes a message the journal did not
// write, after which the actor reads again, and refuses the actor's own
// batches.
func TestJournalRemoveStray(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := planetest.StartNATS(t)
	nc := n.Connect(t)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := actors.NewBatch("c1", time.Now(), []proto.Message{&triplanev1.LedgerDeposited{Amount: 5}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Append(ctx, "ledger", "a", journal.Position{}, b); err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := js.Publish(ctx, j.Subject("ledger", "a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	seq := func(n uint64) string { return strconv.FormatUint(n, 10) }
	cli := func(args ...string) (int, string, string) {
		var out, errb strings.Builder
		code := run(ctx, append(args, "--nats", n.URL()), &out, &errb)
		return code, out.String(), errb.String()
	}
	if code, _, stderr := cli("replay", "events", "ledger", "a"); code == 0 || !strings.Contains(stderr, "triplane journal remove-stray "+seq(ack.Sequence)) {
		t.Fatalf("reading an actor with a stray message: exit %d\n%s", code, stderr)
	}
	if code, _, stderr := cli("journal", "remove-stray", seq(ack.Sequence-1)); code != 1 || !strings.Contains(stderr, "not removed") {
		t.Errorf("removing a batch of events: exit %d\n%s", code, stderr)
	}
	if code, out, stderr := cli("journal", "remove-stray", seq(ack.Sequence)); code != 0 || !strings.Contains(out, "removed message") {
		t.Fatalf("removing the stray message: exit %d\n%s%s", code, out, stderr)
	}
	if code, out, stderr := cli("replay", "events", "ledger", "a"); code != 0 || !strings.Contains(out, "LedgerDeposited") {
		t.Errorf("reading the actor after: exit %d\n%s%s", code, out, stderr)
	}
	if code, _, stderr := cli("journal", "remove-stray", "zero"); code != exitUsage || !strings.Contains(stderr, "positive integer") {
		t.Errorf("a bad sequence: exit %d\n%s", code, stderr)
	}
}
