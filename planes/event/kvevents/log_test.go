package kvevents_test

import (
	"cmp"
	"errors"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

// always fires the points it holds every time, counting them.
type always map[string]int

func (a always) Fire(point string) bool {
	if _, ok := a[point]; !ok {
		return false
	}
	a[point]++
	return true
}

// chance fires every point with probability p from a seeded source, counting
// the points that fired.
type chance struct {
	rng   *rand.Rand
	p     float64
	fired map[string]int
}

func (c *chance) Fire(point string) bool {
	if c.rng.Float64() >= c.p {
		return false
	}
	c.fired[point]++
	return true
}

// randomEvent is a cache operation on the blocks in live, as a worker's
// engine would make them.
func randomEvent(rng *rand.Rand, live *[]uint64, next *uint64) *triplanev1.KvEvent {
	switch x := rng.IntN(100); {
	case x < 60 || len(*live) == 0:
		hashes := make([]uint64, 1+rng.IntN(4))
		for i := range hashes {
			// Hashes out of order, so a dump's order is the Log's doing.
			hashes[i] = *next * 7919 % 100003
			*next++
		}
		var parent *uint64
		if len(*live) > 0 && rng.IntN(2) == 0 {
			parent = proto.Uint64((*live)[rng.IntN(len(*live))])
		}
		*live = append(*live, hashes...)
		return &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: hashes, ParentHash: parent}}}
	case x < 97:
		i := rng.IntN(len(*live))
		h := (*live)[i]
		*live = append((*live)[:i], (*live)[i+1:]...)
		return &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{h}}}}
	default:
		*live = nil
		return &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}
	}
}

// appendN appends n random events to l.
func appendN(l *kvevents.Log, rng *rand.Rand, n int) []*triplanev1.KvEventBatch {
	var live []uint64
	next := uint64(1)
	out := make([]*triplanev1.KvEventBatch, n)
	for i := range out {
		out[i] = l.Append(randomEvent(rng, &live, &next))
	}
	return out
}

// repairAll runs the worker's repair against l until it stops, as the
// consumer's repairer does, without waiting between failures. A failed
// request (a dump the log lost and replaced: FaultDumpLost) fails the test
// unless failures are expected; giving up always does.
func repairAll(t *testing.T, s *kvevents.Sequencer, l *kvevents.Log, worker string, budget int64, failures bool) (requests int) {
	t.Helper()
	for ; requests < 10000; requests++ {
		req, epoch, ok := s.RepairRequest(worker)
		if !ok {
			t.Fatalf("worker %s not followed", worker)
		}
		switch res := s.RepairDone(worker, epoch, l.Resend(req, budget), nil); res.Next {
		case kvevents.RepairStop:
			return requests + 1
		case kvevents.RepairGaveUp:
			t.Fatalf("repair from the log gave up: %+v", res)
		case kvevents.RepairAfterBackoff:
			if !failures {
				t.Fatalf("a repair request from the log failed: %+v", res)
			}
		}
	}
	t.Fatalf("repair of %s did not end", worker)
	return requests
}

func wantConverged(t *testing.T, s *kvevents.Sequencer, l *kvevents.Log, worker string) {
	t.Helper()
	got, last := s.Blocks(worker)
	if last != l.Last() || !maps.Equal(got, l.Blocks()) {
		t.Fatalf("sequencer at %d with %d blocks, log at %d with %d blocks; stats %v", last, len(got), l.Last(), len(l.Blocks()), s.Stats())
	}
}

func TestLogNumbersEvents(t *testing.T) {
	l := kvevents.NewLog("w1", 9, 0, 0, nil)
	if hb := l.Heartbeat(); hb.WorkerId != "w1" || hb.Epoch != 9 || hb.HeadEventId != 0 || len(hb.Events) != 0 {
		t.Fatalf("first heartbeat %v", hb)
	}
	e := storedEv(0, nil, 10, 11)
	// Size says what Append would send, without taking the id.
	n := l.Size(e)
	if e.EventId != 0 || l.Last() != 0 {
		t.Fatalf("Size took id %d, last %d", e.EventId, l.Last())
	}
	b := l.Append(e)
	if n != proto.Size(b) {
		t.Fatalf("Size %d, batch of %d bytes", n, proto.Size(b))
	}
	if b.WorkerId != "w1" || b.Epoch != 9 || b.HeadEventId != 1 || len(b.Events) != 1 || b.Events[0] != e || e.EventId != 1 {
		t.Fatalf("first batch %v", b)
	}
	if err := kvevents.ValidateBatch(b); err != nil {
		t.Fatal(err)
	}
	// The id in a caller's event is overwritten, not trusted.
	if b := l.Append(removedEv(77, 10)); b.HeadEventId != 2 || b.Events[0].EventId != 2 {
		t.Fatalf("second batch %v", b)
	}
	if hb := l.Heartbeat(); hb.HeadEventId != 2 || l.Last() != 2 {
		t.Fatalf("heartbeat %v, last %d", hb, l.Last())
	}
	want := map[uint64]kvevents.Block{11: {Parent: 10, HasParent: true}}
	got := l.Blocks()
	if !maps.Equal(got, want) {
		t.Fatalf("blocks %v, want %v", got, want)
	}
	got[99] = kvevents.Block{}
	if len(l.Blocks()) != 1 {
		t.Fatal("Blocks is not a copy")
	}
}

