package kvevents_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/embedded"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
	"github.com/triplane-dev/triplane/planetest"
)

func newBus(t *testing.T, nc *nats.Conn) *event.Bus {
	t.Helper()
	b, err := event.New(nc, event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// relay carries batches from the worker's raw subject to the subject the
// consumer listens on, dropping, holding back (to reorder) and duplicating
// some on purpose, from a seeded source.
type relay struct {
	mu                 sync.Mutex
	rng                *rand.Rand
	out                *event.Bus
	to                 string
	held               []*triplanev1.KvEventBatch
	lossy              bool
	dropped, reordered int
	seen               int
}

func (r *relay) forward(b *triplanev1.KvEventBatch) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.lossy {
		_ = event.Publish(r.out, r.to, b)
		return
	}
	// A burst of 100 consecutive losses: longer than a small ring, so the
	// repair of it needs a dump.
	r.seen++
	if r.seen > 500 && r.seen <= 600 {
		r.dropped++
		return
	}
	switch x := r.rng.IntN(100); {
	case x < 20:
		r.dropped++
	case x < 35:
		r.held = append(r.held, b)
		r.reordered++
	case x < 40:
		_ = event.Publish(r.out, r.to, b)
		_ = event.Publish(r.out, r.to, b)
	default:
		_ = event.Publish(r.out, r.to, b)
	}
	// Release held batches late and shuffled.
	if len(r.held) > 5 && r.rng.IntN(4) == 0 {
		r.rng.Shuffle(len(r.held), func(i, j int) { r.held[i], r.held[j] = r.held[j], r.held[i] })
		for _, h := range r.held {
			_ = event.Publish(r.out, r.to, h)
		}
		r.held = r.held[:0]
	}
}

// heal stops losing messages and releases what was held.
func (r *relay) heal() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lossy = false
	for _, h := range r.held {
		_ = event.Publish(r.out, r.to, h)
	}
	r.held = nil
}

func startRelay(t *testing.T, b *event.Bus, from, to string, seed uint64) *relay {
	r := &relay{rng: rand.New(rand.NewPCG(seed, 1)), out: b, to: to, lossy: true}
	if _, err := event.Subscribe(b, from, r.forward); err != nil {
		t.Fatal(err)
	}
	return r
}

