package kvevents_test

import (
	"errors"
	"maps"
	"math"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

func storedEv(id uint64, parent *uint64, hashes ...uint64) *triplanev1.KvEvent {
	return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: hashes, ParentHash: parent}}}
}

func removedEv(id uint64, hashes ...uint64) *triplanev1.KvEvent {
	return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: hashes}}}
}

func clearedEv(id uint64) *triplanev1.KvEvent {
	return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}}
}

// batchOf is a batch of consecutive events whose head is the last one (or
// head, for a heartbeat).
func batchOf(worker string, epoch, head uint64, es ...*triplanev1.KvEvent) *triplanev1.KvEventBatch {
	if n := len(es); n > 0 {
		head = max(head, es[n-1].EventId)
	}
	return &triplanev1.KvEventBatch{WorkerId: worker, Epoch: epoch, HeadEventId: head, Events: es}
}

func rangeReply(worker string, epoch uint64, es ...*triplanev1.KvEvent) *triplanev1.KvResendReply {
	return &triplanev1.KvResendReply{WorkerId: worker, Epoch: epoch,
		Reply: &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{Events: es}}}
}

func dumpReply(worker string, epoch, last uint64, hashes ...uint64) *triplanev1.KvResendReply {
	d := &triplanev1.KvDump{EventId: last}
	for _, h := range hashes {
		d.Blocks = append(d.Blocks, &triplanev1.KvDumpBlock{Hash: h})
	}
	return &triplanev1.KvResendReply{WorkerId: worker, Epoch: epoch, Reply: &triplanev1.KvResendReply_Dump{Dump: d}}
}

// blocksOf is blocks without parents.
func blocksOf(hashes ...uint64) map[uint64]kvevents.Block {
	out := map[uint64]kvevents.Block{}
	for _, h := range hashes {
		out[h] = kvevents.Block{}
	}
	return out
}

func ingest(t *testing.T, s *kvevents.Sequencer, b *triplanev1.KvEventBatch, wantRepair bool) {
	t.Helper()
	repair, err := s.Ingest(b)
	if err != nil {
		t.Fatalf("Ingest(%v): %v", b, err)
	}
	if repair != wantRepair {
		t.Fatalf("Ingest(%v): repair %v, want %v", b, repair, wantRepair)
	}
}

func wantBlocks(t *testing.T, s *kvevents.Sequencer, worker string, want map[uint64]kvevents.Block, wantLast uint64) {
	t.Helper()
	got, last := s.Blocks(worker)
	if last != wantLast || !maps.Equal(got, want) {
		t.Fatalf("%s: blocks %v at %d, want %v at %d", worker, got, last, want, wantLast)
	}
	if s.LastEventID(worker) != wantLast {
		t.Fatalf("%s: LastEventID %d, want %d", worker, s.LastEventID(worker), wantLast)
	}
}

func wantNext(t *testing.T, res kvevents.RepairResult, want kvevents.RepairNext) {
	t.Helper()
	if res.Next != want {
		t.Fatalf("RepairDone: %v (%+v), want %v", res.Next, res, want)
	}
}

type reset struct {
	worker string
	blocks map[uint64]kvevents.Block
	last   uint64
}

func recordResets(cfg *kvevents.SequencerConfig) *[]reset {
	var out []reset
	cfg.OnReset = func(w string, b map[uint64]kvevents.Block, last uint64) { out = append(out, reset{w, b, last}) }
	return &out
}

func TestSequencerDropsMalformedBatches(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	for i, bad := range []*triplanev1.KvEventBatch{
		nil,
		batchOf("", 1, 0, storedEv(1, nil, 10)),
		batchOf("w 1", 1, 0, storedEv(1, nil, 10)),
		batchOf("w1", 1, 0, storedEv(1, nil, 10), storedEv(3, nil, 11)),
		batchOf("w1", 1, 0, storedEv(0, nil, 10)),
		batchOf("w1", 1, 0, &triplanev1.KvEvent{EventId: 1}),
		{WorkerId: "w1", Epoch: 1, HeadEventId: 0, Events: []*triplanev1.KvEvent{storedEv(1, nil, 10)}},
		// The next id would wrap to 0 and the view wait forever.
		batchOf("w1", 1, math.MaxUint64, storedEv(math.MaxUint64, nil, 10)),
	} {
		repair, err := s.Ingest(bad)
		if !errors.Is(err, kvevents.ErrInvalid) || repair {
			t.Fatalf("bad batch %d: repair %v, err %v; want ErrInvalid", i, repair, err)
		}
		if st := s.Stats(); st.Malformed != uint64(i+1) || st.Applied != 0 {
			t.Fatalf("bad batch %d: %+v", i, st)
		}
		if v := s.View(); len(v.Workers) != 0 {
			t.Fatalf("bad batch %d changed the view: %v", i, v)
		}
	}
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	wantBlocks(t, s, "w1", blocksOf(10), 1)
}