// randomEvents is n random events (randomEvent's) and a fresh copy of
// each, for a second log to number.
func randomEvents(rng *rand.Rand, live *[]uint64, next *uint64, n int) (events, copies []*triplanev1.KvEvent) {
	for range n {
		e := randomEvent(rng, live, next)
		events = append(events, e)
		copies = append(copies, proto.Clone(e).(*triplanev1.KvEvent))
	}
	return events, copies
}

// wantBatches checks batches against the events they carry: every event in
// order, once, ids consecutive from first, each batch valid, headed by its
// last event, and within budget unless it is one event.
func wantBatches(t *testing.T, batches []*triplanev1.KvEventBatch, events []*triplanev1.KvEvent, first uint64, budget int) {
	t.Helper()
	var got []*triplanev1.KvEvent
	for i, b := range batches {
		if err := kvevents.ValidateBatch(b); err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		if len(b.Events) == 0 || b.HeadEventId != b.Events[len(b.Events)-1].EventId {
			t.Fatalf("batch %d: head %d, events %v", i, b.HeadEventId, b.Events)
		}
		if n := proto.Size(b); n > budget && len(b.Events) > 1 {
			t.Fatalf("batch %d: %d bytes for %d events, budget %d", i, n, len(b.Events), budget)
		}
		got = append(got, b.Events...)
	}
	if !slices.Equal(got, events) {
		t.Fatalf("the batches carry %d events, not the %d given", len(got), len(events))
	}
	for i, e := range got {
		if e.EventId != first+uint64(i) {
			t.Fatalf("event %d has id %d, want %d", i, e.EventId, first+uint64(i))
		}
	}
}

func TestLogAppendAllSendsAnIterationAsOneBatch(t *testing.T) {
	l := kvevents.NewLog("w1", 9, 0, 0, nil)
	one := kvevents.NewLog("w1", 9, 0, 0, nil) // the same events, one by one
	rng, live, next := rand.New(rand.NewPCG(5, 5)), []uint64{}, uint64(1)
	// No events: no batch, no id.
	if bs := l.AppendAll(nil, 1<<20); len(bs) != 0 || l.Last() != 0 {
		t.Fatalf("no events: %v, last %d", bs, l.Last())
	}
	for it := range 50 {
		events, copies := randomEvents(rng, &live, &next, 1+rng.IntN(6))
		first := l.Last() + 1
		bs := l.AppendAll(events, 1<<20)
		if len(bs) != 1 || bs[0].WorkerId != "w1" || bs[0].Epoch != 9 {
			t.Fatalf("iteration %d: %d batches %v, want one", it, len(bs), bs)
		}
		wantBatches(t, bs, events, first, 1<<20)
		for _, e := range copies {
			one.Append(e)
		}
		if l.Last() != one.Last() || !maps.Equal(l.Blocks(), one.Blocks()) {
			t.Fatalf("iteration %d: log at %d with %d blocks, one by one at %d with %d", it, l.Last(), len(l.Blocks()), one.Last(), len(one.Blocks()))
		}
		if hb := l.Heartbeat(); hb.HeadEventId != l.Last() {
			t.Fatalf("heartbeat %v, last %d", hb, l.Last())
		}
	}
	// The ring answers each event as Append's would.
	req := &triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: 1, ToEventId: l.Last()}
	if got := eventIDs(t, l.Resend(req, math.MaxInt64)); !slices.Equal(got, idRange(1, l.Last())) {
		t.Fatalf("resend of everything: %v", got)
	}
	got, want := l.Resend(req, math.MaxInt64), one.Resend(req, math.MaxInt64)
	if !proto.Equal(got, want) {
		t.Fatal("the resends of the batched log and of the one-by-one log differ")
	}
	// A sequencer fed the batches sees what the log has.
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, l.Heartbeat(), true)
	repairAll(t, s, l, "w1", math.MaxInt64, false)
	wantConverged(t, s, l, "w1")
}

