package sim

import (
	"cmp"
	"fmt"
	"iter"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
)

// Host runs the real state machines in a World, over the simulated
// journal: the simulator's counterpart of actors.Host. Commands are
// delivered after a seeded latency; a failed append crashes the actor,
// which restarts after a backoff and recovers from the journal; nodes can
// be crashed on purpose.
type Host struct {
	w      *World
	j      *Journal
	reg    *actors.Registry
	actors map[actors.Address]*simActor
	// MinLatency and MaxLatency bound command delivery; default 1 ms..5 ms.
	MinLatency, MaxLatency time.Duration
	// Restart is the backoff before a crashed actor recovers; default 50 ms.
	Restart time.Duration
	// Counters.
	Crashes, Recoveries, Commands uint64
	// PlantedBug switches on a deliberate bug, to show that a seed sweep
	// finds it: "apply-before-persist" applies events to the live state
	// before the append and keeps them when it fails;
	// "snapshot-before-persist" writes the snapshot of the new state before
	// the append is acknowledged.
	PlantedBug string
	// Disk and SnapshotEvery, when set, snapshot each actor every N events
	// (as the real host does with Pebble); recovery starts from the newest
	// usable snapshot and replays the journal's tail.
	Disk          *Disk
	SnapshotEvery uint64
}

type simActor struct {
	m      actors.Machine
	addr   actors.Address
	state  proto.Message
	pos    journal.Position
	snap   uint64 // sequence of the last snapshot written
	up     bool
	inc    uint64 // incarnation: timers and deliveries of an older one are void
	timers map[string]uint64
	gen    uint64
	queue  []pending // commands that arrived while down
}

type pending struct {
	id    string
	msg   proto.Message
	reply func(proto.Message, error)
}

// ErrCrashed: the actor crashed before handling the command (not applied).
var ErrCrashed = fmt.Errorf("sim host: actor crashed: %w", actors.ErrNotApplied)

// NewHost creates a host in w over j.
func NewHost(w *World, j *Journal, reg *actors.Registry) *Host {
	return &Host{w: w, j: j, reg: reg, actors: map[actors.Address]*simActor{},
		MinLatency: time.Millisecond, MaxLatency: 5 * time.Millisecond, Restart: 50 * time.Millisecond}
}

func (h *Host) latency() time.Duration { return h.w.Between(h.MinLatency, h.MaxLatency) }

func (h *Host) actor(a actors.Address) (*simActor, error) {
	if s, ok := h.actors[a]; ok {
		return s, nil
	}
	m, err := h.reg.Machine(a.Kind)
	if err != nil {
		return nil, err
	}
	s := &simActor{m: m, addr: a, timers: map[string]uint64{}}
	h.actors[a] = s
	h.recover(s)
	return s, nil
}

func (h *Host) recover(s *simActor) {
	s.inc++
	s.state = s.m.Initial(s.addr.ID)
	var from uint64
	if h.Disk != nil {
		st := s.m.Initial(s.addr.ID)
		if pos, ok := h.Disk.Newest(s.addr, h.j.Highest(s.addr).Seq, st); ok {
			actors.Upgrade(s.m, st)
			s.state, from = st, pos.Seq
			h.traceSeq(s.addr, " recovering from its snapshot at seq ", pos.Seq)
		}
	}
	s.snap = from
	for _, e := range h.j.Events(s.addr, from) {
		if err := s.m.Apply(s.state, e); err != nil {
			panic(fmt.Sprintf("sim: recover %s: %v", s.addr, err))
		}
	}
	p := h.j.Highest(s.addr)
	s.pos = p
	s.up = true
	s.timers = map[string]uint64{}
	h.Recoveries++
	h.traceSeq(s.addr, " recovered at seq ", p.Seq)
	q := s.queue
	s.queue = nil
	for i, c := range q {
		if !s.up { // crashed again while draining: the rest waits
			s.queue = append(q[i:len(q):len(q)], s.queue...)
			return
		}
		h.handle(s, c)
	}
}

// Deliver sends a command to an actor after a seeded latency; reply (may be
// nil) is called with the outcome.
func (h *Host) Deliver(a actors.Address, id string, msg proto.Message, reply func(proto.Message, error)) {
	h.w.After(h.latency(), func() {
		s, err := h.actor(a)
		if err != nil {
			if reply != nil {
				reply(nil, err)
			}
			return
		}
		c := pending{id: id, msg: msg, reply: reply}
		if !s.up {
			s.queue = append(s.queue, c)
			return
		}
		h.handle(s, c)
	})
}

