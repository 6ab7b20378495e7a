package actors

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asynkron/protoactor-go/actor"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/journal"
)

// HostConfig configures a Host.
type HostConfig struct {
	Journal *journal.Journal
	// Snapshots, when not nil, receives a snapshot every SnapshotEvery
	// events and on a clean stop.
	Snapshots *journal.Snapshots
	Registry  *Registry
	// SnapshotEvery is the number of events between snapshots; default 1000.
	SnapshotEvery uint64
	// MailboxSize bounds each actor's queued commands (in its mailbox, and
	// separately in its stash while a persist is in flight); a command
	// beyond it is refused with ErrOverloaded, never blocked. Default 1024.
	MailboxSize int
	// RequestTimeout bounds Request when its context has no deadline;
	// default 30 s.
	RequestTimeout time.Duration
	// Backoff after a failed actor: doubling from BackoffMin up to
	// BackoffMax; after MaxRestarts failures within RestartWindow the actor
	// is stopped and starts afresh (recovering) on its next command.
	BackoffMin, BackoffMax time.Duration
	MaxRestarts            int
	RestartWindow          time.Duration
	// SnapshotQueue bounds the snapshots waiting to be written; when full,
	// snapshots are dropped (and counted): they are an optimisation.
	SnapshotQueue int
	Logger        *slog.Logger
	Metrics       *Metrics
	// Now and Seed make the host's clock and random draws replaceable in
	// tests; defaults are time.Now and a random seed.
	Now  func() time.Time
	Seed uint64
}