func TestLogAppendAllSplitsByBudget(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 0, 0, nil)
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	rng, live, next := rand.New(rand.NewPCG(6, 6)), []uint64{}, uint64(1)
	const budget = 120
	split := false
	for it := range 40 {
		events, _ := randomEvents(rng, &live, &next, 1+rng.IntN(12))
		if it == 7 {
			// An event larger than the budget still goes out, alone.
			big := make([]uint64, 40)
			for i := range big {
				big[i] = 1<<40 + uint64(it*100+i)
			}
			events = slices.Insert(events, len(events)/2, storedEv(0, nil, big...))
		}
		first := l.Last() + 1
		bs := l.AppendAll(events, budget)
		wantBatches(t, bs, events, first, budget)
		split = split || len(bs) > 1
		// As few batches as possible: the next batch's first event would
		// not have fitted in the one before.
		for i := 0; i+1 < len(bs); i++ {
			joined := &triplanev1.KvEventBatch{WorkerId: "w1", Epoch: 1, HeadEventId: bs[i+1].Events[0].EventId,
				Events: append(slices.Clone(bs[i].Events), bs[i+1].Events[0])}
			if proto.Size(joined) <= budget {
				t.Fatalf("iteration %d: batch %d of %d events cut though the next event fitted (%d bytes)", it, i, len(bs[i].Events), proto.Size(joined))
			}
		}
		if it == 7 && !slices.ContainsFunc(bs, func(b *triplanev1.KvEventBatch) bool { return len(b.Events) == 1 && proto.Size(b) > budget }) {
			t.Fatal("the event over the budget is not in a batch of its own")
		}
		// Each batch alone moves the consumer on, with no repair: its head
		// is its own last event, not the iteration's.
		for _, b := range bs {
			ingest(t, s, b, false)
		}
	}
	if !split {
		t.Fatal("no iteration was split: the budget is too large for the test")
	}
	wantConverged(t, s, l, "w1")
}

func TestLogAppendAllAllocatesOnceForOneBatch(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 0, 0, nil)
	events := []*triplanev1.KvEvent{clearedEv(0), removedEv(0, 1, 2), clearedEv(0)}
	if n := testing.AllocsPerRun(100, func() { l.AppendAll(events, 1<<20) }); n != 1 {
		t.Fatalf("%v allocations for a batch of %d events, want 1", n, len(events))
	}
}

func eventIDs(t *testing.T, r *triplanev1.KvResendReply) []uint64 {
	t.Helper()
	rg, ok := r.Reply.(*triplanev1.KvResendReply_Range)
	if !ok {
		t.Fatalf("reply %v is not a range", r)
	}
	ids := []uint64{}
	for _, e := range rg.Range.Events {
		ids = append(ids, e.EventId)
	}
	return ids
}

func idRange(from, to uint64) []uint64 {
	out := []uint64{}
	for id := from; id <= to; id++ {
		out = append(out, id)
	}
	return out
}

func TestLogResendsFromTheRing(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 8, 3, nil)
	appendN(l, rand.New(rand.NewPCG(1, 1)), 10) // the ring holds 3..10
	for _, tc := range []struct {
		from, to uint64
		want     []uint64
	}{
		{3, 4, idRange(3, 4)},
		{5, 100, idRange(5, 7)}, // at most MaxResend events
		{9, 100, idRange(9, 10)},
		{11, 20, idRange(1, 0)}, // nothing newer than the consumer has
		{4, 3, idRange(1, 0)},
	} {
		r := l.Resend(&triplanev1.KvResendRequest{WorkerId: "w1", FromEventId: tc.from, ToEventId: tc.to}, math.MaxInt64)
		if err := kvevents.ValidateReply(r); err != nil || r.WorkerId != "w1" || r.Epoch != 1 {
			t.Fatalf("%d..%d: reply %v: %v", tc.from, tc.to, r, err)
		}
		if got := eventIDs(t, r); !slices.Equal(got, tc.want) {
			t.Fatalf("%d..%d: events %v, want %v", tc.from, tc.to, got, tc.want)
		}
	}
	// Ids from 0 mean from the first; the ring of a young log holds them.
	young := kvevents.NewLog("w1", 1, 8, 0, nil)
	appendN(young, rand.New(rand.NewPCG(1, 1)), 4)
	if got := eventIDs(t, young.Resend(&triplanev1.KvResendRequest{ToEventId: 9}, math.MaxInt64)); !slices.Equal(got, idRange(1, 4)) {
		t.Fatalf("from 0: %v", got)
	}
}

