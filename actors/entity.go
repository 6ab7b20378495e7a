package actors

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/asynkron/protoactor-go/actor"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// entity is the imperative shell around one state machine instance.
//
// Recovery runs to completion in Started; commands that arrive meanwhile
// wait in the bounded mailbox. After that, at most one persist is in flight:
// commands arriving while it is are stashed (bounded), and when it is
// acknowledged the whole stash is decided in order and persisted as the next
// atomic batch (group commit). A command is decided against the state that
// includes the events decided before it; nothing a decision causes (reply,
// effects) is released before its events are acknowledged. A persist that
// fails cannot tell whether the events were written, so every command of the
// group gets ErrPersist, the stashed ones ErrNotApplied, and the entity
// panics: the host's supervisor restarts it after a backoff as a
// fresh instance that recovers from the journal.
type entity struct {
	h    *Host
	m    Machine
	addr Address
	log  *slog.Logger
	inc  uint64 // incarnation, to ignore acknowledgements of a previous one

	state     proto.Message
	pos       journal.Position
	recovered bool
	sinceSnap uint64
	lastTime  time.Time
	rng       *rand.Rand
	timers    map[string]*timerSlot
	timerGen  uint64

	flight *group     // the persist in flight, if any
	stash  []envelope // commands waiting for it
}

// group is the commands of one persist: their replies and effects wait for
// its acknowledgement.
type group struct {
	pending *journal.Pending
	replies []held
	effects []Effect
	events  int
	now     time.Time
	// definite: the replies already say what happened (nothing written).
	definite bool
}

type held struct {
	to  chan reply
	msg proto.Message
	err error
}

type persisted struct {
	inc uint64
	pos journal.Position
	err error
}

type timerSlot struct {
	t   *time.Timer
	gen uint64
}

type timerFired struct {
	name string
	gen  uint64
	msg  proto.Message
}

// failure is the panic value of an entity that must restart.
type failure struct{ err error }

func (f failure) String() string { return f.err.Error() }

// Errors of commands that were not applied (a retry is safe).
var (
	// ErrOverloaded: the actor's stash is full.
	ErrOverloaded = errors.New("actors: actor overloaded, command not applied")
	// ErrNotApplied: the command waited behind a persist that failed; the
	// actor restarts and the command was never decided.
	ErrNotApplied = errors.New("actors: command not applied")
)

func newEntity(h *Host, m Machine, addr Address) *entity {
	hs := fnv.New64a()
	hs.Write([]byte(addr.String()))
	return &entity{h: h, m: m, addr: addr, log: h.log.With("actor", addr.String()), inc: h.incarnation.Add(1),
		rng: rand.New(rand.NewPCG(h.cfg.Seed, hs.Sum64())), timers: map[string]*timerSlot{}}
}

func (e *entity) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		e.recover()
	case *actor.Restarting:
		e.stopTimers()
	case *actor.Stopping:
		e.stopping(ctx)
	case envelope:
		if m.queued != nil {
			m.queued.Add(-1)
		}
		e.command(ctx, m)
	case timerFired:
		if slot, ok := e.timers[m.name]; ok && slot.gen == m.gen {
			delete(e.timers, m.name)
			e.command(ctx, envelope{id: "timer-" + m.name, msg: m.msg})
		}
	case persisted:
		if m.inc == e.inc {
			e.persisted(ctx, m)
		}
	}
}

func (e *entity) recover() {
	cfg := e.h.cfg
	ctx, cancel := context.WithTimeout(context.Background(), cfg.RequestTimeout)
	defer cancel()
	t0 := time.Now()
	r, err := Recover(ctx, cfg.Journal, cfg.Snapshots, e.m, e.addr.ID, e.log)
	if err != nil {
		cfg.Metrics.recoveryFailures.Inc()
		panic(failure{fmt.Errorf("recover %s: %w", e.addr, err)})
	}
	e.state, e.pos, e.recovered, e.lastTime = r.State, r.Pos, true, r.LastTime
	e.sinceSnap = r.Replayed
	cfg.Metrics.recoveries.Inc()
	cfg.Metrics.recoveredEvents.Add(float64(r.Replayed))
	if r.SnapshotSkipped != "" {
		cfg.Metrics.snapshotsSkipped.WithLabelValues(r.SnapshotSkipped).Inc()
	}
	e.log.Debug("recovered", "seq", r.Pos.Seq, "from_snapshot", r.FromSnapshot, "replayed", r.Replayed,
		"took", time.Since(t0))
}

// respond answers a request. Each request gets exactly one answer on its
// buffered channel; the select guards the actor against ever blocking on a
// second one.
func respond(to chan reply, msg proto.Message, err error) {
	if to == nil {
		return
	}
	select {
	case to <- reply{msg: msg, err: err}:
	default:
	}
}

func (e *entity) command(ctx actor.Context, env envelope) {
	if e.flight == nil {
		e.decide(ctx, []envelope{env})
		return
	}
	if len(e.stash) >= e.h.cfg.MailboxSize {
		e.h.cfg.Metrics.overloaded.Inc()
		respond(env.reply, nil, fmt.Errorf("%w: %s has %d commands waiting", ErrOverloaded, e.addr, len(e.stash)))
		return
	}
	e.stash = append(e.stash, env)
}