func (c *HostConfig) defaults() {
	if c.SnapshotEvery == 0 {
		c.SnapshotEvery = 1000
	}
	if c.MailboxSize == 0 {
		c.MailboxSize = 1024
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 30 * time.Second
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = 50 * time.Millisecond
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = 5 * time.Second
	}
	if c.MaxRestarts == 0 {
		c.MaxRestarts = 10
	}
	if c.RestartWindow == 0 {
		c.RestartWindow = time.Minute
	}
	if c.SnapshotQueue == 0 {
		c.SnapshotQueue = 1024
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Seed == 0 {
		c.Seed = rand.Uint64()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
}

// Errors returned to requesters.
var (
	// ErrPersist: persisting the command's events failed and the outcome is
	// unknown; the actor restarts and recovers from the journal. Retrying
	// the command may apply it twice unless it is idempotent.
	ErrPersist = errors.New("actors: persist failed, outcome unknown")
	// ErrStopped: the host is stopping or stopped.
	ErrStopped = errors.New("actors: host stopped")
)

// Host runs state machines as protoactor-go actors, one per address,
// spawned on first use.
type Host struct {
	cfg    HostConfig
	log    *slog.Logger
	system *actor.ActorSystem
	root   *actor.RootContext
	shep   *actor.PID

	mu   sync.Mutex
	pids map[Address]*actor.PID
	// queued counts each actor's commands sent but not yet taken from its
	// mailbox: the mailbox bound, checked before sending so a sender is
	// refused (ErrOverloaded) instead of blocked.
	queued map[Address]*atomic.Int64
	// incarnations numbers spawned entities, for unique actor names.
	incarnations atomic.Uint64
	// sending counts sends in progress; closing refuses new ones once Stop
	// began (see send).
	sending atomic.Int64
	closing atomic.Bool
	// stopping is closed when Stop begins: a spawn request the stopping
	// shepherd drops (no dead letter for it) is not waited for.
	stopping chan struct{}
	// releasing holds, per actor being released, a channel closed when
	// the release is over.
	releasing map[Address]chan struct{}
	stopped   bool

	seq         atomic.Uint64 // command id counter
	incarnation atomic.Uint64
	snaps       chan snapJob
	snapWG      sync.WaitGroup
}

// NewHost starts a host. Stop it with Stop.
func NewHost(cfg HostConfig) (*Host, error) {
	cfg.defaults()
	if cfg.Journal == nil || cfg.Registry == nil {
		return nil, errors.New("actors: host needs a journal and a registry")
	}
	h := &Host{cfg: cfg, log: cfg.Logger, pids: map[Address]*actor.PID{}, queued: map[Address]*atomic.Int64{}, stopping: make(chan struct{}),
		releasing: map[Address]chan struct{}{},
		snaps:     make(chan snapJob, cfg.SnapshotQueue)}
	plog := slog.New(minLevel{h.log.Handler(), slog.LevelWarn}).With("component", "protoactor")
	h.system = actor.NewActorSystem(actor.WithLoggerFactory(func(*actor.ActorSystem) *slog.Logger { return plog }))
	h.root = h.system.Root
	props := actor.PropsFromProducer(func() actor.Actor { return &shepherd{h: h} },
		actor.WithSupervisor(&backoffStrategy{h: h}))
	pid, err := h.root.SpawnNamed(props, "actors")
	if err != nil {
		return nil, fmt.Errorf("actors: start: %w", err)
	}
	h.shep = pid
	h.system.EventStream.Subscribe(func(ev any) {
		if dl, ok := ev.(*actor.DeadLetterEvent); ok {
			if req, ok := dl.Message.(spawnReq); ok {
				req.res <- spawnRes{err: ErrStopped}
			}
			if env, ok := dl.Message.(envelope); ok {
				if env.queued != nil {
					env.queued.Add(-1)
				}
				if env.reply != nil {
					env.reply <- reply{err: errDeadLetter}
				}
			}
		}
	})
	h.snapWG.Add(1)
	go h.writeSnapshots()
	return h, nil
}

// reply is what an actor answers to a request.
type reply struct {
	msg proto.Message
	err error
}

// envelope carries a command to an actor. Replies go straight back on a
// channel rather than through a protoactor future: the host is in-process,
// and a future costs a registered process and a timer per request.
type envelope struct {
	id    string
	msg   proto.Message
	reply chan reply // buffered(1); nil for Send
	// queued is the target's mailbox count, released when the entity takes
	// the envelope (or it becomes a dead letter).
	queued *atomic.Int64
}

// errDeadLetter: the actor stopped before the command reached it.
var errDeadLetter = errors.New("actors: actor stopped before the command arrived")

// Request sends a command to the actor at addr (spawning and recovering it
// if needed) and waits for its reply, which comes after the command's
// events are persisted.
func (h *Host) Request(ctx context.Context, addr Address, msg proto.Message) (proto.Message, error) {
	return h.RequestID(ctx, addr, "", msg)
}

// RequestID is Request with a caller-chosen command id.
func (h *Host) RequestID(ctx context.Context, addr Address, id string, msg proto.Message) (proto.Message, error) {
	if id == "" {
		id = fmt.Sprintf("c%d", h.seq.Add(1))
	}
	timeout := h.cfg.RequestTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("request %s to %s: %w", id, addr, context.DeadlineExceeded)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	// An actor that stopped between lookup and send yields a dead letter;
	// try once more with a fresh one.
	for attempt := 0; ; attempt++ {
		pid, err := h.pid(ctx, timer.C, addr)
		if err != nil {
			return nil, fmt.Errorf("request %s: %w", id, err)
		}
		ch := make(chan reply, 1)
		if err := h.send(addr, pid, envelope{id: id, msg: msg, reply: ch}); errors.Is(err, errReleased) && attempt < 3 {
			continue
		} else if err != nil {
			return nil, fmt.Errorf("request %s: %w", id, err)
		}
		select {
		case r := <-ch:
			if errors.Is(r.err, errDeadLetter) && attempt == 0 {
				h.forget(addr, pid)
				continue
			}
			return r.msg, r.err
		case <-ctx.Done():
			return nil, fmt.Errorf("request %s to %s: %w", id, addr, ctx.Err())
		case <-timer.C:
			return nil, fmt.Errorf("request %s to %s: no reply within %s: %w", id, addr, timeout, context.DeadlineExceeded)
		}
	}
}

// Send delivers a command without waiting for a reply.
func (h *Host) Send(addr Address, msg proto.Message) error {
	for attempt := 0; ; attempt++ {
		pid, err := h.pid(context.Background(), nil, addr)
		if err != nil {
			return err
		}
		err = h.send(addr, pid, envelope{id: fmt.Sprintf("c%d", h.seq.Add(1)), msg: msg})
		if !errors.Is(err, errReleased) || attempt == 3 {
			return err
		}
	}
}

// send enqueues env for the actor unless its mailbox is full.
func (h *Host) send(addr Address, pid *actor.PID, env envelope) error {
	// Stop waits for sends in progress before it poisons the entities, so
	// a command is either enqueued ahead of the poison pill (and answered)
	// or refused here; never dropped behind it unanswered.
	h.sending.Add(1)
	defer h.sending.Add(-1)
	if h.closing.Load() {
		return ErrStopped
	}
	h.mu.Lock()
	if ch := h.releasing[addr]; ch != nil {
		// The actor is being released: wait, then the caller looks it up
		// (and spawns it) afresh.
		h.mu.Unlock()
		<-ch
		return errReleased
	}
	q, ok := h.queued[addr]
	if !ok {
		q = new(atomic.Int64)
		h.queued[addr] = q
	}
	// Counted under the lock: Release sees either this command queued
	// (and keeps the actor) or nothing (and no command follows its stop).
	n := q.Add(1)
	h.mu.Unlock()
	if n > int64(h.cfg.MailboxSize) {
		q.Add(-1)
		h.cfg.Metrics.overloaded.Inc()
		return fmt.Errorf("%w: %s has %d commands queued", ErrOverloaded, addr, h.cfg.MailboxSize)
	}
	env.queued = q
	h.root.Send(pid, env)
	return nil
}

// spawnReq asks the shepherd for an actor's pid, spawning (and so
// recovering) it when it is not running; the answer goes to res,
// buffered(1), so a requester that gave up leaves nothing blocked.
type spawnReq struct {
	addr Address
	res  chan spawnRes
}
type spawnRes struct {
	pid *actor.PID
	err error
}

// pid returns the running actor at addr, spawning it if needed. The
// shepherd spawns one actor at a time, each recovery included, so the wait
// may be long after a restart: it ends with ctx, or when expired fires
// (nil: RequestTimeout).
func (h *Host) pid(ctx context.Context, expired <-chan time.Time, addr Address) (*actor.PID, error) {
	h.mu.Lock()
	if h.stopped {
		h.mu.Unlock()
		return nil, ErrStopped
	}
	pid, ok := h.pids[addr]
	h.mu.Unlock()
	if ok {
		return pid, nil
	}
	if _, err := h.cfg.Registry.Machine(addr.Kind); err != nil {
		return nil, err
	}
	if err := journal.CheckName(addr.Kind, addr.ID); err != nil {
		return nil, err
	}
	if expired == nil {
		t := time.NewTimer(h.cfg.RequestTimeout)
		defer t.Stop()
		expired = t.C
	}
	req := spawnReq{addr: addr, res: make(chan spawnRes, 1)}
	h.root.Send(h.shep, req)
	select {
	case sr := <-req.res:
		return sr.pid, sr.err
	case <-h.stopping:
		return nil, ErrStopped
	case <-ctx.Done():
		return nil, fmt.Errorf("actors: spawn %s: %w", addr, ctx.Err())
	case <-expired:
		return nil, fmt.Errorf("actors: spawn %s: not running within the request's time (recoveries run one at a time): %w", addr, context.DeadlineExceeded)
	}
}

func (h *Host) forget(addr Address, pid *actor.PID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cur, ok := h.pids[addr]; ok && cur.Equal(pid) {
		delete(h.pids, addr)
	}
}

// Release stops one actor that expects no more commands (a finished
// transfer session), freeing its memory; it writes its final snapshot on
// the way out. Commands already queued are handled first; a later command
// recovers it from its snapshot and journal.
func (h *Host) Release(ctx context.Context, addr Address) error {
	h.mu.Lock()
	pid, ok := h.pids[addr]
	if !ok || h.releasing[addr] != nil {
		h.mu.Unlock()
		return nil
	}
	if q := h.queued[addr]; q != nil && q.Load() > 0 {
		h.mu.Unlock()
		return nil // commands are queued for it: it is not idle, keep it
	}
	released := make(chan struct{})
	h.releasing[addr] = released
	h.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := h.root.PoisonFuture(pid).Result()
		done <- err
	}()
	var err error
	select {
	case err = <-done:
		if errors.Is(err, actor.ErrDeadLetter) {
			err = nil
		}
	case <-ctx.Done():
		err = ctx.Err()
	}
	h.mu.Lock()
	if cur, ok := h.pids[addr]; ok && cur.Equal(pid) {
		delete(h.pids, addr)
	}
	if q := h.queued[addr]; q != nil && q.Load() == 0 {
		delete(h.queued, addr)
	}
	delete(h.releasing, addr)
	close(released)
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("actors: release %s: %w", addr, err)
	}
	return nil
}

