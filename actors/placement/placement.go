// Package placement is the event-sourced placement state machine: for one
// placement group it decides which live node hosts each wanted singleton
// actor, and journals every decision with its reason, so `triplane replay`
// can say why an actor lives where it lives. The control plane's placement
// leader (planes/control) feeds it its view of the cluster and publishes
// the resulting assignments to etcd in fenced transactions.
package placement

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Kind of placement actors; the actor id is the placement group.
const Kind = "placement"

// ErrFenced refuses a command from a leader older than the one the state
// has seen: a deposed leader cannot journal decisions.
var ErrFenced = errors.New("placement: command from a deposed leader")

// Machine is the placement state machine.
type Machine struct{}

var _ actors.Machine = Machine{}

func (Machine) Kind() string          { return Kind }
func (Machine) SchemaVersion() uint32 { return 1 }
func (Machine) Initial(id string) proto.Message {
	return &triplanev1.PlacementState{Group: id}
}

// Decide handles PlacementReconcile and PlacementGet.
func (m Machine) Decide(state proto.Message, cmd actors.Command) actors.Decision {
	s := state.(*triplanev1.PlacementState)
	switch c := cmd.Msg.(type) {
	case *triplanev1.PlacementGet:
		return actors.Decision{Reply: proto.Clone(s)}
	case *triplanev1.PlacementReconcile:
		return m.reconcile(s, c)
	}
	return actors.Decision{Err: fmt.Errorf("placement: unknown command %T", cmd.Msg)}
}

func (m Machine) reconcile(s *triplanev1.PlacementState, c *triplanev1.PlacementReconcile) actors.Decision {
	if c.Epoch <= 0 || c.Leader == "" {
		return actors.Decision{Err: fmt.Errorf("placement: reconcile needs a positive epoch and a leader, got epoch %d leader %q", c.Epoch, c.Leader)}
	}
	if c.Epoch < s.Epoch {
		return actors.Decision{Err: fmt.Errorf("%w: epoch %d of %s is older than epoch %d of %s", ErrFenced, c.Epoch, c.Leader, s.Epoch, s.Leader)}
	}
	nodes := make([]string, 0, len(c.Nodes))
	for i, n := range c.Nodes {
		if n == "" {
			return actors.Decision{Err: fmt.Errorf("placement: node %d has an empty id", i)}
		}
		nodes = append(nodes, n)
	}
	slices.Sort(nodes)
	nodes = slices.Compact(nodes)
	want := make([]*triplanev1.ActorRef, 0, len(c.Actors))
	for i, a := range c.Actors {
		if a.GetKind() == "" || a.GetId() == "" {
			return actors.Decision{Err: fmt.Errorf("placement: actor %d needs a kind and an id, got %q/%q", i, a.GetKind(), a.GetId())}
		}
		want = append(want, &triplanev1.ActorRef{Kind: a.Kind, Id: a.Id})
	}
	slices.SortFunc(want, compareRef)
	want = slices.CompactFunc(want, func(a, b *triplanev1.ActorRef) bool { return compareRef(a, b) == 0 })

	// An empty group decides nothing: no events, so a node that never
	// places an actor leaves no placement journal behind.
	if len(want) == 0 && len(s.Assignments) == 0 {
		return actors.Decision{Reply: proto.Clone(s)}
	}
	// Decide on a copy: each event is applied to it at once, so later
	// choices see the load of earlier ones.
	next := proto.Clone(s).(*triplanev1.PlacementState)
	var events []proto.Message
	emit := func(e proto.Message) {
		_ = m.Apply(next, e) // events built here always apply
		events = append(events, e)
	}
	if c.Epoch != s.Epoch || c.Leader != s.Leader {
		emit(&triplanev1.PlacementLeaderChanged{Epoch: c.Epoch, Leader: c.Leader})
	}
	for _, n := range s.Nodes {
		if _, ok := slices.BinarySearch(nodes, n); !ok {
			emit(&triplanev1.PlacementNodeLeft{NodeId: n})
		}
	}
	for _, n := range nodes {
		if _, ok := slices.BinarySearch(s.Nodes, n); !ok {
			emit(&triplanev1.PlacementNodeJoined{NodeId: n})
		}
	}
	for _, a := range s.Assignments {
		if _, ok := slices.BinarySearchFunc(want, a.Actor, compareRef); !ok {
			emit(&triplanev1.PlacementActorReleased{Actor: a.Actor, NodeId: a.NodeId, Reason: "no longer wanted"})
		}
	}
	for _, a := range want {
		cur := find(next, a)
		switch {
		case cur == nil || cur.NodeId == "":
			if n, load, ok := leastLoaded(next); ok {
				emit(&triplanev1.PlacementActorPlaced{Actor: a, NodeId: n, Epoch: c.Epoch,
					Reason: fmt.Sprintf("placed on the least-loaded live node (%d actors before; ties go to the lowest node id)", load)})
			} else if cur == nil {
				emit(&triplanev1.PlacementActorPlaced{Actor: a, Epoch: c.Epoch, Reason: "wanted, but no live node to place it on"})
			}
		case !live(next, cur.NodeId):
			if n, load, ok := leastLoaded(next); ok {
				emit(&triplanev1.PlacementActorPlaced{Actor: a, NodeId: n, PreviousNodeId: cur.NodeId, Epoch: c.Epoch,
					Reason: fmt.Sprintf("node %s left (gone, draining or unhealthy); moved to the least-loaded live node (%d actors before)", cur.NodeId, load)})
			} else {
				emit(&triplanev1.PlacementActorPlaced{Actor: a, PreviousNodeId: cur.NodeId, Epoch: c.Epoch,
					Reason: fmt.Sprintf("node %s left (gone, draining or unhealthy) and no live node remains", cur.NodeId)})
			}
		}
	}
	return actors.Decision{Events: events, Reply: next}
}