// decide handles commands in order against the evolving state and starts
// one persist for all their events. Commands that do not fit in one batch
// go back to the front of the stash.
func (e *entity) decide(ctx actor.Context, cmds []envelope) {
	cfg := e.h.cfg
	g := &group{now: cfg.Now()}
	var events []proto.Message
	// The batch's own fields (names, command id, time, sequences) count too.
	size := int64(len(e.addr.Kind) + len(e.addr.ID) + len(cmds[0].id) + 64)
	limit := cfg.Journal.Limit()
	for i, env := range cmds {
		cfg.Metrics.commands.Inc()
		d := decideGuarded(e.m, e.state, Command{ID: env.id, Msg: env.msg, Now: g.now, Rand: e.rng.Uint64()})
		if d.Err != nil {
			if errors.Is(d.Err, ErrMachinePanic) {
				e.log.Error("a command made the machine panic; the command is refused", "err", d.Err, "stack", string(PanicStack(d.Err)))
			}
			cfg.Metrics.rejected.Inc()
			g.replies = append(g.replies, held{to: env.reply, err: d.Err})
			continue
		}
		var n int64
		for _, ev := range d.Events {
			// The event, its Any's type URL, and at most 32 bytes of
			// tags and lengths (Event, Any, the repeated field) and the
			// sequence; a flat 64 fell short for long type names.
			n += int64(proto.Size(ev)) + int64(len("type.googleapis.com/")+len(proto.MessageName(ev))) + 32
		}
		if n+size > limit && len(events) == 0 {
			cfg.Metrics.rejected.Inc()
			g.replies = append(g.replies, held{to: env.reply, err: fmt.Errorf("%w: %s: %T's %d events need about %d bytes, the limit is %d",
				journal.ErrTooLarge, e.addr, env.msg, len(d.Events), n, limit)})
			continue
		}
		if size+n > limit {
			// Decide it again, first in the next group; Decide is pure.
			e.stash = append(cmds[i:len(cmds):len(cmds)], e.stash...)
			break
		}
		size += n
		for _, ev := range d.Events {
			if err := applyGuarded(e.m, e.state, ev); err != nil {
				if errors.Is(err, ErrMachinePanic) {
					e.log.Error("applying an event made the machine panic; the actor restarts", "err", err, "stack", string(PanicStack(err)))
				}
				// The machine cannot apply its own event: a bug. Nothing of
				// this group is persisted; this command is answered with
				// why (asking again would fail again), the rest are not
				// applied; restart so it is visible.
				e.stash = append(cmds[i+1:len(cmds):len(cmds)], e.stash...)
				// Nothing was written: every answer is definite (a
				// caller that took "outcome unknown" would send it again).
				notApplied(g, fmt.Errorf("%s restarts: a command in its batch could not be applied", e.addr))
				err = fmt.Errorf("apply %T to %s: %w", ev, e.addr, err)
				g.replies = append(g.replies, held{to: env.reply, err: err})
				e.fail(ctx, g, err)
			}
		}
		events = append(events, d.Events...)
		g.replies = append(g.replies, held{to: env.reply, msg: d.Reply})
		g.effects = append(g.effects, d.Effects...)
	}
	if len(events) == 0 {
		e.release(ctx, g)
		e.drain(ctx)
		return
	}
	batch, err := NewBatch(cmds[0].id, g.now, events)
	if err == nil {
		g.pending, err = cfg.Journal.AppendAsync(e.addr.Kind, e.addr.ID, e.pos, batch)
	}
	if err != nil {
		// Refused before sending: nothing was written, but the state holds
		// the group's events, so the entity must still restart.
		notApplied(g, fmt.Errorf("%s: %w", e.addr, err))
		e.fail(ctx, g, fmt.Errorf("persist %s: %w", e.addr, err))
	}
	g.events = len(events)
	e.flight = g
	self, root, inc, p := ctx.Self(), e.h.root, e.inc, g.pending
	go func() {
		pos, err := p.Wait(context.Background())
		root.Send(self, persisted{inc: inc, pos: pos, err: err})
	}()
}

func (e *entity) persisted(ctx actor.Context, m persisted) {
	cfg := e.h.cfg
	g := e.flight
	e.flight = nil
	if m.err != nil {
		e.fail(ctx, g, fmt.Errorf("persist %s: %w", e.addr, m.err))
	}
	e.pos = m.pos
	e.lastTime = g.now
	cfg.Metrics.events.Add(float64(g.events))
	cfg.Metrics.batches.Inc()
	e.sinceSnap += uint64(g.events)
	e.release(ctx, g)
	// Nothing undecided is applied yet, so the state is exactly the
	// persisted one: the moment to snapshot.
	if cfg.Snapshots != nil && e.sinceSnap >= cfg.SnapshotEvery {
		e.snapshot(false)
	}
	e.drain(ctx)
}

// drain decides the stash, if no persist is in flight.
func (e *entity) drain(ctx actor.Context) {
	if e.flight != nil || len(e.stash) == 0 {
		return
	}
	cmds := e.stash
	e.stash = nil
	e.decide(ctx, cmds)
}

