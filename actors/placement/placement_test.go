package placement_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/placement"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

func ref(kind, id string) *triplanev1.ActorRef { return &triplanev1.ActorRef{Kind: kind, Id: id} }

// step decides cmd on s, checks Decide left s alone and that the reply
// equals folding the events, and applies them.
func step(t *testing.T, s proto.Message, cmd proto.Message) (actors.Decision, *triplanev1.PlacementState) {
	t.Helper()
	m := placement.Machine{}
	before := proto.Clone(s)
	d := m.Decide(s, actors.Command{ID: "c", Msg: cmd, Now: time.Unix(1, 0)})
	if !proto.Equal(before, s) {
		t.Fatal("Decide modified the state")
	}
	if d.Err != nil {
		return d, s.(*triplanev1.PlacementState)
	}
	for _, e := range d.Events {
		if err := m.Apply(s, e); err != nil {
			t.Fatal(err)
		}
	}
	if !proto.Equal(d.Reply, s) {
		t.Fatalf("reply %v differs from the folded state %v", d.Reply, s)
	}
	return d, s.(*triplanev1.PlacementState)
}

func TestPlacesLeastLoadedAndMovesOffLeftNodes(t *testing.T) {
	m := placement.Machine{}
	s := m.Initial("g")
	_, st := step(t, s, &triplanev1.PlacementReconcile{Epoch: 5, Leader: "a", Nodes: []string{"b", "a"},
		Actors: []*triplanev1.ActorRef{ref("router", "m1"), ref("router", "m2"), ref("router", "m3"), ref("router", "m1")}})
	if got := []string{placement.Placement(st, "router", "m1"), placement.Placement(st, "router", "m2"), placement.Placement(st, "router", "m3")}; strings.Join(got, ",") != "a,b,a" {
		t.Fatalf("placement %v, want a,b,a (least loaded, ties to the lowest id)", got)
	}
	// Same view again: nothing to decide.
	d, _ := step(t, s, &triplanev1.PlacementReconcile{Epoch: 5, Leader: "a", Nodes: []string{"a", "b"},
		Actors: []*triplanev1.ActorRef{ref("router", "m1"), ref("router", "m2"), ref("router", "m3")}})
	if len(d.Events) != 0 {
		t.Fatalf("idempotent reconcile produced %v", d.Events)
	}
	// Node a leaves, a new leader takes over, m3 is no longer wanted.
	d, st = step(t, s, &triplanev1.PlacementReconcile{Epoch: 9, Leader: "b", Nodes: []string{"b", "c"},
		Actors: []*triplanev1.ActorRef{ref("router", "m1"), ref("router", "m2")}})
	if placement.Placement(st, "router", "m1") != "c" || placement.Placement(st, "router", "m2") != "b" || placement.Placement(st, "router", "m3") != "" {
		t.Fatalf("after a left: %v", st.Assignments)
	}
	var reason string
	for _, e := range d.Events {
		if p, ok := e.(*triplanev1.PlacementActorPlaced); ok && p.Actor.Id == "m1" {
			reason = p.Reason
		}
	}
	if !strings.Contains(reason, "node a left") {
		t.Fatalf("move reason %q does not say why", reason)
	}
	// The journal replays to the same state.
	folded, err := actors.Fold(m, "g", append([]proto.Message(nil), d.Events...)...)
	if err != nil || folded == nil {
		t.Fatal(err)
	}
}

func TestDeposedLeaderIsFenced(t *testing.T) {
	s := placement.Machine{}.Initial("g")
	step(t, s, &triplanev1.PlacementReconcile{Epoch: 7, Leader: "a", Nodes: []string{"a"}, Actors: []*triplanev1.ActorRef{ref("router", "m")}})
	d, _ := step(t, s, &triplanev1.PlacementReconcile{Epoch: 6, Leader: "old", Nodes: []string{"old"}, Actors: []*triplanev1.ActorRef{ref("router", "m")}})
	if !errors.Is(d.Err, placement.ErrFenced) {
		t.Fatalf("older epoch: %v, want ErrFenced", d.Err)
	}
}

func TestBadInputIsRejected(t *testing.T) {
	s := placement.Machine{}.Initial("g")
	for name, cmd := range map[string]proto.Message{
		"no epoch":    &triplanev1.PlacementReconcile{Leader: "a"},
		"no leader":   &triplanev1.PlacementReconcile{Epoch: 1},
		"empty node":  &triplanev1.PlacementReconcile{Epoch: 1, Leader: "a", Nodes: []string{""}},
		"empty actor": &triplanev1.PlacementReconcile{Epoch: 1, Leader: "a", Actors: []*triplanev1.ActorRef{ref("router", "")}},
		"unknown":     &triplanev1.LedgerGet{},
	} {
		if d, _ := step(t, s, cmd); d.Err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// The good command next to the bad ones.
	if d, _ := step(t, s, &triplanev1.PlacementReconcile{Epoch: 1, Leader: "a", Nodes: []string{"a"}}); d.Err != nil {
		t.Fatal(d.Err)
	}
	if err := (placement.Machine{}).Apply(s, &triplanev1.LedgerDeposited{}); err == nil {
		t.Fatal("foreign event applied")
	}
}

func TestNoLiveNodeLeavesActorUnplaced(t *testing.T) {
	s := placement.Machine{}.Initial("g")
	_, st := step(t, s, &triplanev1.PlacementReconcile{Epoch: 1, Leader: "a", Actors: []*triplanev1.ActorRef{ref("router", "m")}})
	if len(st.Assignments) != 1 || st.Assignments[0].NodeId != "" {
		t.Fatalf("%v", st.Assignments)
	}
	_, st = step(t, s, &triplanev1.PlacementReconcile{Epoch: 1, Leader: "a", Nodes: []string{"n"}, Actors: []*triplanev1.ActorRef{ref("router", "m")}})
	if placement.Placement(st, "router", "m") != "n" {
		t.Fatalf("%v", st.Assignments)
	}
}

func TestEmptyGroupJournalsNothing(t *testing.T) {
	s := placement.Machine{}.Initial("g")
	if d, _ := step(t, s, &triplanev1.PlacementReconcile{Epoch: 3, Leader: "a", Nodes: []string{"a"}}); len(d.Events) != 0 {
		t.Fatalf("events %v for an empty group", d.Events)
	}
}