// workload applies n random cache operations through p, one call each,
// or when batched as engine iterations of 1 to 6 through PublishAll.
func workload(t *testing.T, p *kvevents.Publisher, rng *rand.Rand, n int, batched bool) {
	t.Helper()
	var live []uint64
	next := uint64(1)
	if batched {
		for n > 0 {
			k := min(n, 1+rng.IntN(6))
			events := make([]*triplanev1.KvEvent, k)
			for i := range events {
				events[i] = randomEvent(rng, &live, &next)
			}
			if err := p.PublishAll(events); err != nil {
				t.Fatal(err)
			}
			n -= k
		}
		return
	}
	for range n {
		var err error
		switch x := rng.IntN(100); {
		case x < 60 || len(live) == 0:
			k := 1 + rng.IntN(4)
			hashes := make([]uint64, k)
			for i := range hashes {
				hashes[i] = next
				next++
			}
			var parent *uint64
			if len(live) > 0 && rng.IntN(2) == 0 {
				parent = proto.Uint64(live[rng.IntN(len(live))])
			}
			live = append(live, hashes...)
			err = p.Stored(hashes, parent)
		case x < 97:
			i := rng.IntN(len(live))
			err = p.Removed([]uint64{live[i]})
			live = append(live[:i], live[i+1:]...)
		default:
			live = nil
			err = p.Cleared()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func converge(t *testing.T, c *kvevents.Consumer, p *kvevents.Publisher, worker string) {
	t.Helper()
	planetest.Poll(t, 20*time.Second, time.Millisecond, func() bool {
		got, last := c.Blocks(worker)
		return last == p.LastEventID() && maps.Equal(got, p.Blocks())
	}, func() string {
		got, last := c.Blocks(worker)
		return fmt.Sprintf("consumer at event %d with %d blocks, worker at %d with %d blocks; stats %v",
			last, len(got), p.LastEventID(), len(p.Blocks()), c.Stats())
	})
}

func TestConsumerConvergesThroughLossAndReordering(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ring    int
		seed    uint64
		batched bool
	}{
		{"ring holds the gaps (resends)", 4096, 1, false},
		{"small ring (dumps)", 8, 2, false},
		// An engine iteration's events in one batch: a lost batch is a
		// gap of several events.
		{"batches of several events (resends)", 4096, 3, true},
		{"batches of several events (dumps)", 8, 4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := planetest.StartNATS(t)
			b := newBus(t, n.Connect(t))
			raw := "test.raw.w1"
			to, err := kvevents.EventsSubject(b, "ns", "w1")
			if err != nil {
				t.Fatal(err)
			}
			r := startRelay(t, newBus(t, n.Connect(t)), raw, to, tc.seed)
			c, err := kvevents.NewConsumer(newBus(t, n.Connect(t)), kvevents.ConsumerConfig{Namespace: "ns", MaxPending: 64, RepairBackoff: 5 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := b.Conn().Flush(); err != nil {
				t.Fatal(err)
			}
			p, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w1", Namespace: "ns", Epoch: 1,
				RingSize: tc.ring, MaxResend: 50, HeartbeatInterval: 10 * time.Millisecond, Subject: raw})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			workload(t, p, rand.New(rand.NewPCG(tc.seed, 2)), 2000, tc.batched)
			// Heartbeats still pass through the lossy relay: the tail is
			// repaired without its help.
			converge(t, c, p, "w1")
			r.heal()
			workload(t, p, rand.New(rand.NewPCG(tc.seed, 3)), 100, tc.batched)
			converge(t, c, p, "w1")
			s := c.Stats()
			t.Logf("relay dropped %d, reordered %d; consumer %v", r.dropped, r.reordered, s)
			if s.Gaps == 0 || r.dropped == 0 {
				t.Fatalf("the test lost nothing: %v", s)
			}
			if tc.ring < 100 && s.Dumps == 0 {
				t.Fatalf("a ring of %d should have forced dumps: %v", tc.ring, s)
			}
			if tc.ring >= 4096 && s.Resends == 0 {
				t.Fatalf("no resends: %v", s)
			}
		})
	}
}

func TestLateConsumerAndWorkerRestart(t *testing.T) {
	n := planetest.StartNATS(t)
	nc := n.Connect(t)
	b := newBus(t, nc)
	p, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w2", Namespace: "ns", Epoch: 10,
		RingSize: 16, HeartbeatInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	workload(t, p, rand.New(rand.NewPCG(7, 7)), 300, false)
	// Publishes are buffered in the client: without a round trip the
	// server may get them after the consumer below subscribed, which then
	// sees every event and needs no dump (1 run in 50 did).
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// A router that starts now learns the worker's blocks from a dump,
	// prompted by a heartbeat.
	var resets int
	var mu sync.Mutex
	c, err := kvevents.NewConsumer(newBus(t, n.Connect(t)), kvevents.ConsumerConfig{Namespace: "ns",
		OnReset: func(string, map[uint64]kvevents.Block, uint64) { mu.Lock(); resets++; mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	converge(t, c, p, "w2")
	if c.Stats().Dumps == 0 {
		t.Fatalf("late consumer without a dump: %v", c.Stats())
	}
	// The worker restarts: a new epoch, ids from 1, an empty cache.
	p.Close()
	p2, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w2", Namespace: "ns", Epoch: 11,
		RingSize: 16, HeartbeatInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	workload(t, p2, rand.New(rand.NewPCG(8, 8)), 50, false)
	converge(t, c, p2, "w2")
	// Batches of the old epoch are ignored.
	c.Ingest(&triplanev1.KvEventBatch{WorkerId: "w2", Epoch: 10, HeadEventId: 1000,
		Events: []*triplanev1.KvEvent{{EventId: 1000, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}}})
	converge(t, c, p2, "w2")
	if c.Stats().StaleEpoch == 0 {
		t.Fatalf("old epoch not counted: %v", c.Stats())
	}
	mu.Lock()
	defer mu.Unlock()
	if resets < 2 {
		t.Fatalf("%d resets, want the dump and the restart", resets)
	}
}

func TestInvalidBatchesDropped(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t))
	c, err := kvevents.NewConsumer(b, kvevents.ConsumerConfig{Namespace: "ns"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	subject, _ := kvevents.EventsSubject(b, "ns", "w3")
	stored := func(id uint64) *triplanev1.KvEvent {
		return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{id}}}}
	}
	bad := []*triplanev1.KvEventBatch{
		{WorkerId: "", Epoch: 1, HeadEventId: 1, Events: []*triplanev1.KvEvent{stored(1)}},
		{WorkerId: "w3", Epoch: 1, HeadEventId: 3, Events: []*triplanev1.KvEvent{stored(1), stored(3)}},
		{WorkerId: "w3", Epoch: 1, HeadEventId: 1, Events: []*triplanev1.KvEvent{{EventId: 1}}},
		{WorkerId: "w3", Epoch: 1, HeadEventId: 0, Events: []*triplanev1.KvEvent{stored(1)}},
	}
	for _, x := range bad {
		if err := kvevents.ValidateBatch(x); err == nil {
			t.Errorf("ValidateBatch(%v) = nil", x)
		}
		if err := event.Publish(b, subject, x); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Conn().Publish(subject, []byte{0xff}); err != nil {
		t.Fatal(err)
	}
	good := &triplanev1.KvEventBatch{WorkerId: "w3", Epoch: 1, HeadEventId: 1, Events: []*triplanev1.KvEvent{stored(1)}}
	if err := kvevents.ValidateBatch(good); err != nil {
		t.Fatal(err)
	}
	if err := event.Publish(b, subject, good); err != nil {
		t.Fatal(err)
	}
	planetest.Poll(t, 10*time.Second, time.Millisecond, func() bool {
		blocks, last := c.Blocks("w3")
		return last == 1 && len(blocks) == 1
	}, func() string { return fmt.Sprintf("good batch not applied: %v", c.Stats()) })
	if s := c.Stats(); s.Malformed != 5 {
		t.Fatalf("malformed = %d, want 5", s.Malformed)
	}
}

// Replies that decode but break the protocol are refused with ErrInvalid,
// never a panic: a dump or range left nil (only a reply built in process
// holds one), a nil block, and a one-reply dump whose total is not its
// number of blocks.
func TestValidateReplyRefusesNilAndInconsistentDumps(t *testing.T) {
	one := func(total uint64, blocks ...*triplanev1.KvDumpBlock) *triplanev1.KvResendReply {
		return &triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1,
			Reply: &triplanev1.KvResendReply_Dump{Dump: &triplanev1.KvDump{EventId: 3, TotalBlocks: total, Blocks: blocks}}}
	}
	for _, bad := range []*triplanev1.KvResendReply{
		{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Dump{}},
		{WorkerId: "w1", Epoch: 1, Reply: &triplanev1.KvResendReply_Range{}},
		one(0, &triplanev1.KvDumpBlock{Hash: 1}, nil),
		one(3, &triplanev1.KvDumpBlock{Hash: 1}, &triplanev1.KvDumpBlock{Hash: 2}),
		one(1, &triplanev1.KvDumpBlock{Hash: 1}, &triplanev1.KvDumpBlock{Hash: 2}),
	} {
		if err := kvevents.ValidateReply(bad); !errors.Is(err, kvevents.ErrInvalid) {
			t.Errorf("ValidateReply(%v) = %v, want ErrInvalid", bad, err)
		}
	}
	// A total of 0 (an older worker's one-reply dump) or the number of
	// blocks (a paged dump that fits in one page) is fine.
	for _, good := range []*triplanev1.KvResendReply{
		one(0, &triplanev1.KvDumpBlock{Hash: 1}, &triplanev1.KvDumpBlock{Hash: 2}),
		one(2, &triplanev1.KvDumpBlock{Hash: 1}, &triplanev1.KvDumpBlock{Hash: 2}),
		one(0),
	} {
		if err := kvevents.ValidateReply(good); err != nil {
			t.Errorf("ValidateReply(%v) = %v", good, err)
		}
	}
}

// An event over half the server's max payload is split into events with
// the same effect, each of which fits: its blocks arrive, chained as they
// were. Only one that cannot be split is refused, before anything of its
// slice takes an id.
func TestOversizedEventsAreSplitOrRefusedBeforeNumbering(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t))
	p, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w4", Namespace: "ns", Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	subject, err := kvevents.EventsSubject(b, "ns", "w4")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := b.Conn().SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	huge := make([]uint64, b.MaxPayload()/8)
	for i := range huge {
		huge[i] = uint64(i) + 1<<40
	}
	small := func(h uint64) *triplanev1.KvEvent {
		return &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: []uint64{h}}}}
	}
	events := []*triplanev1.KvEvent{small(2), {Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: huge}}}, small(3)}
	if err := p.PublishAll(events); err != nil {
		t.Fatalf("a slice with a huge event: %v", err)
	}
	if len(events) != 3 {
		t.Fatal("the caller's slice changed")
	}
	blocks := p.Blocks()
	for i, h := range huge {
		got, ok := blocks[h]
		if !ok || got.HasParent != (i > 0) || (i > 0 && got.Parent != huge[i-1]) {
			t.Fatalf("block %d of the huge chain: %+v, %v (want its chain kept)", i, got, ok)
		}
	}
	last := p.LastEventID()
	if last < 4 {
		t.Fatalf("last id %d: the huge event was not split", last)
	}
	// Every batch went out within the limit, ids consecutive from 1.
	next := uint64(1)
	for next <= last {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("batch with event %d: %v", next, err)
		}
		if int64(len(m.Data)) > b.MaxPayload()/2 {
			t.Fatalf("a batch of %d bytes, limit %d", len(m.Data), b.MaxPayload())
		}
		batch := &triplanev1.KvEventBatch{}
		if err := proto.Unmarshal(m.Data, batch); err != nil {
			t.Fatal(err)
		}
		for _, e := range batch.Events {
			if e.EventId != next {
				t.Fatalf("event %d, want %d", e.EventId, next)
			}
			next++
		}
	}
	// A removal as large is split the same way.
	if err := p.Removed(huge); err != nil || p.LastEventID() < last+2 || len(p.Blocks()) != 2 {
		t.Fatalf("huge removal: %v, last %d, %d blocks left", err, p.LastEventID(), len(p.Blocks()))
	}
	// One block that is over the limit (it carries unknown fields, as from
	// a newer worker's code) cannot be split: refused, and the small event
	// before it takes no id either.
	last = p.LastEventID()
	odd := small(9)
	odd.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), make([]byte, b.MaxPayload())))
	before := p.Blocks()
	if err := p.PublishAll([]*triplanev1.KvEvent{small(8), odd}); !errors.Is(err, event.ErrTooLarge) {
		t.Fatalf("an unsplittable huge event: %v, want ErrTooLarge", err)
	}
	if p.LastEventID() != last || !maps.Equal(p.Blocks(), before) {
		t.Fatalf("after the refused slice: last %d (was %d), %d blocks (nothing of it must be kept)", p.LastEventID(), last, len(p.Blocks()))
	}
	if err := p.PublishAll(nil); err != nil || p.LastEventID() != last {
		t.Fatalf("no events: %v, last %d", err, p.LastEventID())
	}
}