func TestLogDumpsBeyondTheRing(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 8, 0, nil)
	appendN(l, rand.New(rand.NewPCG(2, 2)), 40)
	r := l.Resend(&triplanev1.KvResendRequest{FromEventId: 32, ToEventId: 40}, math.MaxInt64)
	if _, ok := r.Reply.(*triplanev1.KvResendReply_Dump); !ok {
		t.Fatalf("from 32 of 40 with a ring of 8: %v", r)
	}
	d := r.GetDump()
	if d.EventId != 40 || len(d.Blocks) != len(l.Blocks()) || len(d.Blocks) < 2 {
		t.Fatalf("dump at %d of %d blocks; log at 40 with %d", d.EventId, len(d.Blocks), len(l.Blocks()))
	}
	if !slices.IsSortedFunc(d.Blocks, func(a, b *triplanev1.KvDumpBlock) int { return cmp.Compare(a.Hash, b.Hash) }) {
		t.Fatalf("dump blocks not sorted by hash: %v", d.Blocks)
	}
	for _, b := range d.Blocks {
		if want := l.Blocks()[b.Hash]; want.Parent != b.GetParentHash() || want.HasParent != (b.ParentHash != nil) {
			t.Fatalf("block %d: %v, want %+v", b.Hash, b, want)
		}
	}
	// The same log gives the same dump, byte for byte.
	again := l.Resend(&triplanev1.KvResendRequest{FromEventId: 1, ToEventId: 40}, math.MaxInt64)
	b1, _ := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	b2, _ := proto.MarshalOptions{Deterministic: true}.Marshal(again)
	if string(b1) != string(b2) {
		t.Fatal("two dumps of the same log differ")
	}
	// From the oldest id the ring holds, a range again.
	if got := eventIDs(t, l.Resend(&triplanev1.KvResendRequest{FromEventId: 33, ToEventId: 40}, math.MaxInt64)); !slices.Equal(got, idRange(33, 40)) {
		t.Fatalf("from 33: %v", got)
	}
}

func TestLogSplitsResendsByBudget(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 0, 0, nil)
	for i := range uint64(10) {
		l.Append(storedEv(0, nil, 1000+i))
	}
	one := int64(proto.Size(storedEv(5, nil, 1005))) + 8
	req := &triplanev1.KvResendRequest{FromEventId: 1, ToEventId: 10}
	if got := eventIDs(t, l.Resend(req, 3*one)); !slices.Equal(got, idRange(1, 3)) {
		t.Fatalf("budget of 3 events: %v", got)
	}
	// However small the budget, an answer makes progress.
	if got := eventIDs(t, l.Resend(req, 0)); !slices.Equal(got, idRange(1, 1)) {
		t.Fatalf("budget 0: %v", got)
	}
	// The consumer gets the rest by asking again.
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, l.Heartbeat(), true)
	if n := repairAll(t, s, l, "w1", 3*one, false); n != 4 {
		t.Fatalf("%d requests for 10 events 3 at a time", n)
	}
	wantConverged(t, s, l, "w1")
}

