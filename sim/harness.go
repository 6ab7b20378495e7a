// Package sim is Triplane's deterministic simulator: a virtual clock, one
// seeded random source and a single-threaded scheduler, hosting the real
// actor state machines over simulated planes.
//
// Harness is its smallest piece: one state machine, driven without
// protoactor, goroutines or wall time, with an in-memory journal. It feeds
// commands exactly as the real host does (time and a random draw with each
// command, events persisted before they are applied, effects after), so a
// machine reaches the same state under both.
package sim

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
)

// Epoch is the virtual time every run starts at.
var Epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// Harness runs one actor's state machine deterministically.
type Harness struct {
	m    actors.Machine
	addr actors.Address
	rng  *rand.Rand // the command random draws, derived like the host's
	step *rand.Rand // the harness's own choices (clock steps)
	now  time.Time

	state  proto.Message
	events []proto.Message // the in-memory journal
	timers []simTimer
	gen    uint64
	// Sent collects Send effects, in order.
	Sent []actors.Send
	// MaxStep bounds the virtual time that passes between commands;
	// default 10 ms.
	MaxStep time.Duration
	cmds    uint64
}

type simTimer struct {
	name string
	due  time.Time
	gen  uint64
	msg  proto.Message
}

// NewHarness starts an actor of m with id at its initial state. seed drives
// the clock steps and, as in actors.HostConfig.Seed, the command random
// draws.
func NewHarness(m actors.Machine, id string, seed uint64) *Harness {
	hs := fnv.New64a()
	addr := actors.Address{Kind: m.Kind(), ID: id}
	hs.Write([]byte(addr.String()))
	return &Harness{m: m, addr: addr, now: Epoch, state: m.Initial(id), MaxStep: 10 * time.Millisecond,
		rng: rand.New(rand.NewPCG(seed, hs.Sum64())), step: rand.New(rand.NewPCG(seed, 0x5eed))}
}

// State is the actor's current state (do not modify).
func (h *Harness) State() proto.Message { return h.state }

// Events is the in-memory journal.
func (h *Harness) Events() []proto.Message { return h.events }

// Now is the virtual time.
func (h *Harness) Now() time.Time { return h.now }

// Command handles one command after a seeded step of virtual time, firing
// any timers that fall due first.
func (h *Harness) Command(msg proto.Message) (proto.Message, error) {
	h.Advance(time.Duration(h.step.Int64N(int64(h.MaxStep) + 1)))
	h.cmds++
	return h.handle(fmt.Sprintf("c%d", h.cmds), msg)
}

// Advance moves the virtual clock, firing due timers in time order.
func (h *Harness) Advance(d time.Duration) {
	until := h.now.Add(d)
	for {
		slices.SortStableFunc(h.timers, func(a, b simTimer) int { return a.due.Compare(b.due) })
		if len(h.timers) == 0 || h.timers[0].due.After(until) {
			break
		}
		t := h.timers[0]
		h.timers = h.timers[1:]
		h.now = t.due
		_, _ = h.handle("timer-"+t.name, t.msg)
	}
	h.now = until
}

func (h *Harness) handle(id string, msg proto.Message) (proto.Message, error) {
	d := h.m.Decide(h.state, actors.Command{ID: id, Msg: msg, Now: h.now, Rand: h.rng.Uint64()})
	if d.Err != nil {
		return nil, d.Err
	}
	for _, ev := range d.Events {
		// Persist (append to the journal) before applying, as the host does.
		h.events = append(h.events, proto.Clone(ev))
	}
	for _, ev := range d.Events {
		if err := h.m.Apply(h.state, ev); err != nil {
			return nil, fmt.Errorf("sim: apply %T to %s: %w", ev, h.addr, err)
		}
	}
	for _, eff := range d.Effects {
		switch f := eff.(type) {
		case actors.Send:
			h.Sent = append(h.Sent, f)
		case actors.SetTimer:
			h.cancel(f.Name)
			h.gen++
			h.timers = append(h.timers, simTimer{name: f.Name, due: h.now.Add(f.After), gen: h.gen, msg: f.Msg})
		case actors.CancelTimer:
			h.cancel(f.Name)
		}
	}
	return d.Reply, nil
}

func (h *Harness) cancel(name string) {
	h.timers = slices.DeleteFunc(h.timers, func(t simTimer) bool { return t.name == name })
}

// CheckReplay folds the in-memory journal into a fresh state and reports
// whether it equals the live state: the invariant that replay rebuilds
// exactly what the actor holds.
func (h *Harness) CheckReplay() error {
	s, err := actors.Fold(h.m, h.addr.ID, h.events...)
	if err != nil {
		return err
	}
	if !proto.Equal(s, h.state) {
		return fmt.Errorf("sim: %s: replaying %d events gives %s, live state is %s", h.addr, len(h.events), stableText(s), stableText(h.state))
	}
	return nil
}