func (e *entity) release(ctx actor.Context, g *group) {
	for _, r := range g.replies {
		respond(r.to, r.msg, r.err)
	}
	for _, eff := range g.effects {
		e.effect(ctx, eff)
	}
}

// fail answers the group's commands with ErrPersist (outcome unknown) and
// the stashed ones with ErrNotApplied (they were never decided, so a retry
// is safe), then panics so the supervisor restarts the entity. Handing the
// stash back to the mailbox instead would put it behind commands that
// arrived later, breaking each sender's order.
// notApplied makes every answer of a group that wrote nothing a definite
// ErrNotApplied, rejections included: they were decided against a state
// that held the group's earlier events, which are lost with the restart.
func notApplied(g *group, cause error) {
	for i := range g.replies {
		g.replies[i].err = fmt.Errorf("%w: %w", ErrNotApplied, cause)
	}
	g.definite = true
}

func (e *entity) fail(ctx actor.Context, g *group, err error) {
	cfg := e.h.cfg
	cfg.Metrics.persistFailures.Inc()
	for _, r := range g.replies {
		if g.definite {
			respond(r.to, nil, r.err)
			continue
		}
		respond(r.to, nil, fmt.Errorf("%w: %w", ErrPersist, err))
	}
	for _, env := range e.stash {
		respond(env.reply, nil, fmt.Errorf("%w: %s restarts after a failed persist", ErrNotApplied, e.addr))
	}
	e.stash = nil
	e.recovered = false
	panic(failure{err})
}

// stopping finishes the persist in flight (bounded by the journal's
// timeout), answers the stash and writes a final snapshot.
func (e *entity) stopping(ctx actor.Context) {
	e.stopTimers()
	if g := e.flight; g != nil {
		e.flight = nil
		pos, err := g.pending.Wait(context.Background())
		if err != nil {
			for _, r := range g.replies {
				respond(r.to, nil, fmt.Errorf("%w: %s stopping: %w", ErrPersist, e.addr, err))
			}
			e.recovered = false
		} else {
			e.pos, e.lastTime = pos, g.now
			e.sinceSnap += uint64(g.events)
			for _, r := range g.replies {
				respond(r.to, r.msg, r.err)
			}
			// Messages to other actors still go out; timers die with the
			// actor.
			for _, eff := range g.effects {
				if s, ok := eff.(Send); ok {
					e.effect(ctx, s)
				}
			}
		}
	}
	for _, env := range e.stash {
		respond(env.reply, nil, fmt.Errorf("%w: %s stopped before handling %s", ErrStopped, e.addr, env.id))
	}
	e.stash = nil
	if e.recovered && e.sinceSnap > 0 {
		e.snapshot(true)
	}
}

func (e *entity) effect(ctx actor.Context, eff Effect) {
	switch f := eff.(type) {
	case Send:
		if err := e.h.Send(f.To, f.Msg); err != nil {
			e.log.Warn("send effect failed", "to", f.To.String(), "err", err)
		}
	case SetTimer:
		if old, ok := e.timers[f.Name]; ok {
			old.t.Stop()
		}
		e.timerGen++
		gen, self, root, msg, name := e.timerGen, ctx.Self(), e.h.root, f.Msg, f.Name
		e.timers[f.Name] = &timerSlot{gen: gen, t: time.AfterFunc(f.After, func() {
			root.Send(self, timerFired{name: name, gen: gen, msg: msg})
		})}
	case CancelTimer:
		if old, ok := e.timers[f.Name]; ok {
			old.t.Stop()
			delete(e.timers, f.Name)
		}
	}
}

func (e *entity) stopTimers() {
	for n, s := range e.timers {
		s.t.Stop()
		delete(e.timers, n)
	}
}

type snapJob struct {
	snap *triplanev1.Snapshot
}

// snapshot hands the state to the host's writer. Periodic snapshots are
// dropped when the writer is behind; the final one on a clean stop waits.
func (e *entity) snapshot(final bool) {
	cfg := e.h.cfg
	if cfg.Snapshots == nil {
		return
	}
	snap, err := NewSnapshot(e.m, e.addr.ID, e.state, e.pos, e.lastTime)
	if err != nil {
		e.log.Warn("cannot encode snapshot", "err", err)
		return
	}
	e.sinceSnap = 0
	if final {
		e.h.snaps <- snapJob{snap}
		return
	}
	select {
	case e.h.snaps <- snapJob{snap}:
	default:
		cfg.Metrics.snapshotsDropped.Inc()
	}
}

func (h *Host) writeSnapshots() {
	defer h.snapWG.Done()
	for j := range h.snaps {
		if err := h.cfg.Snapshots.Save(j.snap); err != nil {
			h.cfg.Metrics.snapshotFailures.Inc()
			h.log.Warn("snapshot write failed; recovery will replay more of the journal",
				"actor", j.snap.Kind+"/"+j.snap.ActorId, "seq", j.snap.Seq, "err", err)
			continue
		}
		h.cfg.Metrics.snapshots.Inc()
	}
}
