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
// It processes one message at a time; recovery (in Started) and each
// persist run to completion inside Receive, so commands that arrive
// meanwhile wait in the bounded mailbox: the mailbox is the stash. A failed
// persist cannot tell whether the events were written, so the entity
// answers the sender with ErrPersist and panics; the host's supervisor
// restarts it after a backoff as a fresh instance that recovers from the
// journal.
type entity struct {
	h    *Host
	m    Machine
	addr Address
	log  *slog.Logger

	state     proto.Message
	pos       journal.Position
	recovered bool
	sinceSnap uint64
	lastTime  time.Time
	rng       *rand.Rand
	timers    map[string]*timerSlot
	timerGen  uint64
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

func newEntity(h *Host, m Machine, addr Address) *entity {
	hs := fnv.New64a()
	hs.Write([]byte(addr.String()))
	return &entity{h: h, m: m, addr: addr, log: h.log.With("actor", addr.String()),
		rng: rand.New(rand.NewPCG(h.cfg.Seed, hs.Sum64())), timers: map[string]*timerSlot{}}
}

func (e *entity) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		e.recover()
	case *actor.Restarting:
		e.stopTimers()
	case *actor.Stopping:
		e.stopTimers()
		if e.recovered && e.sinceSnap > 0 {
			e.snapshot(true)
		}
	case envelope:
		e.handle(ctx, m.id, m.msg)
	case timerFired:
		if slot, ok := e.timers[m.name]; ok && slot.gen == m.gen {
			delete(e.timers, m.name)
			e.handle(ctx, "timer-"+m.name, m.msg)
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
	e.log.Debug("recovered", "seq", r.Pos.Seq, "from_snapshot", r.FromSnapshot, "replayed", r.Replayed,
		"took", time.Since(t0))
}

func (e *entity) respond(ctx actor.Context, msg proto.Message, err error) {
	if ctx.Sender() != nil {
		ctx.Respond(reply{msg: msg, err: err})
	}
}

func (e *entity) handle(ctx actor.Context, id string, msg proto.Message) {
	cfg := e.h.cfg
	cfg.Metrics.commands.Inc()
	now := cfg.Now()
	d := e.m.Decide(e.state, Command{ID: id, Msg: msg, Now: now, Rand: e.rng.Uint64()})
	if d.Err != nil {
		cfg.Metrics.rejected.Inc()
		e.respond(ctx, nil, d.Err)
		return
	}
	if len(d.Events) > 0 {
		if err := e.persist(ctx, id, now, d.Events); err != nil {
			return
		}
	}
	for _, eff := range d.Effects {
		e.effect(ctx, eff)
	}
	e.respond(ctx, d.Reply, nil)
}

func (e *entity) persist(ctx actor.Context, id string, now time.Time, events []proto.Message) error {
	cfg := e.h.cfg
	batch, err := NewBatch(id, now, events)
	if err != nil {
		// A machine produced an event that cannot be encoded: a bug in the
		// machine, but nothing was written, so the actor can go on.
		cfg.Metrics.rejected.Inc()
		e.respond(ctx, nil, err)
		return err
	}
	pctx, cancel := context.WithTimeout(context.Background(), cfg.RequestTimeout)
	defer cancel()
	pos, err := cfg.Journal.Append(pctx, e.addr.Kind, e.addr.ID, e.pos, batch)
	if errors.Is(err, journal.ErrTooLarge) || errors.Is(err, journal.ErrBadName) {
		// Refused before sending: nothing was written.
		cfg.Metrics.rejected.Inc()
		e.respond(ctx, nil, err)
		return err
	}
	if err != nil {
		cfg.Metrics.persistFailures.Inc()
		e.respond(ctx, nil, fmt.Errorf("%w: %s: %w", ErrPersist, e.addr, err))
		e.recovered = false
		panic(failure{fmt.Errorf("persist %s: %w", e.addr, err)})
	}
	for _, ev := range events {
		if err := e.m.Apply(e.state, ev); err != nil {
			// The event is journaled but this machine cannot apply it: a bug
			// that recovery would hit too. Restart so it is visible.
			e.recovered = false
			panic(failure{fmt.Errorf("apply %T to %s: %w", ev, e.addr, err)})
		}
	}
	e.pos = pos
	e.lastTime = now
	cfg.Metrics.events.Add(float64(len(events)))
	e.sinceSnap += uint64(len(events))
	if cfg.Snapshots != nil && e.sinceSnap >= cfg.SnapshotEvery {
		e.snapshot(false)
	}
	return nil
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
	case Passivate:
		ctx.Poison(ctx.Self())
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
