package router_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	routerm "github.com/triplane-dev/triplane/actors/router"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

func req(id, policy string, cands ...*triplanev1.RouterCandidate) *triplanev1.RouteRequest {
	return &triplanev1.RouteRequest{RequestId: id, Policy: policy, Blocks: 8, FirstHash: 42, Candidates: cands}
}

func TestDecideJournalsReasons(t *testing.T) {
	m := routerm.Machine{}
	s := m.Initial("r1")
	hot := &triplanev1.RouterCandidate{Worker: "hot", Overlap: 6, BlocksUsed: 1}
	cold := &triplanev1.RouterCandidate{Worker: "cold", BlocksUsed: 0}
	d := m.Decide(s, actors.Command{Msg: req("a", "kv", hot, cold), Rand: 7})
	if d.Err != nil {
		t.Fatal(d.Err)
	}
	ev := d.Events[0].(*triplanev1.RouteDecided)
	if ev.Worker != "hot" || ev.Overlap != 6 || len(ev.Scores) != 2 || d.Reply.(*triplanev1.RouteReply).Worker != "hot" {
		t.Fatalf("decision %v reply %v", ev, d.Reply)
	}
	if err := m.Apply(s, ev); err != nil {
		t.Fatal(err)
	}
	st := s.(*triplanev1.RouterState)
	if st.Decisions != 1 || decisionsOf(st, "hot") != 1 || len(st.Workers) != 1 || st.OverlapBlocks != 6 || st.Blocks != 8 {
		t.Fatalf("state %v", st)
	}
	// Same state and command: same decision (replay).
	d2 := m.Decide(s, actors.Command{Msg: req("b", "round-robin", hot, cold), Rand: 1})
	d3 := m.Decide(proto.Clone(s), actors.Command{Msg: req("b", "round-robin", hot, cold), Rand: 1})
	if !proto.Equal(d2.Events[0], d3.Events[0]) {
		t.Fatal("decision is not a function of state and command")
	}
	folded, err := actors.Fold(m, "r1", ev)
	if err != nil || !proto.Equal(folded, s) {
		t.Fatalf("fold %v %v", folded, err)
	}
}

func TestDecideRejectsBadRequests(t *testing.T) {
	m := routerm.Machine{}
	s := m.Initial("r1")
	w := func(id string) *triplanev1.RouterCandidate { return &triplanev1.RouterCandidate{Worker: id} }
	for _, tc := range []struct {
		name string
		msg  proto.Message
		want string
	}{
		{"no id", req("", "kv", w("a")), "empty request id"},
		{"no workers", req("x", "kv"), "no workers"},
		{"bad policy", req("x", "fastest", w("a")), "unknown policy"},
		{"dup worker", req("x", "kv", w("a"), w("a")), "offered twice"},
		{"dup worker unsorted", req("x", "kv", w("b"), w("a"), w("c"), w("a")), "worker \"a\" offered twice"},
		{"dup before empty", req("x", "kv", w("b"), w("b"), w("")), "worker \"b\" offered twice"},
		{"empty after sorted", req("x", "kv", w("a"), w("b"), w("")), "without a worker id"},
		{"dup worker of many", req("x", "kv", append(manyWorkers(20), w("w03"))...), "worker \"w03\" offered twice"},
		{"empty worker", req("x", "kv", w("")), "without a worker id"},
		{"negative weight", &triplanev1.RouteRequest{RequestId: "x", Policy: "kv", OverlapWeight: -1, Candidates: []*triplanev1.RouterCandidate{w("a")}}, "not negative"},
		{"unknown command", &triplanev1.LedgerGet{}, "unknown command"},
	} {
		d := m.Decide(s, actors.Command{Msg: tc.msg})
		if d.Err == nil || !strings.Contains(d.Err.Error(), tc.want) || len(d.Events) != 0 {
			t.Errorf("%s: err %v events %d, want %q", tc.name, d.Err, len(d.Events), tc.want)
		}
	}
	if d := m.Decide(s, actors.Command{Msg: req("x", "kv")}); !errors.Is(d.Err, router.ErrNoWorkers) {
		t.Errorf("no workers: %v", d.Err)
	}
	if err := m.Apply(s, &triplanev1.LedgerDeposited{}); err == nil {
		t.Error("foreign event applied")
	}
}