func TestLogFaultPoints(t *testing.T) {
	if !slices.Equal(kvevents.FaultPoints, []string{kvevents.FaultPendingFull, kvevents.FaultDump, kvevents.FaultShortResend, kvevents.FaultDumpLost}) {
		t.Fatalf("FaultPoints %v", kvevents.FaultPoints)
	}
	req := &triplanev1.KvResendRequest{FromEventId: 2, ToEventId: 6}
	t.Run("dump", func(t *testing.T) {
		p := always{kvevents.FaultDump: 0}
		l := kvevents.NewLog("w1", 1, 0, 0, p)
		appendN(l, rand.New(rand.NewPCG(3, 3)), 6)
		r := l.Resend(req, math.MaxInt64)
		if r.GetDump() == nil || r.GetDump().EventId != 6 || p[kvevents.FaultDump] != 1 {
			t.Fatalf("reply %v, fired %v; want a dump at 6", r, p)
		}
		// An empty range stays one: there is nothing to dump for.
		if r := l.Resend(&triplanev1.KvResendRequest{FromEventId: 7, ToEventId: 9}, math.MaxInt64); r.GetRange() == nil {
			t.Fatalf("nothing to resend: %v", r)
		}
	})
	t.Run("short resend", func(t *testing.T) {
		p := always{kvevents.FaultShortResend: 0}
		l := kvevents.NewLog("w1", 1, 0, 0, p)
		appendN(l, rand.New(rand.NewPCG(3, 3)), 6)
		if got := eventIDs(t, l.Resend(req, math.MaxInt64)); !slices.Equal(got, idRange(2, 2)) || p[kvevents.FaultShortResend] != 1 {
			t.Fatalf("events %v, fired %v; want the first only", got, p)
		}
	})
	t.Run("pending full", func(t *testing.T) {
		p := always{kvevents.FaultPendingFull: 0}
		s := kvevents.NewSequencer(kvevents.SequencerConfig{Faults: p})
		ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
		ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
		if st := s.Stats(); st.DroppedPending != 1 || p[kvevents.FaultPendingFull] != 1 {
			t.Fatalf("stats %+v, fired %v; want the early event dropped", st, p)
		}
		req, epoch, _ := s.RepairRequest("w1")
		if req.FromEventId != 2 || req.ToEventId != 3 {
			t.Fatalf("repair request %v", req)
		}
		wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(2, nil, 20), storedEv(3, nil, 30)), nil), kvevents.RepairStop)
		wantBlocks(t, s, "w1", blocksOf(10, 20, 30), 3)
	})
	t.Run("dump lost", func(t *testing.T) {
		// The log loses its frozen dump before the second page: the
		// request is answered with the first page of a new dump, which
		// the router takes as a restart (a failed request, backing off);
		// with the point disarmed, the new dump completes.
		p := always{kvevents.FaultDumpLost: 0}
		l := kvevents.NewLog("w1", 1, 8, 0, p)
		storeMany(l, 100)
		s := kvevents.NewSequencer(kvevents.SequencerConfig{})
		ingest(t, s, l.Heartbeat(), true)
		req, epoch, _ := s.RepairRequest("w1")
		first := l.Resend(req, 256)
		wantNext(t, s.RepairDone("w1", epoch, first, nil), kvevents.RepairAgain)
		l.Append(storedEv(0, nil, 7)) // the new dump is of a newer state
		req, epoch, _ = s.RepairRequest("w1")
		if req.DumpAfter == nil {
			t.Fatalf("second request %v", req)
		}
		again := l.Resend(req, 256)
		if d := again.GetDump(); d == nil || d.After != nil || d.EventId != l.Last() || p[kvevents.FaultDumpLost] != 1 {
			t.Fatalf("reply %v, fired %v; want the first page of a new dump at %d", again, p, l.Last())
		}
		res := s.RepairDone("w1", epoch, again, nil)
		wantNext(t, res, kvevents.RepairAfterBackoff)
		if res.Failures != 1 {
			t.Fatalf("a dump lost: %+v", res)
		}
		delete(p, kvevents.FaultDumpLost)
		repairAll(t, s, l, "w1", 256, false)
		wantConverged(t, s, l, "w1")
		if st := s.Stats(); st.DumpRestarts != 1 || st.Dumps != 1 || st.StalePages != 0 {
			t.Fatalf("stats %v", st)
		}
	})
	// With every point firing half the time, the consumer still gets there.
	for _, ring := range []int{4096, 8} {
		p := &chance{rng: rand.New(rand.NewPCG(4, uint64(ring))), p: 0.5, fired: map[string]int{}}
		l := kvevents.NewLog("w1", 1, ring, 50, p)
		s := kvevents.NewSequencer(kvevents.SequencerConfig{Faults: p})
		rng, live, next := rand.New(rand.NewPCG(4, 4)), []uint64{}, uint64(1)
		for i := range 300 {
			b := l.Append(randomEvent(rng, &live, &next))
			if i%3 == 0 {
				continue // lost
			}
			if repair, err := s.Ingest(b); err != nil {
				t.Fatal(err)
			} else if repair {
				repairAll(t, s, l, "w1", 200, true) // dumps of a few pages, lost half the time
			}
		}
		if repair, _ := s.Ingest(l.Heartbeat()); repair {
			repairAll(t, s, l, "w1", 200, true)
		}
		wantConverged(t, s, l, "w1")
		for _, f := range kvevents.FaultPoints {
			if p.fired[f] == 0 {
				t.Fatalf("ring %d: %s never fired: %v", ring, f, p.fired)
			}
		}
	}
}

// pipe carries a Log's batches to a Sequencer through a network that loses,
// holds back and duplicates some, and interleaves the Sequencer's repairs
// (some of whose requests fail) with the traffic, all from one seeded
// source: what the simulator does, in small.
type pipe struct {
	t       *testing.T
	rng     *rand.Rand
	log     *kvevents.Log
	seq     *kvevents.Sequencer
	held    []*triplanev1.KvEventBatch
	repairs []string
	budget  int64
	lossy   bool
	// batch, when above 0, makes each step an engine iteration: 1 to 4
	// events appended together, sent as batches of at most batch bytes.
	batch int
}