func TestSequencerIgnoresStaleEpoch(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 2, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w1", 1, 0, clearedEv(1), storedEv(2, nil, 20)), false)
	if st := s.Stats(); st.StaleEpoch != 1 || st.Applied != 1 {
		t.Fatalf("stale batch: %+v", st)
	}
	wantBlocks(t, s, "w1", blocksOf(10), 1)
	ingest(t, s, batchOf("w1", 2, 0, storedEv(2, proto.Uint64(10), 11)), false)
	wantBlocks(t, s, "w1", map[uint64]kvevents.Block{10: {}, 11: {Parent: 10, HasParent: true}}, 2)
}

func TestSequencerStartsAfreshOnRestart(t *testing.T) {
	cfg := kvevents.SequencerConfig{}
	resets := recordResets(&cfg)
	s := kvevents.NewSequencer(cfg)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10), storedEv(2, nil, 11), storedEv(3, nil, 12)), false)
	if len(*resets) != 0 {
		t.Fatalf("resets before the restart: %v", *resets)
	}
	// The restarted worker's ids start again at 1, below the view's.
	ingest(t, s, batchOf("w1", 2, 0, storedEv(1, nil, 20)), false)
	if len(*resets) != 1 || (*resets)[0].worker != "w1" || len((*resets)[0].blocks) != 0 || (*resets)[0].last != 0 {
		t.Fatalf("resets %v, want one of w1 with no blocks at 0", *resets)
	}
	wantBlocks(t, s, "w1", blocksOf(20), 1)
	if st := s.Stats(); st.Duplicates != 0 || st.Applied != 4 {
		t.Fatalf("after the restart: %+v", st)
	}
}

func TestSequencerBoundsWorkers(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxWorkers: 1})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w2", 1, 0, storedEv(1, nil, 20)), false)
	if st := s.Stats(); st.DroppedWorkers != 1 || st.Applied != 1 {
		t.Fatalf("second worker: %+v", st)
	}
	if w := s.Workers(); !slices.Equal(w, []string{"w1"}) {
		t.Fatalf("workers %v", w)
	}
	// Forgetting one makes room.
	s.Forget("w1")
	ingest(t, s, batchOf("w2", 1, 0, storedEv(1, nil, 20)), false)
	wantBlocks(t, s, "w2", blocksOf(20), 1)
	wantBlocks(t, s, "w1", blocksOf(), 0)
}

func TestSequencerBoundsPending(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxPending: 2})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(2, nil, 20)), true)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(4, nil, 40)), false)
	if st := s.Stats(); st.DroppedPending != 1 || st.Applied != 0 {
		t.Fatalf("third early event: %+v", st)
	}
	// The dropped event is fetched again by the repair.
	req, epoch, ok := s.RepairRequest("w1")
	if !ok || epoch != 1 || req.FromEventId != 1 || req.ToEventId != 4 {
		t.Fatalf("repair request %v epoch %d ok %v", req, epoch, ok)
	}
	res := s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(1, nil, 10)), nil)
	wantNext(t, res, kvevents.RepairAgain)
	if res.Missing != 4 || res.Head != 4 {
		t.Fatalf("after the first answer: %+v", res)
	}
	req, epoch, _ = s.RepairRequest("w1")
	if req.FromEventId != 4 || req.ToEventId != 4 {
		t.Fatalf("second request %v", req)
	}
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(4, nil, 40)), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30, 40), 4)
}

func TestSequencerCountsDuplicates(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), false)
	if st := s.Stats(); st.Duplicates != 2 || st.Applied != 1 || st.Gaps != 1 {
		t.Fatalf("duplicates: %+v", st)
	}
	ingest(t, s, batchOf("w1", 1, 0, storedEv(2, nil, 20)), false)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30), 3)
}