func manyWorkers(n int) []*triplanev1.RouterCandidate {
	var out []*triplanev1.RouterCandidate
	for i := range n {
		out = append(out, &triplanev1.RouterCandidate{Worker: fmt.Sprintf("w%02d", i)})
	}
	return out
}

// Candidates in order, or not, many or few, without duplicates are taken.
func TestDecideTakesDistinctWorkers(t *testing.T) {
	m := routerm.Machine{}
	s := m.Initial("r1")
	w := func(id string) *triplanev1.RouterCandidate { return &triplanev1.RouterCandidate{Worker: id} }
	many := manyWorkers(20)
	for _, cands := range [][]*triplanev1.RouterCandidate{{w("a"), w("b")}, {w("b"), w("a"), w("c")}, many, append([]*triplanev1.RouterCandidate{many[19]}, many[:19]...)} {
		d := m.Decide(s, actors.Command{Msg: req("x", "kv", cands...)})
		if d.Err != nil {
			t.Fatalf("%d candidates: %v", len(cands), d.Err)
		}
		// Every candidate scored, whether the scores fit the decision's
		// own room (8) or not.
		scores := d.Events[0].(*triplanev1.RouteDecided).Scores
		if len(scores) != len(cands) {
			t.Fatalf("%d candidates, %d scores", len(cands), len(scores))
		}
		for i, sc := range scores {
			if sc == nil || (i > 0 && scores[i-1].Worker >= sc.Worker) {
				t.Fatalf("%d candidates: scores %v", len(cands), scores)
			}
		}
	}
}

func decisionsOf(s *triplanev1.RouterState, worker string) uint64 {
	for _, w := range s.Workers {
		if w.Worker == worker {
			return w.Decisions
		}
	}
	return 0
}

func TestPerWorkerCountersBounded(t *testing.T) {
	m := routerm.Machine{}
	s := m.Initial("r").(*triplanev1.RouterState)
	n := routerm.MaxTrackedWorkers + 50
	for i := range n {
		_ = m.Apply(s, &triplanev1.RouteDecided{Worker: "w" + string(rune('a'+i%26)) + strings.Repeat("x", i/26)})
	}
	// The first MaxTrackedWorkers workers keep their own counters; the
	// last 50 share OtherWorkers'.
	if len(s.Workers) != routerm.MaxTrackedWorkers+1 || decisionsOf(s, routerm.OtherWorkers) != 50 {
		t.Fatalf("%d counters, other %d", len(s.Workers), decisionsOf(s, routerm.OtherWorkers))
	}
	for i, w := range s.Workers {
		if i > 0 && s.Workers[i-1].Worker >= w.Worker {
			t.Fatalf("counters out of order at %d: %q then %q", i, s.Workers[i-1].Worker, w.Worker)
		}
	}
	// A worker counted before the bound keeps counting under its name.
	_ = m.Apply(s, &triplanev1.RouteDecided{Worker: "wa"})
	if decisionsOf(s, "wa") != 2 || decisionsOf(s, routerm.OtherWorkers) != 50 {
		t.Fatalf("wa %d, other %d", decisionsOf(s, "wa"), decisionsOf(s, routerm.OtherWorkers))
	}
}

