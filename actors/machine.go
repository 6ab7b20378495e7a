// Package actors holds the actor state machines and the protoactor-go host
// that runs them.
//
// A state machine is the functional core: Decide takes the state and a
// command and returns events, effects and a reply; Apply folds one event
// into the state. Neither may start goroutines, read clocks, draw random
// numbers or do I/O: the time and a random seed arrive with the command.
// That is what lets the same machine run under the host (real planes), the
// simulator (sim/) and `triplane replay`, and reach the same state.
package actors

import (
	"fmt"
	"sort"
	"time"

	"google.golang.org/protobuf/proto"
)

// Command is one input to a state machine.
type Command struct {
	// ID identifies the command, for tracing and idempotence.
	ID string
	// Msg is the command itself.
	Msg proto.Message
	// Now is the time the command is handled at; machines use it instead of
	// a clock.
	Now time.Time
	// Rand is a random value drawn by the host for this command; machines
	// use it instead of a random source.
	Rand uint64
}

// Address names an actor: its kind and its id within the kind.
type Address struct {
	Kind string
	ID   string
}

func (a Address) String() string { return string(a.AppendTo(nil)) }

// AppendTo appends the address as String writes it.
func (a Address) AppendTo(b []byte) []byte { return append(append(append(b, a.Kind...), '/'), a.ID...) }

// Effect is something the host does after the events are persisted.
type Effect interface{ effect() }

// Send delivers Msg as a command to another actor (fire and forget).
type Send struct {
	To  Address
	Msg proto.Message
}

// SetTimer delivers Msg to this actor after After, replacing any timer of
// the same Name.
type SetTimer struct {
	Name  string
	After time.Duration
	Msg   proto.Message
}

// CancelTimer cancels the timer Name, if set.
type CancelTimer struct{ Name string }

func (Send) effect()        {}
func (SetTimer) effect()    {}
func (CancelTimer) effect() {}

// Decision is what a machine decides for one command.
type Decision struct {
	// Events to persist and then apply, in order. Persisted atomically.
	Events []proto.Message
	// Effects to carry out after the events are persisted and applied.
	Effects []Effect
	// Reply to the command's sender, sent after persisting. May be nil.
	Reply proto.Message
	// Err rejects the command: nothing is persisted and the sender gets Err.
	Err error
}

// Machine is an actor's state machine. Implementations must be
// deterministic: the same state and command give the same decision, the
// same state and event the same new state.
type Machine interface {
	// Kind names the actors this machine runs, e.g. "router". A single
	// subject token: no '.', '*', '>' or spaces.
	Kind() string
	// SchemaVersion of the state; bump it when a snapshot of an older
	// version would be misread. Old snapshots are then ignored.
	SchemaVersion() uint32
	// Initial returns the state of an actor with no events.
	Initial(id string) proto.Message
	// Decide handles a command. It must not modify state. The events it
	// returns belong to the host from then on and nothing may modify them
	// in place: the simulated journal keeps them as they are, so a state
	// that holds on to part of an event (or an event that reuses part of a
	// state) must replace that part, never change it.
	Decide(state proto.Message, cmd Command) Decision
	// Apply folds an event into state, modifying it in place. An error
	// means the event cannot belong to this machine (schema drift).
	Apply(state proto.Message, event proto.Message) error
}

// Upgrader is implemented by a machine whose state's stored form changed
// in a way older snapshots still decode (SchemaVersion unchanged): Upgrade
// brings a state decoded from such a snapshot to the form replaying the
// journal gives, so that the two compare equal. It must keep what the old
// form held and change nothing in a state already in the current form.
type Upgrader interface {
	Upgrade(state proto.Message)
}

// Upgrade upgrades a state decoded from a snapshot, if m changed the form.
func Upgrade(m Machine, state proto.Message) {
	if u, ok := m.(Upgrader); ok {
		u.Upgrade(state)
	}
}

// Registry maps actor kinds to their machines.
type Registry struct {
	machines map[string]Machine
}

// NewRegistry registers the given machines.
func NewRegistry(ms ...Machine) *Registry {
	r := &Registry{machines: map[string]Machine{}}
	for _, m := range ms {
		r.Register(m)
	}
	return r
}

// Register adds a machine; a second machine of the same kind panics, as it
// is a programming error caught at start-up.
func (r *Registry) Register(m Machine) {
	if _, dup := r.machines[m.Kind()]; dup {
		panic(fmt.Sprintf("actors: kind %q registered twice", m.Kind()))
	}
	r.machines[m.Kind()] = m
}

// Machine returns the machine of kind.
func (r *Registry) Machine(kind string) (Machine, error) {
	m, ok := r.machines[kind]
	if !ok {
		return nil, fmt.Errorf("actors: unknown kind %q (known: %v)", kind, r.Kinds())
	}
	return m, nil
}

// Kinds lists the registered kinds, sorted.
func (r *Registry) Kinds() []string {
	out := make([]string, 0, len(r.machines))
	for k := range r.machines {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Fold applies events to a fresh state of the actor and returns it.
func Fold(m Machine, id string, events ...proto.Message) (proto.Message, error) {
	s := m.Initial(id)
	for i, e := range events {
		if err := applyGuarded(m, s, e); err != nil {
			return nil, fmt.Errorf("apply event %d (%T): %w", i+1, e, err)
		}
	}
	return s, nil
}