// Apply folds one event into the state.
func (Machine) Apply(state proto.Message, event proto.Message) error {
	s := state.(*triplanev1.PlacementState)
	switch e := event.(type) {
	case *triplanev1.PlacementLeaderChanged:
		s.Epoch, s.Leader = e.Epoch, e.Leader
	case *triplanev1.PlacementNodeJoined:
		if i, ok := slices.BinarySearch(s.Nodes, e.NodeId); !ok {
			s.Nodes = slices.Insert(s.Nodes, i, e.NodeId)
		}
	case *triplanev1.PlacementNodeLeft:
		if i, ok := slices.BinarySearch(s.Nodes, e.NodeId); ok {
			s.Nodes = slices.Delete(s.Nodes, i, i+1)
		}
	case *triplanev1.PlacementActorPlaced:
		if e.Actor == nil {
			return errors.New("placement: ActorPlaced without an actor")
		}
		a := &triplanev1.PlacementAssignment{Actor: e.Actor, NodeId: e.NodeId, Reason: e.Reason, Epoch: e.Epoch}
		i, ok := slices.BinarySearchFunc(s.Assignments, e.Actor, assignmentRef)
		if ok {
			s.Assignments[i] = a
		} else {
			s.Assignments = slices.Insert(s.Assignments, i, a)
		}
	case *triplanev1.PlacementActorReleased:
		if i, ok := slices.BinarySearchFunc(s.Assignments, e.Actor, assignmentRef); ok {
			s.Assignments = slices.Delete(s.Assignments, i, i+1)
		}
	default:
		return fmt.Errorf("placement: unknown event %T", event)
	}
	s.Applied++
	return nil
}

// Placement returns the node an actor is assigned to in s ("" if none).
func Placement(s *triplanev1.PlacementState, kind, id string) string {
	if a := find(s, &triplanev1.ActorRef{Kind: kind, Id: id}); a != nil {
		return a.NodeId
	}
	return ""
}

func compareRef(a, b *triplanev1.ActorRef) int {
	return cmp.Or(cmp.Compare(a.GetKind(), b.GetKind()), cmp.Compare(a.GetId(), b.GetId()))
}

func assignmentRef(a *triplanev1.PlacementAssignment, r *triplanev1.ActorRef) int {
	return compareRef(a.Actor, r)
}

func find(s *triplanev1.PlacementState, r *triplanev1.ActorRef) *triplanev1.PlacementAssignment {
	if i, ok := slices.BinarySearchFunc(s.Assignments, r, assignmentRef); ok {
		return s.Assignments[i]
	}
	return nil
}

func live(s *triplanev1.PlacementState, node string) bool {
	_, ok := slices.BinarySearch(s.Nodes, node)
	return ok
}

// leastLoaded picks the live node hosting the fewest actors, the lowest id
// on a tie, so a decision depends on the state alone.
func leastLoaded(s *triplanev1.PlacementState) (string, int, bool) {
	if len(s.Nodes) == 0 {
		return "", 0, false
	}
	load := make(map[string]int, len(s.Nodes))
	for _, a := range s.Assignments {
		load[a.NodeId]++
	}
	best := s.Nodes[0]
	for _, n := range s.Nodes[1:] {
		if load[n] < load[best] {
			best = n
		}
	}
	return best, load[best], true
}