func TestSequencerReportsAGapOnce(t *testing.T) {
	var applied []uint64
	s := kvevents.NewSequencer(kvevents.SequencerConfig{OnEvent: func(w string, e *triplanev1.KvEvent) { applied = append(applied, e.EventId) }})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
	// Further batches that show the gap while it is repaired do not start
	// another repair.
	ingest(t, s, batchOf("w1", 1, 0, storedEv(4, nil, 40)), false)
	ingest(t, s, batchOf("w1", 1, 6), false)
	if st := s.Stats(); st.Gaps != 1 {
		t.Fatalf("gaps: %+v", st)
	}
	req, epoch, ok := s.RepairRequest("w1")
	if !ok || req.WorkerId != "w1" || req.FromEventId != 1 || req.ToEventId != 6 || epoch != 1 {
		t.Fatalf("repair request %v epoch %d", req, epoch)
	}
	// An answer that fills the first gap only: ask again for the tail.
	res := s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(1, nil, 10), removedEv(2, 10)), nil)
	wantNext(t, res, kvevents.RepairAgain)
	if res.Err != nil || res.Missing != 5 || res.Head != 6 {
		t.Fatalf("partial answer: %+v", res)
	}
	req, epoch, _ = s.RepairRequest("w1")
	if req.FromEventId != 5 || req.ToEventId != 6 {
		t.Fatalf("second request %v", req)
	}
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(5, nil, 50), storedEv(6, nil, 60)), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(30, 40, 50, 60), 6)
	if !slices.Equal(applied, []uint64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("OnEvent saw %v", applied)
	}
	if st := s.Stats(); st.Resends != 2 || st.Applied != 6 {
		t.Fatalf("after the repair: %+v", st)
	}
	// The repair is over: the next gap starts another.
	ingest(t, s, batchOf("w1", 1, 0, storedEv(8, nil, 80)), true)
	if st := s.Stats(); st.Gaps != 2 {
		t.Fatalf("second gap: %+v", st)
	}
}

func TestSequencerRepairBacksOffThenGivesUp(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{RepairAttempts: 3})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
	timeout := errors.New("timeout")

	_, epoch, _ := s.RepairRequest("w1")
	res := s.RepairDone("w1", epoch, nil, timeout)
	wantNext(t, res, kvevents.RepairAfterBackoff)
	if res.Err != timeout || res.Failures != 1 {
		t.Fatalf("first failure: %+v", res)
	}
	// A success in between starts the count again.
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(1, nil, 10)), nil), kvevents.RepairAgain)
	for i, fail := range []struct {
		reply *triplanev1.KvResendReply
		err   error
	}{
		{nil, timeout},
		// A reply that breaks the protocol is a failure too.
		{&triplanev1.KvResendReply{WorkerId: "w1", Epoch: 1}, nil},
		{nil, timeout},
	} {
		res := s.RepairDone("w1", epoch, fail.reply, fail.err)
		if res.Err == nil || res.Failures != i+1 {
			t.Fatalf("failure %d: %+v", i+1, res)
		}
		if i < 2 {
			wantNext(t, res, kvevents.RepairAfterBackoff)
		} else {
			wantNext(t, res, kvevents.RepairGaveUp)
			if res.Missing != 2 || res.Head != 3 {
				t.Fatalf("gave up: %+v", res)
			}
		}
	}
	if st := s.Stats(); st.RepairFailures != 4 || st.Gaps != 1 {
		t.Fatalf("after giving up: %+v", st)
	}
	// The worker's next heartbeat starts a new repair, counting from 0.
	ingest(t, s, batchOf("w1", 1, 3), true)
	_, epoch, _ = s.RepairRequest("w1")
	if res := s.RepairDone("w1", epoch, nil, timeout); res.Failures != 1 || res.Next != kvevents.RepairAfterBackoff {
		t.Fatalf("new repair: %+v", res)
	}
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(2, nil, 20)), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30), 3)
}

func TestSequencerAppliesDumpsNotOlderThanTheView(t *testing.T) {
	cfg := kvevents.SequencerConfig{}
	resets := recordResets(&cfg)
	s := kvevents.NewSequencer(cfg)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10), storedEv(2, nil, 20), storedEv(3, nil, 30)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(6, nil, 60)), true)
	_, epoch, _ := s.RepairRequest("w1")
	// A dump taken before the view's last event says less than the view:
	// it fills nothing, which counts as a failed request.
	res := s.RepairDone("w1", epoch, dumpReply("w1", 1, 1, 10), nil)
	wantNext(t, res, kvevents.RepairAfterBackoff)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30), 3)
	if len(*resets) != 0 {
		t.Fatalf("old dump told OnReset: %v", *resets)
	}
	// A newer one replaces the view; the buffered event that follows it
	// is applied on top.
	wantNext(t, s.RepairDone("w1", epoch, dumpReply("w1", 1, 5, 20, 50), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(20, 50, 60), 6)
	if len(*resets) != 1 || !maps.Equal((*resets)[0].blocks, blocksOf(20, 50)) || (*resets)[0].last != 5 {
		t.Fatalf("resets %v, want the dump at 5", *resets)
	}
	if st := s.Stats(); st.Dumps != 2 {
		t.Fatalf("dumps: %+v", st)
	}
}