func TestRepairOfAGoneWorkerStopsUntilItsNextBatch(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t))
	c, err := kvevents.NewConsumer(b, kvevents.ConsumerConfig{Namespace: "ns", RepairAttempts: 3, RepairBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	gap := &triplanev1.KvEventBatch{WorkerId: "gone", Epoch: 1, HeadEventId: 5,
		Events: []*triplanev1.KvEvent{{EventId: 5, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}}}
	c.Ingest(gap) // nobody answers on the worker's resend subject
	deadline := time.Now().Add(10 * time.Second)
	planetest.Poll(t, time.Until(deadline), time.Millisecond, func() bool { return c.Stats().RepairFailures >= 3 },
		func() string { return fmt.Sprintf("repairs: %v", c.Stats()) })
	// A new batch from the worker starts the repair again.
	c.Ingest(&triplanev1.KvEventBatch{WorkerId: "gone", Epoch: 1, HeadEventId: 6})
	planetest.Poll(t, time.Until(deadline), time.Millisecond, func() bool { return c.Stats().RepairFailures >= 6 },
		func() string { return fmt.Sprintf("repairs after the next batch: %v", c.Stats()) })
	if _, last := c.Blocks("gone"); last != 0 {
		t.Fatalf("applied up to %d without the missing events", last)
	}
}

// A router that restarts from a saved view resumes at the saved event ids:
// it needs neither a dump nor more than the events that followed.
func TestRestoreFromSavedView(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t))
	p, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w3", Namespace: "ns", Epoch: 5,
		RingSize: 1024, HeartbeatInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c1, err := kvevents.NewConsumer(newBus(t, n.Connect(t)), kvevents.ConsumerConfig{Namespace: "ns"})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 3))
	workload(t, p, rng, 100, false)
	converge(t, c1, p, "w3")
	saved, err := proto.Marshal(c1.View())
	if err != nil {
		t.Fatal(err)
	}
	c1.Close()
	workload(t, p, rng, 40, false) // while the router is down

	view := &triplanev1.KvView{}
	if err := proto.Unmarshal(saved, view); err != nil {
		t.Fatal(err)
	}
	// A bad entry next to the good one is skipped and counted.
	view.Workers = append(view.Workers, &triplanev1.KvWorkerView{WorkerId: "bad worker", Epoch: 1, Dump: &triplanev1.KvDump{}})
	var resets int
	var mu sync.Mutex
	c2, err := kvevents.NewConsumer(newBus(t, n.Connect(t)), kvevents.ConsumerConfig{Namespace: "ns", Initial: view,
		OnReset: func(string, map[uint64]kvevents.Block, uint64) { mu.Lock(); resets++; mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	converge(t, c2, p, "w3")
	st := c2.Stats()
	if st.Dumps != 0 || st.Resends == 0 || st.Malformed != 1 {
		t.Fatalf("restored consumer: %+v (want resends, no dump, one malformed entry)", st)
	}
	mu.Lock()
	defer mu.Unlock()
	if resets != 1 {
		t.Fatalf("%d resets, want the restore only", resets)
	}
}

// A worker holding more blocks than one reply can carry (a server with an
// 8 KiB max payload, a dump of about 70 KiB) still brings a router that
// starts late up to date: its dump comes in pages while the worker keeps
// changing. One-reply dumps never left the worker here: the router's
// repair failed until it gave up, again at every heartbeat.
func TestPagedDumpOverASmallMaxPayload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: filepath.Join(t.TempDir(), "nats"), MaxPayload: 8 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	connect := func() *nats.Conn {
		nc, err := nats.Connect(n.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	nc := connect()
	b := newBus(t, nc)
	p, err := kvevents.NewPublisher(b, kvevents.PublisherConfig{WorkerID: "w6", Namespace: "ns", Epoch: 1,
		RingSize: 16, HeartbeatInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	block := uint64(0)
	store := func(k int) {
		hashes := make([]uint64, k)
		for i := range hashes {
			block++
			hashes[i] = block * 0x9E3779B97F4A7C15 // large hashes: about 24 bytes a dumped block
		}
		if err := p.Stored(hashes, nil); err != nil {
			t.Fatal(err)
		}
	}
	for range 60 {
		store(50)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	c, err := kvevents.NewConsumer(newBus(t, connect()), kvevents.ConsumerConfig{Namespace: "ns",
		RepairTimeout: 500 * time.Millisecond, RepairBackoff: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The worker keeps storing and evicting while the router pages.
	for i := range 100 {
		store(1)
		if err := p.Removed([]uint64{uint64(i+1) * 0x9E3779B97F4A7C15}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	converge(t, c, p, "w6")
	// No dump started over: the Publisher keeps its frozen copy at least
	// 10 s after a page (not 5 heartbeats, 50 ms here), and nothing else
	// here drops one (a repair giving up would take 10 timeouts in a row).
	// At least 2,900 blocks of at least 12 bytes each when the dump was
	// taken, in pages of at most half of 8 KiB.
	if st := c.Stats(); st.DumpPages < 2900*12/(4<<10) || st.DumpRestarts != 0 {
		t.Fatalf("converged in too few pages (the dump was not paged whole), or restarting a dump: %v", st)
	}
	t.Logf("%d blocks: %v", len(p.Blocks()), c.Stats())
}