func (p *pipe) deliver(b *triplanev1.KvEventBatch) {
	repair, err := p.seq.Ingest(b)
	if err != nil {
		p.t.Fatal(err)
	}
	if repair {
		p.repairs = append(p.repairs, b.WorkerId)
	}
}

func (p *pipe) send(b *triplanev1.KvEventBatch) {
	if !p.lossy {
		p.deliver(b)
		return
	}
	switch x := p.rng.IntN(100); {
	case x < 20:
	case x < 35:
		p.held = append(p.held, b)
	case x < 40:
		p.deliver(b)
		p.deliver(b)
	default:
		p.deliver(b)
	}
	if len(p.held) > 5 && p.rng.IntN(4) == 0 {
		p.rng.Shuffle(len(p.held), func(i, j int) { p.held[i], p.held[j] = p.held[j], p.held[i] })
		for _, h := range p.held {
			p.deliver(h)
		}
		p.held = p.held[:0]
	}
}

// step makes one resend request of the oldest repair under way.
func (p *pipe) step() {
	if len(p.repairs) == 0 {
		return
	}
	w := p.repairs[0]
	p.repairs = p.repairs[1:]
	req, epoch, ok := p.seq.RepairRequest(w)
	if !ok {
		return
	}
	var reply *triplanev1.KvResendReply
	var err error
	if p.lossy && p.rng.IntN(10) == 0 {
		err = errTimeout
	} else {
		reply = p.log.Resend(req, p.budget)
	}
	switch p.seq.RepairDone(w, epoch, reply, err).Next {
	case kvevents.RepairAgain, kvevents.RepairAfterBackoff:
		p.repairs = append(p.repairs, w)
	}
}

var errTimeout = errors.New("timeout")

// run appends n events through the lossy network, then heals it and
// repairs until the view is the log's.
func (p *pipe) run(n int) {
	var live []uint64
	next := uint64(1)
	p.lossy = true
	for range n {
		if p.batch > 0 {
			events, _ := randomEvents(p.rng, &live, &next, 1+p.rng.IntN(4))
			for _, b := range p.log.AppendAll(events, p.batch) {
				p.send(b)
			}
		} else {
			p.send(p.log.Append(randomEvent(p.rng, &live, &next)))
		}
		if p.rng.IntN(3) == 0 {
			p.send(p.log.Heartbeat())
		}
		if p.rng.IntN(2) == 0 {
			p.step()
		}
	}
	p.lossy = false
	for _, h := range p.held {
		p.deliver(h)
	}
	p.held = nil
	for range 100 {
		if last := p.seq.LastEventID("w1"); last == p.log.Last() && len(p.repairs) == 0 {
			break
		}
		p.send(p.log.Heartbeat())
		for len(p.repairs) > 0 {
			p.step()
		}
	}
}

func TestSequencerFollowsLogThroughLossAndFaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ring  int
		seed  uint64
		batch int
	}{
		{"ring holds the gaps", 4096, 1, 0},
		{"small ring", 8, 2, 0},
		// Several events a batch, some iterations split in two or more.
		{"iterations in batches", 4096, 3, 60},
		{"iterations in batches, small ring", 8, 4, 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var views [2][]byte
			var stats [2]kvevents.Stats
			for i := range views {
				faults := &chance{rng: rand.New(rand.NewPCG(tc.seed, 9)), p: 0.2, fired: map[string]int{}}
				l := kvevents.NewLog("w1", 1, tc.ring, 20, faults)
				s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxPending: 16, RepairAttempts: 3, Faults: faults})
				one := int64(proto.Size(storedEv(1000, proto.Uint64(99999), 99999, 99999, 99999, 99999))) + 8
				p := &pipe{t: t, rng: rand.New(rand.NewPCG(tc.seed, 1)), log: l, seq: s, budget: 5 * one, batch: tc.batch}
				p.run(2000)
				wantConverged(t, s, l, "w1")
				for _, f := range kvevents.FaultPoints {
					if faults.fired[f] == 0 {
						t.Fatalf("%s never fired: %v", f, faults.fired)
					}
				}
				st := s.Stats()
				if st.Gaps == 0 || st.DroppedPending == 0 || st.Dumps == 0 || st.Resends == 0 || st.RepairFailures == 0 {
					t.Fatalf("a path not taken: %v", st)
				}
				views[i], _ = proto.MarshalOptions{Deterministic: true}.Marshal(s.View())
				stats[i] = st
				if i == 0 {
					t.Logf("%v; faults %v", st, faults.fired)
				}
			}
			// The simulator replays a seed: the same inputs give the same run.
			if string(views[0]) != string(views[1]) || stats[0] != stats[1] {
				t.Fatalf("two runs of seed %d differ: %v, then %v", tc.seed, stats[0], stats[1])
			}
		})
	}
}