// errReleased: the target was released while the command was being sent;
// look it up again.
var errReleased = errors.New("actors: actor released, send again")

// Stop stops every actor (each writes a final snapshot), waits for the
// snapshot writer and shuts the actor system down.
func (h *Host) Stop(ctx context.Context) error {
	h.mu.Lock()
	if h.stopped {
		h.mu.Unlock()
		return nil
	}
	h.stopped = true
	close(h.stopping)
	h.mu.Unlock()
	h.closing.Store(true)
	for h.sending.Load() > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("actors: stop: waiting for sends in progress: %w", ctx.Err())
		case <-time.After(100 * time.Microsecond):
		}
	}
	// Poison every entity first: a poison pill queues behind the commands
	// already in its mailbox, so they are handled and answered (a Stop
	// would jump the queue and drop them unanswered). Then stop the
	// shepherd. The snapshot writer is closed only once every entity has
	// stopped, since a stopping entity sends its final snapshot to it.
	h.mu.Lock()
	pids := make([]*actor.PID, 0, len(h.pids))
	for _, p := range h.pids {
		pids = append(pids, p)
	}
	h.mu.Unlock()
	futures := make([]*actor.Future, len(pids))
	for i, p := range pids {
		futures[i] = h.root.PoisonFuture(p)
	}
	// A future's wait has its own fixed timeout (10 s each, entity then
	// shepherd); ctx bounds the whole stop.
	stopped := make(chan error, 1)
	go func() {
		var err error
		for _, f := range futures {
			if _, ferr := f.Result(); ferr != nil && !errors.Is(ferr, actor.ErrDeadLetter) {
				err = errors.Join(err, fmt.Errorf("actors: stop: %w", ferr))
			}
		}
		if _, ferr := h.root.PoisonFuture(h.shep).Result(); ferr != nil {
			err = errors.Join(err, fmt.Errorf("actors: stop: %w", ferr))
		}
		stopped <- err
	}()
	var err error
	select {
	case err = <-stopped:
	case <-ctx.Done():
		err = fmt.Errorf("actors: stop: waiting for actors to stop: %w", ctx.Err())
	}
	if err != nil {
		// Something is still stopping and may yet send a snapshot: leave
		// the writer running rather than risk a send on a closed channel.
		h.system.Shutdown()
		return err
	}
	close(h.snaps)
	done := make(chan struct{})
	go func() { h.snapWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("actors: snapshot writer: %w", ctx.Err())
	}
	h.system.Shutdown()
	return err
}

