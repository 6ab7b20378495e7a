package sim_test

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/sim"
)

func TestBusSubjectsQueueGroupsAndCopies(t *testing.T) {
	w := sim.NewWorld(1)
	b := sim.NewBus(w)
	pub, a, c := b.Client("pub"), b.Client("a"), b.Client("c")
	got := map[string][]string{}
	record := func(who string) func(string, proto.Message) {
		return func(subject string, m proto.Message) {
			got[who] = append(got[who], subject)
			m.(*triplanev1.KvEventBatch).WorkerId = "changed by " + who // a receiver owns its copy
		}
	}
	mustSub := func(cl *sim.BusClient, pattern, group, who string) {
		if _, err := cl.Subscribe(pattern, group, record(who)); err != nil {
			t.Fatal(err)
		}
	}
	mustSub(a, "kv.events.*", "", "star")
	mustSub(a, "kv.>", "", "rest")
	mustSub(a, "kv.events.w1", "q", "q1")
	mustSub(c, "kv.events.w1", "q", "q2")
	msg := &triplanev1.KvEventBatch{WorkerId: "w1", Epoch: 1}
	for range 20 {
		if err := pub.Publish("kv.events.w1", msg); err != nil {
			t.Fatal(err)
		}
	}
	_ = pub.Publish("kv.other.x.y", msg)
	w.RunFor(time.Second)
	if len(got["star"]) != 20 || len(got["rest"]) != 21 || len(got["q1"])+len(got["q2"]) != 20 || len(got["q1"]) == 0 || len(got["q2"]) == 0 {
		t.Fatalf("deliveries %v", map[string]int{"star": len(got["star"]), "rest": len(got["rest"]), "q1": len(got["q1"]), "q2": len(got["q2"])})
	}
	if msg.WorkerId != "w1" {
		t.Fatal("a receiver changed the publisher's message")
	}
	// Bad subjects beside the good ones.
	for _, s := range []string{"", "a..b", "a.*", "a.>", "a.>.b"} {
		if pub.Publish(s, msg) == nil {
			t.Errorf("published on %q", s)
		}
	}
	if _, err := a.Subscribe("a.>.b", "", nil); err == nil {
		t.Error("subscribed to a.>.b")
	}
}

func TestBusPartitionLossAndRequests(t *testing.T) {
	w := sim.NewWorld(2)
	b := sim.NewBus(w)
	srv, cli := b.Client("srv"), b.Client("cli")
	if _, err := srv.Serve("echo", "", func(m proto.Message) (proto.Message, error) {
		r := m.(*triplanev1.KvResendRequest)
		return &triplanev1.KvResendReply{WorkerId: r.WorkerId}, nil
	}); err != nil {
		t.Fatal(err)
	}
	var replies []string
	var errs []error
	ask := func() {
		_ = cli.Request("echo", &triplanev1.KvResendRequest{WorkerId: "w9"}, 50*time.Millisecond, func(m proto.Message, err error) {
			if err != nil {
				errs = append(errs, err)
				return
			}
			replies = append(replies, m.(*triplanev1.KvResendReply).WorkerId)
		})
	}
	ask()
	w.RunFor(100 * time.Millisecond)
	b.Partition("srv", time.Second)
	ask()
	w.RunFor(100 * time.Millisecond)
	_ = cli.Request("nobody.home", &triplanev1.KvResendRequest{}, time.Second, func(_ proto.Message, err error) { errs = append(errs, err) })
	w.RunFor(2 * time.Second)
	ask() // healed
	w.RunFor(100 * time.Millisecond)
	if len(replies) != 2 || replies[0] != "w9" || len(errs) != 2 || !errors.Is(errs[0], sim.ErrTimeout) || !errors.Is(errs[1], sim.ErrNoResponders) {
		t.Fatalf("replies %v, errors %v", replies, errs)
	}
	// Loss and duplication are counted and seeded.
	b.Loss, b.Duplicate = 0.3, 0.3
	lost0, dup0 := b.Lost, b.Duplicated
	n := 0
	sub := b.Client("sub")
	_, _ = sub.Subscribe("x", "", func(string, proto.Message) { n++ })
	for range 1000 {
		_ = cli.Publish("x", &triplanev1.KvEventBatch{})
	}
	w.RunFor(time.Second)
	lost, dup := b.Lost-lost0, b.Duplicated-dup0
	if lost == 0 || dup == 0 || uint64(n) != 1000-lost+dup {
		t.Fatalf("delivered %d, lost %d, duplicated %d", n, lost, dup)
	}
}

// One publisher's messages reach a subscriber in order, as over one NATS
// connection; Reorder (a fault harsher than NATS) lets them overtake.
func TestBusOrderPerPublisher(t *testing.T) {
	for _, reorder := range []bool{false, true} {
		w := sim.NewWorld(3)
		b := sim.NewBus(w)
		b.Reorder = reorder
		var seqs []uint64
		_, _ = b.Client("sub").Subscribe("load.w", "", func(_ string, m proto.Message) { seqs = append(seqs, m.(*triplanev1.LoadReport).Seq) })
		pub := b.Client("w")
		for i := range 50 {
			_ = pub.Publish("load.w", &triplanev1.LoadReport{InstanceId: "w", Seq: uint64(i)})
		}
		w.RunFor(time.Second)
		inOrder := true
		for i := 1; i < len(seqs); i++ {
			inOrder = inOrder && seqs[i] > seqs[i-1]
		}
		if len(seqs) != 50 || inOrder == reorder {
			t.Fatalf("reorder %v: %d delivered, in order %v", reorder, len(seqs), inOrder)
		}
	}
}

// '>' needs at least one token; an unsubscribed handler gets nothing more;
// a duplicated request is answered once.
func TestBusEdges(t *testing.T) {
	w := sim.NewWorld(4)
	b := sim.NewBus(w)
	c := b.Client("c")
	n := 0
	unsub, _ := c.Subscribe("kv.>", "", func(string, proto.Message) { n++ })
	_ = c.Publish("kv", &triplanev1.KvEventBatch{})
	_ = c.Publish("kv.a", &triplanev1.KvEventBatch{})
	w.RunFor(time.Second)
	unsub()
	_ = c.Publish("kv.b", &triplanev1.KvEventBatch{})
	w.RunFor(time.Second)
	if n != 1 {
		t.Fatalf("%d deliveries, want 1 (kv.a)", n)
	}
	b.Duplicate = 1
	_, _ = c.Serve("echo", "", func(m proto.Message) (proto.Message, error) { return m, nil })
	replies := 0
	_ = c.Request("echo", &triplanev1.KvEventBatch{}, time.Second, func(proto.Message, error) { replies++ })
	w.RunFor(2 * time.Second)
	if replies != 1 || b.Duplicated == 0 {
		t.Fatalf("%d replies (duplicated %d)", replies, b.Duplicated)
	}
	if _, err := c.Subscribe("x", "", nil); err == nil {
		t.Fatal("a nil handler was accepted")
	}
	// Malformed subjects are refused, also once other subjects' routes are
	// cached.
	for _, bad := range []string{"", "kv..a", "kv.*", "kv.>", "kv.a."} {
		if err := c.Publish(bad, &triplanev1.KvEventBatch{}); err == nil {
			t.Fatalf("published on %q", bad)
		}
		if err := c.Request(bad, &triplanev1.KvEventBatch{}, time.Second, func(proto.Message, error) {}); err == nil {
			t.Fatalf("requested on %q", bad)
		}
	}
}