// storeMany appends events storing n blocks, chained in stores of 10, with
// hashes spread over the whole range (so each takes several bytes).
func storeMany(l *kvevents.Log, n int) {
	for i := 0; i < n; i += 10 {
		hashes := make([]uint64, min(10, n-i))
		for j := range hashes {
			hashes[j] = uint64(i+j+1) * 0x9E3779B97F4A7C15
		}
		l.Append(storedEv(0, nil, hashes...))
	}
}

// pagesOf takes a paged dump from l through its cursor, as a router does,
// calling between after each page; it returns the pages.
func pagesOf(t *testing.T, l *kvevents.Log, budget int64, between func()) []*triplanev1.KvDump {
	t.Helper()
	req := &triplanev1.KvResendRequest{FromEventId: 1, ToEventId: math.MaxUint64 - 1, DumpPages: true}
	var pages []*triplanev1.KvDump
	for len(pages) < 10000 {
		r := l.Resend(req, budget)
		d := r.GetDump()
		if d == nil {
			t.Fatalf("page %d: %v", len(pages), r)
		}
		if err := kvevents.ValidateReply(r); err != nil {
			t.Fatalf("page %d: %v", len(pages), err)
		}
		if n := int64(proto.Size(r)); n > budget && len(d.Blocks) > 1 {
			t.Fatalf("page %d: %d bytes, budget %d", len(pages), n, budget)
		}
		pages = append(pages, d)
		if !d.More {
			return pages
		}
		req.DumpEventId, req.DumpAfter = d.EventId, proto.Uint64(d.Blocks[len(d.Blocks)-1].Hash)
		if between != nil {
			between()
		}
	}
	t.Fatal("the dump did not end")
	return nil
}

// A dump larger than the budget comes in pages of at most the budget, in
// hash order, all of one state however the worker changes between them;
// together they are the one-reply dump.
func TestLogPagesADump(t *testing.T) {
	l := kvevents.NewLog("w1", 3, 8, 0, nil)
	storeMany(l, 500)
	whole := l.Resend(&triplanev1.KvResendRequest{FromEventId: 1, ToEventId: 50}, math.MaxInt64).GetDump()
	if whole == nil || len(whole.Blocks) != 500 || whole.More || whole.After != nil || whole.TotalBlocks != 0 {
		t.Fatalf("a router without pages gets one dump, as before: %v blocks, more %v", len(whole.GetBlocks()), whole.GetMore())
	}
	last := l.Last()
	rng, live, next := rand.New(rand.NewPCG(5, 5)), []uint64{}, uint64(1)
	pages := pagesOf(t, l, 1024, func() { l.Append(randomEvent(rng, &live, &next)) })
	if len(pages) < 5 {
		t.Fatalf("%d pages of 500 blocks at 1 KiB", len(pages))
	}
	var got []*triplanev1.KvDumpBlock
	for i, p := range pages {
		if p.EventId != last || p.TotalBlocks != 500 || (i == 0) != (p.After == nil) || p.More != (i < len(pages)-1) {
			t.Fatalf("page %d: at %d of %d blocks, after %v, more %v", i, p.EventId, p.TotalBlocks, p.After, p.More)
		}
		got = append(got, p.Blocks...)
	}
	if !proto.Equal(&triplanev1.KvDump{EventId: last, Blocks: got}, whole) {
		t.Fatal("the pages together differ from the one-reply dump of the same state")
	}
	// However small the budget, each page makes progress.
	l = kvevents.NewLog("w1", 3, 8, 0, nil)
	storeMany(l, 500)
	if pages := pagesOf(t, l, 0, nil); len(pages) != 500 {
		t.Fatalf("%d pages at budget 0, want one a block", len(pages))
	}
}