func (h *Host) handle(s *simActor, c pending) {
	h.Commands++
	d := s.m.Decide(s.state, actors.Command{ID: c.id, Msg: c.msg, Now: h.w.Now(), Rand: h.w.Rand().Uint64()})
	if d.Err != nil {
		h.w.Tracef("%s %s rejected: %v", s.addr, c.id, d.Err)
		if c.reply != nil {
			c.reply(nil, d.Err)
		}
		return
	}
	if len(d.Events) > 0 {
		buggy := h.PlantedBug == "apply-before-persist"
		if buggy {
			h.apply(s, d.Events)
		}
		if h.PlantedBug == "snapshot-before-persist" && h.Disk != nil {
			// The bug: the snapshot of a state the journal may never hold.
			next := proto.Clone(s.state)
			for _, e := range d.Events {
				_ = s.m.Apply(next, e)
			}
			h.Disk.Write(s.addr, journal.Position{Seq: s.pos.Seq + uint64(len(d.Events))}, next)
		}
		pos, err := h.j.Append(s.addr, s.pos, c.id, d.Events)
		if err != nil {
			h.w.Tracef("%s %s persist failed: %v", s.addr, c.id, err)
			if c.reply != nil {
				c.reply(nil, fmt.Errorf("%w: %w", actors.ErrPersist, err))
			}
			if buggy {
				return // the bug: carry on with state the journal may not have
			}
			h.Crash(s.addr)
			return
		}
		if !buggy {
			h.apply(s, d.Events)
		}
		s.pos = pos
		// Every persisted command traces this line: built by hand, it is
		// byte for byte what Tracef("%s %s persisted %d events, seq %d")
		// printed, without fmt's reflection (6% of a serving run).
		b := append(append(s.addr.AppendTo(h.w.traceStamp()), ' '), c.id...)
		b = strconv.AppendInt(append(b, " persisted "...), int64(len(d.Events)), 10)
		h.w.traceLine(strconv.AppendUint(append(b, " events, seq "...), pos.Seq, 10))
		if h.Disk != nil && h.SnapshotEvery > 0 && pos.Seq-s.snap >= h.SnapshotEvery && h.PlantedBug != "snapshot-before-persist" {
			h.Disk.Write(s.addr, pos, s.state)
			s.snap = pos.Seq
		}
	}
	for _, eff := range d.Effects {
		h.effect(s, eff)
	}
	if c.reply != nil {
		c.reply(d.Reply, nil)
	}
}

// traceSeq traces the line Tracef("%s"+text+"%d", a, seq) prints, built by
// hand: recoveries and crashes come often enough (every run crashes actors
// on purpose) that fmt's reflection showed.
func (h *Host) traceSeq(a actors.Address, text string, seq uint64) {
	h.w.traceLine(strconv.AppendUint(append(a.AppendTo(h.w.traceStamp()), text...), seq, 10))
}

func (h *Host) apply(s *simActor, events []proto.Message) {
	for _, e := range events {
		if err := s.m.Apply(s.state, e); err != nil {
			panic(fmt.Sprintf("sim: apply %T to %s: %v", e, s.addr, err))
		}
	}
}

func (h *Host) effect(s *simActor, eff actors.Effect) {
	switch f := eff.(type) {
	case actors.Send:
		h.Deliver(f.To, fmt.Sprintf("%s-send-%d", s.addr, h.Commands), f.Msg, nil)
	case actors.SetTimer:
		s.gen++
		gen, inc, name, msg := s.gen, s.inc, f.Name, f.Msg
		s.timers[name] = gen
		h.w.After(f.After, func() {
			if s.inc != inc || !s.up || s.timers[name] != gen {
				return
			}
			delete(s.timers, name)
			h.handle(s, pending{id: "timer-" + name, msg: msg})
		})
	case actors.CancelTimer:
		delete(s.timers, f.Name)
	}
}

// Crash drops an actor's in-memory state and timers; it recovers from the
// journal after the restart backoff. Commands arriving meanwhile wait.
func (h *Host) Crash(a actors.Address) {
	s, ok := h.actors[a]
	if !ok || !s.up {
		return
	}
	h.Crashes++
	s.up = false
	if h.Disk != nil && h.w.Chance(0.5) {
		h.Disk.Crash(a) // a machine crash: unsynced snapshots are lost
	}
	s.inc++
	s.state = nil
	h.w.traceLine(append(a.AppendTo(h.w.traceStamp()), " crashed"...)) // Tracef("%s crashed"), without fmt
	h.w.After(h.Restart, func() { h.recover(s) })
}

// State is the live state of an actor (nil when down or never started).
func (h *Host) State(a actors.Address) proto.Message {
	if s, ok := h.actors[a]; ok && s.up {
		return s.state
	}
	return nil
}

// Addresses lists the actors the host has seen, deterministically.
func (h *Host) Addresses() []actors.Address { return sortedAddrs(maps.Keys(h.actors)) }

// CheckReplay is the invariant that replaying each live actor's journal
// rebuilds exactly its live state.
func (h *Host) CheckReplay() error {
	for _, a := range h.Addresses() {
		s := h.actors[a]
		if !s.up {
			continue
		}
		fold, err := actors.Fold(s.m, a.ID, h.j.Events(a, 0)...)
		if err != nil {
			return err
		}
		if !proto.Equal(fold, s.state) {
			return fmt.Errorf("invariant replay: %s live state %s, journal fold %s", a, stableText(s.state), stableText(fold))
		}
	}
	return nil
}

func sortedAddrs(seq iter.Seq[actors.Address]) []actors.Address {
	return slices.SortedFunc(seq, func(x, y actors.Address) int { return cmp.Or(cmp.Compare(x.Kind, y.Kind), cmp.Compare(x.ID, y.ID)) })
}

// stableText is a message's text form with single spaces: protobuf's own
// text output spaces its fields at random per build, which would make a
// failing run's trace hash differ between two builds of the same code.
func stableText(m proto.Message) string {
	return strings.Join(strings.Fields(prototext.MarshalOptions{}.Format(m)), " ")
}