func TestSequencerIgnoresRepliesOfAnotherEpoch(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
	_, epoch, _ := s.RepairRequest("w1")
	// The worker restarts while the request is out: its new gap is left to
	// the repair under way.
	ingest(t, s, batchOf("w1", 2, 0, storedEv(2, nil, 22)), false)
	res := s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(1, nil, 10), storedEv(2, nil, 20)), nil)
	wantNext(t, res, kvevents.RepairAgain)
	wantBlocks(t, s, "w1", blocksOf(), 0)
	req, epoch, _ := s.RepairRequest("w1")
	if epoch != 2 || req.FromEventId != 1 || req.ToEventId != 2 {
		t.Fatalf("request after the restart %v epoch %d", req, epoch)
	}
	// A reply from a run other than the one asked is ignored as well; as
	// it fills nothing of a gap the view still has, it counts as failed
	// (the view's own reset above did not: the request was for the old
	// view).
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 3, storedEv(1, nil, 13)), nil), kvevents.RepairAfterBackoff)
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 2, storedEv(1, nil, 21)), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(21, 22), 2)
	if st := s.Stats(); st.RepairFailures != 1 || st.Resends != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// A forged heartbeat cannot keep a repair going: a head past the worker's
// last event is dropped once the worker answers that it has nothing more,
// and answers that never fill the gap (the view's epoch forged) are failed
// requests, spaced and bounded.
func TestSequencerRepairOfForgedHeartbeats(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{RepairAttempts: 3})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	// The good case beside it: a true head is repaired.
	ingest(t, s, batchOf("w1", 1, 2), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(2, nil, 20)), nil), kvevents.RepairStop)
	// A forged head: the worker's log has nothing past event 2.
	ingest(t, s, batchOf("w1", 1, 1<<63), true)
	_, epoch, _ = s.RepairRequest("w1")
	res := s.RepairDone("w1", epoch, rangeReply("w1", 1), nil)
	wantNext(t, res, kvevents.RepairStop)
	if res.Head != 2 || res.Missing != 3 {
		t.Fatalf("after the worker's empty answer: %+v", res)
	}
	wantBlocks(t, s, "w1", blocksOf(10, 20), 2)

	// A forged epoch takes over the view; the real worker's answers (its
	// own epoch) fill nothing of the forged gap.
	ingest(t, s, batchOf("w1", 1<<62, 5), true)
	_, epoch, _ = s.RepairRequest("w1")
	for i := range 3 {
		res := s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(3, nil, 30)), nil)
		if res.Err == nil || res.Failures != i+1 {
			t.Fatalf("answer %d: %+v", i+1, res)
		}
		if i < 2 {
			wantNext(t, res, kvevents.RepairAfterBackoff)
		} else {
			wantNext(t, res, kvevents.RepairGaveUp)
		}
	}
}

func TestSequencerForgottenWorkerEndsItsRepair(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(3, nil, 30)), true)
	_, epoch, _ := s.RepairRequest("w1")
	s.Forget("w1")
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(1, nil, 10)), nil), kvevents.RepairStop)
	if _, _, ok := s.RepairRequest("w1"); ok {
		t.Fatal("repair request for a forgotten worker")
	}
	if len(s.Workers()) != 0 || s.LastEventID("w1") != 0 {
		t.Fatalf("forgotten worker still followed: %v", s.Workers())
	}
}

func TestSequencerViewRestores(t *testing.T) {
	s1 := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s1, batchOf("w2", 7, 0, storedEv(1, nil, 5), storedEv(2, proto.Uint64(5), 6)), false)
	ingest(t, s1, batchOf("w1", 3, 0, storedEv(1, nil, 10, 30), removedEv(2, 30)), false)
	view := s1.View()
	if got := []string{view.Workers[0].WorkerId, view.Workers[1].WorkerId}; !slices.Equal(got, []string{"w1", "w2"}) {
		t.Fatalf("view workers %v, want sorted", got)
	}

	cfg := kvevents.SequencerConfig{}
	resets := recordResets(&cfg)
	s2 := kvevents.NewSequencer(cfg)
	// w2 is already followed: the saved entry does not overwrite it.
	ingest(t, s2, batchOf("w2", 8, 0, storedEv(1, nil, 80)), false)
	bad := proto.Clone(view).(*triplanev1.KvView)
	bad.Workers = append(bad.Workers,
		&triplanev1.KvWorkerView{WorkerId: "bad worker", Epoch: 1, Dump: &triplanev1.KvDump{}},
		&triplanev1.KvWorkerView{WorkerId: "w3", Epoch: 0, Dump: &triplanev1.KvDump{}},
		&triplanev1.KvWorkerView{WorkerId: "w4", Epoch: 1},
		&triplanev1.KvWorkerView{WorkerId: "w5", Epoch: 1, Dump: &triplanev1.KvDump{EventId: math.MaxUint64}})
	if n := s2.Restore(bad); n != 4 || s2.Stats().Malformed != 4 {
		t.Fatalf("Restore: %d malformed, stats %+v; want 4", n, s2.Stats())
	}
	if len(*resets) != 1 || (*resets)[0].worker != "w1" || (*resets)[0].last != 2 {
		t.Fatalf("resets %v, want w1's only", *resets)
	}
	wantBlocks(t, s2, "w1", blocksOf(10), 2)
	wantBlocks(t, s2, "w2", blocksOf(80), 1)
	// Batches continue from the saved id.
	ingest(t, s2, batchOf("w1", 3, 0, storedEv(3, proto.Uint64(10), 11)), false)
	wantBlocks(t, s2, "w1", map[uint64]kvevents.Block{10: {}, 11: {Parent: 10, HasParent: true}}, 3)

	s3 := kvevents.NewSequencer(kvevents.SequencerConfig{})
	if n := s3.Restore(view); n != 0 || !proto.Equal(s3.View(), view) {
		t.Fatalf("round trip: %d malformed, view %v, want %v", n, s3.View(), view)
	}
}