// A new dump shares the frozen one while the ring holds the events after
// it; past that it is a new one, and so is the answer to a page asked of a
// dump the log no longer holds (replaced, or expired after heartbeats
// without a page).
func TestLogFrozenDumpIsSharedThenReplaced(t *testing.T) {
	l := kvevents.NewLog("w1", 1, 8, 0, nil)
	storeMany(l, 100)
	first := func(from uint64) *triplanev1.KvDump {
		return l.Resend(&triplanev1.KvResendRequest{FromEventId: from, ToEventId: 1000, DumpPages: true}, 256).GetDump()
	}
	d1 := first(1)
	l.Append(storedEv(0, nil, 7))
	if d := first(1); d.EventId != d1.EventId {
		t.Fatalf("a second router got a dump at %d, not the shared one at %d", d.EventId, d1.EventId)
	}
	shared := d1.EventId
	for range 8 {
		l.Append(storedEv(0, nil, 8))
	}
	if d := first(1); d.EventId != l.Last() || d.EventId == shared {
		t.Fatalf("after the ring turned over: a dump at %d, want a new one at %d", d.EventId, l.Last())
	}
	// A page of the old dump is no longer there: the answer is the first
	// page of the current one.
	cont := &triplanev1.KvResendRequest{FromEventId: 1, ToEventId: 1000, DumpPages: true, DumpEventId: shared, DumpAfter: proto.Uint64(d1.Blocks[0].Hash)}
	if d := l.Resend(cont, 256).GetDump(); d.After != nil || d.EventId != l.Last() {
		t.Fatalf("a page of a replaced dump: %v", d)
	}
	// Heartbeats with no page asked drop the frozen dump; the next
	// request freezes the same state again (no event since).
	now := first(1)
	for range 10 {
		l.Heartbeat()
	}
	cont.DumpEventId, cont.DumpAfter = now.EventId, proto.Uint64(now.Blocks[len(now.Blocks)-1].Hash)
	if d := l.Resend(cont, 256).GetDump(); d.After != nil || d.EventId != now.EventId {
		t.Fatalf("a page of an expired dump: %v", d)
	}
}

// The frozen dump is dropped at the 5th heartbeat without a page asked of
// it (what the docs say), or at the n-th when set: a page asked before
// comes from the same dump, one asked after starts a new one.
func TestLogFrozenDumpExpiresAfterItsHeartbeats(t *testing.T) {
	for _, n := range []int{0, 12} {
		l := kvevents.NewLog("w1", 1, 8, 0, nil)
		want := 5
		if n > 0 {
			l.SetDumpIdleHeartbeats(n)
			want = n
		}
		storeMany(l, 100)
		req := &triplanev1.KvResendRequest{FromEventId: 1, ToEventId: 1000, DumpPages: true}
		d := l.Resend(req, 256).GetDump()
		req.DumpEventId, req.DumpAfter = d.EventId, proto.Uint64(d.Blocks[len(d.Blocks)-1].Hash)
		l.Append(storedEv(0, nil, 7)) // a new dump would be at another event
		for range want - 1 {
			l.Heartbeat()
		}
		next := l.Resend(req, 256).GetDump()
		if next.After == nil || next.EventId != d.EventId {
			t.Fatalf("%d heartbeats after a page: %v, want the next page", want-1, next)
		}
		req.DumpAfter = proto.Uint64(next.Blocks[len(next.Blocks)-1].Hash)
		for range want {
			l.Heartbeat()
		}
		if again := l.Resend(req, 256).GetDump(); again.After != nil || again.EventId != l.Last() {
			t.Fatalf("%d heartbeats after a page: %v, want a new dump at %d", want, again, l.Last())
		}
	}
}

// A router takes a dump of many pages while the worker changes between
// them and some of its live batches are lost; its view ends equal to the
// worker's.
func TestSequencerRepairsThroughDumpPages(t *testing.T) {
	// 200 events, more than the ring: a dump it must be.
	l := kvevents.NewLog("w1", 1, 64, 0, nil)
	storeMany(l, 2000)
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, l.Heartbeat(), true) // a router that starts late
	rng, live, next := rand.New(rand.NewPCG(6, 6)), []uint64{}, uint64(1)
	for requests := 0; ; requests++ {
		if requests > 1000 {
			t.Fatalf("no end: %v", s.Stats())
		}
		req, epoch, _ := s.RepairRequest("w1")
		res := s.RepairDone("w1", epoch, l.Resend(req, 2048), nil)
		if res.Next == kvevents.RepairStop {
			break
		}
		wantNext(t, res, kvevents.RepairAgain)
		// Two events between pages, one of three batches lost.
		for range 2 {
			b := l.Append(randomEvent(rng, &live, &next))
			if rng.IntN(3) > 0 {
				if _, err := s.Ingest(b); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	// A lost tail shows in the next heartbeat.
	if repair, _ := s.Ingest(l.Heartbeat()); repair {
		repairAll(t, s, l, "w1", 2048, false)
	}
	wantConverged(t, s, l, "w1")
	if st := s.Stats(); st.DumpPages < 10 || st.Dumps != 1 || st.DumpRestarts != 0 || st.StalePages != 0 {
		t.Fatalf("stats %v", st)
	}
}