// shepherd is the parent of every entity: it spawns them by address, so
// they are supervised by the host's backoff strategy, and forgets them when
// they stop.
type shepherd struct {
	h *Host
}

func (s *shepherd) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case spawnReq:
		s.h.mu.Lock()
		pid, ok := s.h.pids[m.addr]
		s.h.mu.Unlock()
		if ok {
			m.res <- spawnRes{pid: pid}
			return
		}
		mach, err := s.h.cfg.Registry.Machine(m.addr.Kind)
		if err != nil {
			m.res <- spawnRes{err: err}
			return
		}
		// The synchronized dispatcher runs the mailbox on the sender's
		// goroutine instead of starting one per batch of messages: a
		// requester waits for the reply anyway, and the hand-off and stack
		// growth were most of the per-command cost.
		props := actor.PropsFromProducer(func() actor.Actor { return newEntity(s.h, mach, m.addr) },
			actor.WithMailbox(actor.Unbounded()), // bounded by Host.send
			actor.WithDispatcher(actor.NewSynchronizedDispatcher(300)))
		// A name per incarnation: an actor just released or stopped may
		// still hold its name in the registry for a moment.
		pid, err = ctx.SpawnNamed(props, fmt.Sprintf("%s/%s#%d", m.addr.Kind, m.addr.ID, s.h.incarnations.Add(1)))
		if err != nil {
			m.res <- spawnRes{err: fmt.Errorf("actors: spawn %s: %w", m.addr, err)}
			return
		}
		s.h.mu.Lock()
		s.h.pids[m.addr] = pid
		s.h.mu.Unlock()
		m.res <- spawnRes{pid: pid}
	case *actor.Terminated:
		s.h.mu.Lock()
		for a, p := range s.h.pids {
			if p.Equal(m.Who) {
				delete(s.h.pids, a)
			}
		}
		s.h.mu.Unlock()
	}
}

// backoffStrategy restarts a failed entity after a doubling delay, and stops
// it after too many failures in a window.
type backoffStrategy struct{ h *Host }

func (b *backoffStrategy) HandleFailure(_ *actor.ActorSystem, sup actor.Supervisor, child *actor.PID, rs *actor.RestartStatistics, reason any, _ any) {
	cfg := b.h.cfg
	n := rs.NumberOfFailures(cfg.RestartWindow)
	if n == 0 {
		rs.Reset()
	}
	rs.Fail()
	n++
	if n > cfg.MaxRestarts {
		b.h.log.Error("actor failed too often, stopping it; it recovers on its next command",
			"actor", child.Id, "failures", n, "window", cfg.RestartWindow, "reason", reason)
		sup.StopChildren(child)
		return
	}
	delay := cfg.BackoffMin << min(n-1, 20)
	if delay > cfg.BackoffMax || delay <= 0 {
		delay = cfg.BackoffMax
	}
	b.h.cfg.Metrics.restarts.Inc()
	b.h.log.Warn("actor failed, restarting after backoff", "actor", child.Id, "attempt", n, "backoff", delay, "reason", reason)
	time.AfterFunc(delay, func() { sup.RestartChildren(child) })
}

// minLevel raises a handler's minimum level (protoactor logs its routine
// at info).
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= m.min && m.Handler.Enabled(ctx, l)
}
func (m minLevel) WithAttrs(a []slog.Attr) slog.Handler {
	return minLevel{m.Handler.WithAttrs(a), m.min}
}
func (m minLevel) WithGroup(g string) slog.Handler { return minLevel{m.Handler.WithGroup(g), m.min} }