// With Follows, only listed workers get a view: a worker that left and
// still heartbeats (draining) does not come back after Forget, and its
// batches are counted.
func TestSequencerFollowsOnlyListedWorkers(t *testing.T) {
	listed := map[string]bool{"w1": true}
	s := kvevents.NewSequencer(kvevents.SequencerConfig{Follows: func(w string) bool { return listed[w] }})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w2", 1, 0, storedEv(1, nil, 20)), false)
	if got := s.Workers(); len(got) != 1 || got[0] != "w1" {
		t.Fatalf("workers %v, want only the listed w1", got)
	}
	// w1 leaves discovery, is forgotten, and heartbeats on.
	delete(listed, "w1")
	s.Forget("w1")
	ingest(t, s, batchOf("w1", 1, 1), false)
	if got := s.Workers(); len(got) != 0 {
		t.Fatalf("workers %v after w1 left", got)
	}
	if st := s.Stats(); st.Unfollowed != 2 || st.Applied != 1 {
		t.Fatalf("stats %+v", st)
	}
	// w2 is listed now: its heartbeat starts a view and a repair of what
	// it missed.
	listed["w2"] = true
	ingest(t, s, batchOf("w2", 1, 1), true)
}

// Progress is counted from the request: an answer whose events came live
// meanwhile (duplicates by the time it lands) is not a failure.
func TestSequencerRepairCountsProgressSinceTheRequest(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(4, nil, 40)), true)
	_, epoch, _ := s.RepairRequest("w1")
	ingest(t, s, batchOf("w1", 1, 0, storedEv(2, nil, 20)), false)
	res := s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(2, nil, 20)), nil)
	wantNext(t, res, kvevents.RepairAgain)
	if res.Err != nil || res.Failures != 0 {
		t.Fatalf("an answer overtaken by live events: %+v", res)
	}
}

// A worker's view keeps at most MaxBlocksPerWorker blocks, from events and
// dumps; what is beyond is counted, and the ids stay in order.
func TestSequencerBoundsAWorkersBlocks(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxBlocksPerWorker: 3})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10, 11), storedEv(2, nil, 12, 13), removedEv(3, 10), storedEv(4, nil, 14)), false)
	if blocks, last := s.Blocks("w1"); len(blocks) != 2 || last != 4 {
		t.Fatalf("w1: blocks %v at %d, want 11 and 14 at 4", blocks, last)
	}
	if st := s.Stats(); st.DroppedBlocks != 2 || st.Applied != 3 {
		t.Fatalf("stats %+v", st)
	}
	// A dump larger than the bound keeps the bound.
	ingest(t, s, batchOf("w1", 1, 0, storedEv(6, nil, 60)), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, dumpReply("w1", 1, 5, 1, 2, 3, 4, 5), nil), kvevents.RepairStop)
	if blocks, last := s.Blocks("w1"); len(blocks) != 3 || last != 6 {
		t.Fatalf("after a dump of 5 and the event after it: %d blocks, last %d", len(blocks), last)
	}
	if st := s.Stats(); st.DroppedBlocks != 2+2+1 {
		t.Fatalf("dropped %d, want 5", st.DroppedBlocks)
	}
}

// pageReply is one page of a paged dump at last of total blocks, after the
// hash after (nil: the first page).
func pageReply(worker string, epoch, last, total uint64, after *uint64, more bool, hashes ...uint64) *triplanev1.KvResendReply {
	r := dumpReply(worker, epoch, last, hashes...)
	d := r.GetDump()
	d.TotalBlocks, d.After, d.More = total, after, more
	return r
}