// A snapshot taken before RouterState.workers holds its counters in the
// per_worker map: upgraded, it equals the state replaying the same events
// gives, and the events after it count on.
func TestUpgradeOldSnapshot(t *testing.T) {
	m := routerm.Machine{}
	events := []proto.Message{&triplanev1.RouteDecided{Worker: "b", Blocks: 2}, &triplanev1.RouteDecided{Worker: "a"},
		&triplanev1.RouteDecided{Worker: "b", Overlap: 1}}
	replayed, err := actors.Fold(m, "r", events...)
	if err != nil {
		t.Fatal(err)
	}
	old, err := proto.Marshal(&triplanev1.RouterState{Id: "r", Decisions: 3, Blocks: 2, OverlapBlocks: 1,
		PerWorker: map[string]uint64{"b": 2, "a": 1}})
	if err != nil {
		t.Fatal(err)
	}
	s := m.Initial("r")
	if err := proto.Unmarshal(old, s); err != nil {
		t.Fatal(err)
	}
	if proto.Equal(s, replayed) {
		t.Fatal("the old form equals the new one before the upgrade: the test shows nothing")
	}
	actors.Upgrade(m, s)
	if !proto.Equal(s, replayed) {
		t.Fatalf("upgraded %v, replayed %v", s, replayed)
	}
	actors.Upgrade(m, s) // a state in the current form stays as it is
	if !proto.Equal(s, replayed) {
		t.Fatalf("upgraded twice %v, replayed %v", s, replayed)
	}
	// Apply upgrades a state nobody upgraded before counting.
	s2 := m.Initial("r")
	if err := proto.Unmarshal(old, s2); err != nil {
		t.Fatal(err)
	}
	next := &triplanev1.RouteDecided{Worker: "a"}
	if err := m.Apply(s2, next); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(replayed, next); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(s2, replayed) || decisionsOf(s2.(*triplanev1.RouterState), "a") != 2 {
		t.Fatalf("applied to the old form %v, to the replayed %v", s2, replayed)
	}
}

// An old snapshot of a router at the bound (MaxTrackedWorkers counters
// and OtherWorkers') upgrades to what replay gives: every counter kept,
// though OtherWorkers' sorts first.
func TestUpgradeAtTheBound(t *testing.T) {
	m := routerm.Machine{}
	var events []proto.Message
	for i := range routerm.MaxTrackedWorkers + 3 {
		events = append(events, &triplanev1.RouteDecided{Worker: fmt.Sprintf("w%05d", i)})
	}
	replayed, err := actors.Fold(m, "r", events...)
	if err != nil {
		t.Fatal(err)
	}
	old := &triplanev1.RouterState{Id: "r", Decisions: uint64(len(events)), PerWorker: map[string]uint64{}}
	for _, w := range replayed.(*triplanev1.RouterState).Workers {
		old.PerWorker[w.Worker] = w.Decisions
	}
	if len(old.PerWorker) != routerm.MaxTrackedWorkers+1 || old.PerWorker[routerm.OtherWorkers] != 3 {
		t.Fatalf("the old form holds %d counters, other %d", len(old.PerWorker), old.PerWorker[routerm.OtherWorkers])
	}
	m.Upgrade(old)
	if !proto.Equal(old, replayed) {
		t.Fatalf("upgraded at the bound: %d counters, replay %d", len(old.Workers), len(replayed.(*triplanev1.RouterState).Workers))
	}
}

// A state holding both forms (an older binary snapshotting a newer one's
// state keeps the list as unknown fields, then writes its map beside it)
// adds the map's counters to the list's.
func TestUpgradeMergesBothForms(t *testing.T) {
	s := &triplanev1.RouterState{Id: "r", PerWorker: map[string]uint64{"a": 2, "c": 1},
		Workers: []*triplanev1.WorkerDecisions{{Worker: "a", Decisions: 1}, {Worker: "b", Decisions: 4}}}
	routerm.Machine{}.Upgrade(s)
	want := []*triplanev1.WorkerDecisions{{Worker: "a", Decisions: 3}, {Worker: "b", Decisions: 4}, {Worker: "c", Decisions: 1}}
	if len(s.PerWorker) != 0 || !proto.Equal(s, &triplanev1.RouterState{Id: "r", Workers: want}) {
		t.Fatalf("merged: %v", s)
	}
}