// A page that is not the one asked for is refused and counted, the pages
// taken stay, and the right page then completes the dump; pages that do
// not add up to their total start it over.
func TestSequencerRefusesStalePages(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 9), true)
	req, epoch, _ := s.RepairRequest("w1")
	if !req.DumpPages || req.DumpAfter != nil {
		t.Fatalf("first request %v", req)
	}
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 9, 4, nil, true, 10, 20), nil), kvevents.RepairAgain)
	req, epoch, _ = s.RepairRequest("w1")
	if req.DumpEventId != 9 || req.GetDumpAfter() != 20 || req.DumpAfter == nil {
		t.Fatalf("next page request %v", req)
	}
	for _, stale := range []*triplanev1.KvResendReply{
		pageReply("w1", 1, 8, 4, proto.Uint64(20), false, 30, 40), // another dump's
		pageReply("w1", 1, 9, 4, proto.Uint64(10), false, 15, 40), // cursor going backwards
		pageReply("w1", 1, 9, 4, proto.Uint64(25), false, 30, 40), // skipping
		pageReply("w1", 1, 9, 5, proto.Uint64(20), false, 30, 40), // another total
	} {
		res := s.RepairDone("w1", epoch, stale, nil)
		wantNext(t, res, kvevents.RepairAfterBackoff)
		if res.Err == nil || errors.Is(res.Err, kvevents.ErrInvalid) {
			t.Fatalf("stale page: %v", res.Err)
		}
		wantBlocks(t, s, "w1", blocksOf(), 0)
	}
	// Invalid pages never get that far.
	for _, bad := range []*triplanev1.KvResendReply{
		pageReply("w1", 1, 9, 4, proto.Uint64(20), false, 40, 30), // not increasing
		pageReply("w1", 1, 9, 4, proto.Uint64(20), false, 20, 40), // not after its cursor
		pageReply("w1", 1, 9, 4, proto.Uint64(20), true),          // no blocks, more to come
		pageReply("w1", 1, 9, 1, proto.Uint64(20), false, 30, 40), // over its total
	} {
		if res := s.RepairDone("w1", epoch, bad, nil); !errors.Is(res.Err, kvevents.ErrInvalid) {
			t.Fatalf("invalid page %v: %v", bad, res.Err)
		}
	}
	if st := s.Stats(); st.StalePages != 4 || st.DumpPages != 1 || st.DumpRestarts != 0 || st.RepairFailures != 8 {
		t.Fatalf("stats %v", st)
	}
	req, epoch, _ = s.RepairRequest("w1")
	if req.GetDumpAfter() != 20 {
		t.Fatalf("the pages taken were lost: %v", req)
	}
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 9, 4, proto.Uint64(20), false, 30, 40), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30, 40), 9)

	// The last page short of the total: not one state; start over.
	ingest(t, s, batchOf("w1", 1, 30), true)
	_, epoch, _ = s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 29, 3, nil, true, 1), nil), kvevents.RepairAgain)
	res := s.RepairDone("w1", epoch, pageReply("w1", 1, 29, 3, proto.Uint64(1), false, 2), nil)
	wantNext(t, res, kvevents.RepairAfterBackoff)
	if req, _, _ := s.RepairRequest("w1"); req.DumpAfter != nil {
		t.Fatalf("after a dump that did not add up: %v", req)
	}
	if st := s.Stats(); st.DumpRestarts != 1 || st.StalePages != 5 {
		t.Fatalf("stats %v", st)
	}
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30, 40), 9)
}

// A new first page, a range, another epoch or the end of the repair drop
// the pages taken.
func TestSequencerRestartsADump(t *testing.T) {
	cfg := kvevents.SequencerConfig{}
	resets := recordResets(&cfg)
	s := kvevents.NewSequencer(cfg)
	ingest(t, s, batchOf("w1", 1, 9), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 9, 3, nil, true, 10), nil), kvevents.RepairAgain)
	// The worker lost that dump and started another: taken, but a failed
	// request (a worker answering so forever must not page for ever).
	res := s.RepairDone("w1", epoch, pageReply("w1", 1, 12, 3, nil, true, 11), nil)
	wantNext(t, res, kvevents.RepairAfterBackoff)
	if res.Err == nil || res.Failures != 1 {
		t.Fatalf("a dump replaced: %+v", res)
	}
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 12, 3, proto.Uint64(11), false, 21, 31), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(11, 21, 31), 12)
	if st := s.Stats(); st.DumpRestarts != 1 || st.Dumps != 1 || st.DumpPages != 3 {
		t.Fatalf("stats %v", st)
	}

	// The worker restarts mid-dump: its next batch, of a new epoch,
	// resets the view and drops the old run's pages.
	ingest(t, s, batchOf("w1", 1, 40), true)
	_, epoch, _ = s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 40, 2, nil, true, 5), nil), kvevents.RepairAgain)
	ingest(t, s, batchOf("w1", 2, 0, storedEv(1, nil, 7)), false)
	wantBlocks(t, s, "w1", blocksOf(7), 1)
	// The old run's last page, answered late, is of no use.
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 40, 2, proto.Uint64(5), false, 6), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(7), 1)
	if st := s.Stats(); st.DumpRestarts != 2 || st.Dumps != 1 {
		t.Fatalf("stats %v", st)
	}
	// The reply of a new run before any batch of it drops the pages too.
	ingest(t, s, batchOf("w1", 2, 50), true)
	_, epoch, _ = s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 2, 50, 2, nil, true, 5), nil), kvevents.RepairAgain)
	// (An answer of another epoch fills nothing: a failed request.)
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 3, 50, 2, proto.Uint64(5), false, 6), nil), kvevents.RepairAfterBackoff)
	if req, _, _ := s.RepairRequest("w1"); req.DumpAfter != nil {
		t.Fatalf("after a reply of another epoch: %v", req)
	}
	// A range answer (the worker's ring holds the gap again) drops them.
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 2, 50, 2, nil, true, 5), nil), kvevents.RepairAgain)
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 2, storedEv(2, nil, 8)), nil), kvevents.RepairAgain)
	if req, _, _ := s.RepairRequest("w1"); req.DumpAfter != nil || req.FromEventId != 3 {
		t.Fatalf("after a range: %v", req)
	}
	// Giving up drops them.
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 2, 50, 2, nil, true, 5), nil), kvevents.RepairAgain)
	for range 9 {
		wantNext(t, s.RepairDone("w1", epoch, nil, errors.New("timeout")), kvevents.RepairAfterBackoff)
	}
	wantNext(t, s.RepairDone("w1", epoch, nil, errors.New("timeout")), kvevents.RepairGaveUp)
	if req, _, _ := s.RepairRequest("w1"); req.DumpAfter != nil {
		t.Fatalf("after giving up: %v", req)
	}
	if st := s.Stats(); st.DumpRestarts != 5 {
		t.Fatalf("stats %v", st)
	}
	if len(*resets) != 2 { // the completed dump and the restart
		t.Fatalf("resets %v", *resets)
	}
}

// A paged dump keeps at most MaxBlocksPerWorker blocks: reaching it
// completes the dump (the lowest hashes, as from a one-reply dump), the
// rest counted, and no more pages are asked for.
func TestSequencerBoundsAPagedDump(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxBlocksPerWorker: 3})
	ingest(t, s, batchOf("w1", 1, 5), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 5, 1000, nil, true, 1, 2), nil), kvevents.RepairAgain)
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 5, 1000, proto.Uint64(2), true, 3, 4), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(1, 2, 3), 5)
	// Only the block received and not kept counts, not the 996 the
	// worker claims and never sent.
	if st := s.Stats(); st.DroppedBlocks != 1 || st.Dumps != 1 {
		t.Fatalf("stats %v", st)
	}
}

// A worker claiming a dump of 2^64-1 blocks does not make the router count
// blocks it never received as dropped.
func TestSequencerCountsOnlyDroppedBlocksItReceived(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{MaxBlocksPerWorker: 2})
	ingest(t, s, batchOf("w1", 1, 5), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 5, math.MaxUint64, nil, true, 1, 2, 3), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(1, 2), 5)
	if st := s.Stats(); st.DroppedBlocks != 1 {
		t.Fatalf("dropped %d blocks, received 3 and kept 2: %v", st.DroppedBlocks, st)
	}
}

// repairAgainst runs worker's repair against answer, as the consumer's
// repairer does (without waiting), until it stops or gives up, at most
// limit requests; it returns the results.
func repairAgainst(t *testing.T, s *kvevents.Sequencer, worker string, limit int, answer func(*triplanev1.KvResendRequest) *triplanev1.KvResendReply) []kvevents.RepairResult {
	t.Helper()
	var out []kvevents.RepairResult
	for range limit {
		req, epoch, ok := s.RepairRequest(worker)
		if !ok {
			t.Fatalf("%s not followed", worker)
		}
		res := s.RepairDone(worker, epoch, answer(req), nil)
		out = append(out, res)
		if res.Next == kvevents.RepairStop || res.Next == kvevents.RepairGaveUp {
			return out
		}
	}
	t.Fatalf("the repair of %s did not end in %d requests: %v", worker, limit, s.Stats())
	return nil
}

// A worker that answers every request with the first page of a new dump
// does not keep a router paging for ever: each replaced dump is a failed
// request, so the repair backs off and gives up.
func TestSequencerGivesUpOnDumpsThatNeverGoPastTheFirstPage(t *testing.T) {
	const attempts = 5
	s := kvevents.NewSequencer(kvevents.SequencerConfig{RepairAttempts: attempts})
	ingest(t, s, batchOf("w1", 1, 9), true)
	n := uint64(0)
	results := repairAgainst(t, s, "w1", 100, func(*triplanev1.KvResendRequest) *triplanev1.KvResendReply {
		n++
		return pageReply("w1", 1, 9+n, 2, nil, true, n)
	})
	// The first page starts a dump; each one after replaces it.
	if len(results) != 1+attempts {
		t.Fatalf("%d requests, want %d: %v", len(results), 1+attempts, s.Stats())
	}
	wantNext(t, results[0], kvevents.RepairAgain)
	for i, res := range results[1:] {
		if res.Failures != i+1 || res.Err == nil {
			t.Fatalf("request %d: %+v", i+2, res)
		}
		if i+1 < attempts {
			wantNext(t, res, kvevents.RepairAfterBackoff)
		}
	}
	wantNext(t, results[len(results)-1], kvevents.RepairGaveUp)
	// attempts dumps replaced, and the last dropped by giving up.
	if st := s.Stats(); st.RepairFailures != attempts || st.DumpRestarts != attempts+1 || st.Dumps != 0 {
		t.Fatalf("stats %v", st)
	}
}

// A worker whose dumps never add up to their total (off by one) restarts
// the dump at every request after the last page; whatever the number of
// pages, the pages taken in between do not wipe out the failures, and the
// repair gives up.
func TestSequencerGivesUpOnDumpsThatNeverAddUp(t *testing.T) {
	const attempts = 4
	for _, pages := range []uint64{2, 3, 5} {
		s := kvevents.NewSequencer(kvevents.SequencerConfig{RepairAttempts: attempts})
		ingest(t, s, batchOf("w1", 1, 9), true)
		// One block a page, total one more than the blocks.
		results := repairAgainst(t, s, "w1", 1000, func(req *triplanev1.KvResendRequest) *triplanev1.KvResendReply {
			if req.DumpAfter == nil {
				return pageReply("w1", 1, 9, pages+1, nil, true, 1)
			}
			after := req.GetDumpAfter()
			return pageReply("w1", 1, 9, pages+1, proto.Uint64(after), after+1 < pages, after+1)
		})
		last := results[len(results)-1]
		wantNext(t, last, kvevents.RepairGaveUp)
		if want := attempts * int(pages); len(results) != want {
			t.Fatalf("%d pages: %d requests, want %d: %v", pages, len(results), want, s.Stats())
		}
		backoffs := 0
		for _, res := range results {
			if res.Next == kvevents.RepairAfterBackoff {
				backoffs++
			}
		}
		if st := s.Stats(); backoffs != attempts-1 || st.RepairFailures != attempts || st.Dumps != 0 || st.StalePages != attempts {
			t.Fatalf("%d pages: %d backoffs, stats %v", pages, backoffs, st)
		}
		wantBlocks(t, s, "w1", blocksOf(), 0)
	}
}

// Events that come late and move the view past the dump being assembled,
// while a gap remains: the next request asks for the range missing, not
// the dump's next page.
func TestSequencerDropsADumpTheViewHasPassed(t *testing.T) {
	s := kvevents.NewSequencer(kvevents.SequencerConfig{})
	ingest(t, s, batchOf("w1", 1, 0, storedEv(1, nil, 10)), false)
	ingest(t, s, batchOf("w1", 1, 0, storedEv(5, nil, 50)), true)
	_, epoch, _ := s.RepairRequest("w1")
	wantNext(t, s.RepairDone("w1", epoch, pageReply("w1", 1, 3, 3, nil, true, 10), nil), kvevents.RepairAgain)
	// Events 2 to 3 arrive late: the view is at 3, what the dump holds;
	// the gap is event 4.
	ingest(t, s, batchOf("w1", 1, 0, storedEv(2, nil, 20), storedEv(3, nil, 30)), false)
	req, _, _ := s.RepairRequest("w1")
	if req.DumpAfter != nil || req.FromEventId != 4 || req.ToEventId != 5 {
		t.Fatalf("request after the view passed the dump: %v", req)
	}
	if st := s.Stats(); st.DumpRestarts != 1 {
		t.Fatalf("stats %v", st)
	}
	wantNext(t, s.RepairDone("w1", epoch, rangeReply("w1", 1, storedEv(4, nil, 40)), nil), kvevents.RepairStop)
	wantBlocks(t, s, "w1", blocksOf(10, 20, 30, 40, 50), 5)
}
