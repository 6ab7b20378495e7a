package sim

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

// The serving scenario's shape.
const (
	servingWorkers    = 8
	servingRate       = 100 // requests per virtual second
	servingBlockSize  = 16
	servingRing       = 24 // KV events a worker keeps for resends (small: partitions outlast it)
	servingIndexCap   = 1 << 20
	servingMaxPending = 4096 // out-of-order KV events buffered per worker
	servingGrace      = 20 * time.Millisecond
	servingRetries    = 5 // routing attempts and migrations per request
)

// Bugs the serving scenario can plant.
const (
	// BugRouterIgnoresGap makes the router's KV view skip missing event
	// ids instead of repairing them: the index drifts from the workers.
	BugRouterIgnoresGap = "router-ignores-gap"
	// BugStaleRoute sends a request to the worker the router chose even
	// when discovery removed it while the decision was pending.
	BugStaleRoute = "stale-route"
)

// servingScenario runs the serving path's real state machines: mock
// engines as workers, the router actor (journaled decisions) and the
// routing shell's KV index fed by the engines' KV events, which arrive late,
// out of order, twice or not at all (also for whole partitions of a
// worker's stream, healed later) and are repaired from the workers' rings
// (or a dump). Workers crash and restart (new epoch, empty cache); their requests
// migrate with the tokens generated so far. Router appends fail and the
// router actor crashes.
var servingScenario = Scenario{
	Name: "serving",
	Description: fmt.Sprintf("%d mock workers, the KV router actor, %d req/s over shared prefixes; KV events delayed, dropped and repaired; worker crashes with migration; journal append failures and router crashes",
		servingWorkers, servingRate),
	Registry: func() *actors.Registry { return actors.NewRegistry(routerm.Machine{}) },
	Drive:    driveServing,
}

type simWorker struct {
	id      string
	epoch   int
	eng     *mocker.Engine
	alive   bool
	diedAt  time.Time
	gone    bool // discovery removed it (past the grace)
	step    bool // a step is scheduled
	ring    []engine.KVEvent
	last    uint64
	running map[string]*simRequest
}

// view is the routing shell's ordered view of one worker's events (the
// kvevents consumer's job in the real system).
type view struct {
	epoch     int
	next      uint64
	pending   map[uint64]engine.KVEvent
	repairing bool
}

type simRequest struct {
	id        string
	prompt    []uint32
	hashes    []uint64
	maxTokens int
	generated int
	attempts  int
	worker    string
	done      int // completions seen: must end at exactly 1
	failed    error
}

type servingRun struct {
	r           *Run
	workers     map[string]*simWorker
	order       []string
	ix          *router.Index
	views       map[string]*view
	reqs        []*simRequest
	router      actors.Address
	bug         string
	problems    []error
	dropped     uint64 // KV events lost on the way
	repairs     uint64
	dumps       uint64
	reroutes    uint64
	duplicated  uint64
	partitioned map[string]time.Time
}

func driveServing(r *Run) Invariant {
	s := &servingRun{r: r, workers: map[string]*simWorker{}, ix: router.NewIndex(servingIndexCap), partitioned: map[string]time.Time{},
		views: map[string]*view{}, router: actors.Address{Kind: routerm.Kind, ID: "r0"}, bug: r.Opts.Bug}
	w := r.World
	for i := range servingWorkers {
		id := fmt.Sprintf("w%d", i)
		s.order = append(s.order, id)
		s.workers[id] = s.newWorker(id, 1)
	}
	// Prompts share one of a few system prompts, then a conversation
	// prefix, then a unique tail: the KV router has prefixes to find.
	n := int(r.Opts.Duration.Seconds() * servingRate)
	var at time.Duration
	for i := range n {
		at += time.Duration(w.Rand().ExpFloat64() * float64(time.Second) / servingRate)
		sys := w.Rand().IntN(4)
		conv := w.Rand().IntN(40)
		prompt := make([]uint32, 0, 256)
		for j := range 64 {
			prompt = append(prompt, uint32(1000+sys*100+j))
		}
		for j := range 64 + 16*(conv%4) {
			prompt = append(prompt, uint32(5000+conv*200+j))
		}
		for j := range 8 + w.Rand().IntN(24) {
			prompt = append(prompt, uint32(20000+i*7+j)%30000+1)
		}
		req := &simRequest{id: fmt.Sprintf("q%d", i), prompt: prompt, hashes: mocker.BlockHashes(prompt, servingBlockSize),
			maxTokens: 4 + w.Rand().IntN(60)}
		s.reqs = append(s.reqs, req)
		w.After(at, func() { s.route(req) })
	}
	// Faults while the load runs.
	for _, id := range s.order {
		if w.Chance(r.Opts.Faults.CrashRate * 3) {
			crashAt := time.Duration(w.Rand().Int64N(int64(r.Opts.Duration)))
			w.After(crashAt, func() { s.crashWorker(id) })
		}
	}
	if r.Opts.Faults.CrashRate > 0 {
		for range 2 {
			w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() { r.Host.Crash(s.router) })
		}
		for range 2 {
			id := s.order[w.Rand().IntN(len(s.order))]
			d := time.Duration(200+w.Rand().IntN(600)) * time.Millisecond
			w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() { s.partition(id, d) })
		}
	}
	// Heartbeats carry each worker's last event id, so a lost tail is
	// noticed. They stop a few rounds after the load, once every engine is
	// idle (slow iterations can run past the load), so the world goes quiet.
	var tick func()
	quiet := 0
	tick = func() {
		busy := w.Elapsed() < r.Opts.Duration+time.Second
		for _, id := range s.order {
			wk := s.workers[id]
			if wk.alive && wk.last > 0 {
				s.heartbeat(wk)
			}
			busy = busy || (wk.alive && !wk.eng.Idle())
		}
		if quiet = quiet + 1; busy {
			quiet = 0
		}
		if quiet < 3 {
			w.After(50*time.Millisecond, tick)
		}
	}
	w.After(50*time.Millisecond, tick)
	return s.check
}

func (s *servingRun) newWorker(id string, epoch int) *simWorker {
	eng, err := mocker.New(mocker.Config{BlockSize: servingBlockSize, NumBlocks: 512, BlockBytes: 64,
		MaxBatchTokens: 2048, MaxSeqs: 64, MaxWaiting: 256, Faults: s.r.Faults()})
	if err != nil {
		panic(err) // a constant configuration
	}
	return &simWorker{id: id, epoch: epoch, eng: eng, alive: true, running: map[string]*simRequest{}}
}

func (s *servingRun) fail(err error) { s.problems = append(s.problems, err) }

// route asks the router actor for a worker, then hands the request over.
func (s *servingRun) route(req *simRequest) {
	w := s.r.World
	req.attempts++
	if req.attempts > servingRetries {
		req.failed = fmt.Errorf("request %s: no worker after %d attempts", req.id, servingRetries)
		req.done++
		return
	}
	var cands []router.Candidate
	for _, id := range s.order {
		wk := s.workers[id]
		if wk.gone {
			continue
		}
		l := wk.eng.Load()
		cands = append(cands, router.Candidate{ID: id, Active: l.Active + l.Waiting, Waiting: l.Waiting, BlocksUsed: l.BlocksUsed, BlocksTotal: l.BlocksTotal})
	}
	cands = s.ix.WithOverlap(req.hashes, cands)
	cmd := &triplanev1.RouteRequest{RequestId: fmt.Sprintf("%s.%d", req.id, req.attempts), Policy: string(router.PolicyKV),
		Blocks: uint32(len(req.hashes)), FirstHash: req.hashes[0]}
	for _, c := range cands {
		cmd.Candidates = append(cmd.Candidates, &triplanev1.RouterCandidate{Worker: c.ID, Active: uint32(c.Active),
			BlocksUsed: uint64(c.BlocksUsed), BlocksTotal: uint64(c.BlocksTotal), Overlap: uint32(c.Overlap), Waiting: uint32(c.Waiting)})
	}
	s.r.Host.Deliver(s.router, cmd.RequestId, cmd, func(m proto.Message, err error) {
		switch {
		case err == nil:
		case errors.Is(err, actors.ErrPersist), errors.Is(err, router.ErrNoWorkers), errors.Is(err, ErrCrashed):
			// The client's frontend retries after a pause.
			w.After(10*time.Millisecond, func() { s.route(req) })
			return
		default:
			s.fail(fmt.Errorf("request %s: unexpected routing error: %w", req.id, err))
			req.failed = err
			req.done++
			return
		}
		choice := m.(*triplanev1.RouteReply).Worker
		wk := s.workers[choice]
		if wk.gone && s.bug != BugStaleRoute {
			// The decision waited (the router actor was recovering) and
			// discovery has removed the worker since: route again.
			s.reroutes++
			w.After(time.Millisecond, func() { s.route(req) })
			return
		}
		if !wk.alive && w.Now().Sub(wk.diedAt) > servingGrace {
			s.fail(fmt.Errorf("invariant dead-routing: request %s routed to %s, dead for %s (grace %s)",
				req.id, choice, w.Now().Sub(wk.diedAt), servingGrace))
		}
		// The stream to the worker takes a moment to open.
		w.After(time.Millisecond, func() { s.start(req, wk) })
	})
}

// start adds the request (with what it generated so far) to the worker's
// engine; a dead worker fails the stream and the request migrates.
func (s *servingRun) start(req *simRequest, wk *simWorker) {
	if !wk.alive {
		s.r.World.After(time.Millisecond, func() { s.route(req) })
		return
	}
	prompt := slices.Clone(req.prompt)
	for k := range req.generated {
		prompt = append(prompt, mocker.TokenAt(req.id, k, 32000))
	}
	err := wk.eng.Add(engine.Request{ID: req.id, Tokens: prompt, MaxTokens: req.maxTokens - req.generated})
	if err != nil {
		req.failed = fmt.Errorf("request %s refused by %s: %w", req.id, wk.id, err)
		req.done++
		return
	}
	req.worker = wk.id
	wk.running[req.id] = req
	s.kick(wk)
}

// kick schedules the worker's next engine step if none is.
func (s *servingRun) kick(wk *simWorker) {
	if wk.step || !wk.alive {
		return
	}
	wk.step = true
	epoch := wk.epoch
	s.r.World.After(0, func() { s.stepWorker(wk, epoch) })
}

func (s *servingRun) stepWorker(wk *simWorker, epoch int) {
	if !wk.alive || wk.epoch != epoch {
		return
	}
	st := wk.eng.Step()
	for _, ev := range st.Events {
		wk.last = ev.ID
		wk.ring = append(wk.ring, ev)
		if len(wk.ring) > servingRing {
			wk.ring = wk.ring[len(wk.ring)-servingRing:]
		}
		s.sendEvent(wk, ev)
	}
	for _, o := range st.Outputs {
		req := wk.running[o.ID]
		if req == nil {
			continue
		}
		req.generated += len(o.Tokens)
		if o.Finished {
			delete(wk.running, o.ID)
			if o.Err != nil {
				req.failed = o.Err
			} else if req.generated != req.maxTokens {
				s.fail(fmt.Errorf("invariant tokens: request %s got %d tokens, asked %d", req.id, req.generated, req.maxTokens))
			}
			req.done++
		}
	}
	wk.step = false
	if !wk.eng.Idle() {
		wk.step = true
		s.r.World.After(max(st.Duration, time.Microsecond), func() { s.stepWorker(wk, epoch) })
	}
}

// sendEvent delivers one KV event to the router after a latency, or loses
// it.
func (s *servingRun) sendEvent(wk *simWorker, ev engine.KVEvent) {
	w := s.r.World
	if w.Chance(0.02) || w.Now().Before(s.partitioned[wk.id]) {
		s.dropped++
		return
	}
	id, epoch := wk.id, wk.epoch
	w.After(time.Duration(100+w.Rand().IntN(4900))*time.Microsecond, func() { s.onEvent(id, epoch, ev) })
	if w.Chance(0.01) {
		// Duplicated on the way: the view must apply it once.
		s.duplicated++
		w.After(time.Duration(100+w.Rand().IntN(9900))*time.Microsecond, func() { s.onEvent(id, epoch, ev) })
	}
}

// cut reports whether a worker's stream is partitioned from the router now.
func (s *servingRun) cut(id string) bool { return s.r.World.Now().Before(s.partitioned[id]) }

// partition cuts the KV events of one worker off the router for d (the
// worker keeps serving); after the heal, heartbeats reveal the gap and the
// repair fetches it from the ring or a dump.
func (s *servingRun) partition(id string, d time.Duration) {
	w := s.r.World
	s.partitioned[id] = w.Now().Add(d)
	w.Tracef("partition: %s's KV events cut off from the router for %s", id, d)
}

func (s *servingRun) viewOf(id string, epoch int) *view {
	v := s.views[id]
	switch {
	case v == nil || epoch > v.epoch:
		// A new worker, or a restarted one: its ids start again.
		s.ix.RemoveWorker(id)
		v = &view{epoch: epoch, next: 1, pending: map[uint64]engine.KVEvent{}}
		s.views[id] = v
	case epoch < v.epoch:
		return nil // stale
	}
	return v
}

func (s *servingRun) onEvent(id string, epoch int, ev engine.KVEvent) {
	if cur := s.workers[id]; cur.gone || epoch != cur.epoch {
		return // late events of a worker discovery removed, or of its previous run
	}
	v := s.viewOf(id, epoch)
	if v == nil || ev.ID < v.next {
		return
	}
	if ev.ID == v.next {
		s.apply(id, v, ev)
		return
	}
	if len(v.pending) < servingMaxPending {
		v.pending[ev.ID] = ev
	}
	s.repairLater(id, v)
}

func (s *servingRun) apply(id string, v *view, ev engine.KVEvent) {
	s.ix.Apply(id, ev)
	v.next = ev.ID + 1
	s.drain(id, v)
}

// drain applies the buffered events that now follow in order.
func (s *servingRun) drain(id string, v *view) {
	for {
		p, ok := v.pending[v.next]
		if !ok {
			return
		}
		delete(v.pending, v.next)
		s.ix.Apply(id, p)
		v.next = p.ID + 1
	}
}

func (s *servingRun) heartbeat(wk *simWorker) {
	if s.cut(wk.id) {
		return // the partition cuts heartbeats off too
	}
	id, epoch, last := wk.id, wk.epoch, wk.last
	s.r.World.After(time.Millisecond, func() {
		if cur := s.workers[id]; cur.gone || cur.epoch != epoch {
			return
		}
		if v := s.viewOf(id, epoch); v != nil && last >= v.next {
			s.repairLater(id, v)
		}
	})
}

// repairLater asks the worker for the missing events: from its ring when
// it still has them, else a dump of its blocks.
func (s *servingRun) repairLater(id string, v *view) {
	if v.repairing {
		return
	}
	v.repairing = true
	s.r.World.After(5*time.Millisecond, func() {
		v.repairing = false
		wk := s.workers[id]
		if !wk.alive || wk.epoch != v.epoch || s.views[id] != v {
			return
		}
		if s.cut(id) {
			// No resend gets through a partition; the next heartbeat
			// after the heal starts the repair again.
			return
		}
		if s.bug == BugRouterIgnoresGap {
			// The bug: skip to the oldest buffered event, losing the gap.
			if len(v.pending) > 0 {
				oldest := slices.Min(slices.Collect(maps.Keys(v.pending)))
				v.next = oldest
				s.apply(id, v, v.pending[oldest])
				delete(v.pending, oldest)
			}
			return
		}
		s.repairs++
		if len(wk.ring) > 0 && wk.ring[0].ID <= v.next {
			for _, ev := range wk.ring {
				if ev.ID >= v.next {
					s.apply(id, v, ev)
				}
			}
			return
		}
		s.dumps++
		s.ix.Reset(id, slices.Sorted(maps.Keys(wk.eng.Cached())), wk.last)
		v.next = wk.last + 1
		for k := range v.pending {
			if k < v.next {
				delete(v.pending, k)
			}
		}
		s.drain(id, v)
	})
}

// crashWorker kills a worker: its streams fail (the requests migrate), the
// router drops it when discovery does (after the grace), and it restarts
// with an empty cache and a new epoch.
func (s *servingRun) crashWorker(id string) {
	w := s.r.World
	wk := s.workers[id]
	if !wk.alive {
		return
	}
	wk.alive, wk.diedAt = false, w.Now()
	w.Tracef("worker %s crashed with %d requests", id, len(wk.running))
	for _, req := range slices.SortedFunc(maps.Values(wk.running), func(a, b *simRequest) int { return cmpStr(a.id, b.id) }) {
		w.After(time.Millisecond, func() { s.route(req) })
	}
	wk.running = map[string]*simRequest{}
	w.After(servingGrace/2, func() {
		wk.gone = true
		s.ix.RemoveWorker(id)
		delete(s.views, id)
	})
	w.After(200*time.Millisecond, func() {
		nw := s.newWorker(id, wk.epoch+1)
		s.workers[id] = nw
		w.Tracef("worker %s restarted, epoch %d", id, nw.epoch)
	})
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (s *servingRun) check(r *Run) error {
	if len(s.problems) > 0 {
		return fmt.Errorf("%w (and %d more)", s.problems[0], len(s.problems)-1)
	}
	for _, req := range s.reqs {
		switch {
		case req.done == 0:
			return fmt.Errorf("invariant exactly-once: request %s never completed nor failed (attempts %d, worker %s)", req.id, req.attempts, req.worker)
		case req.done > 1:
			return fmt.Errorf("invariant exactly-once: request %s completed %d times", req.id, req.done)
		}
	}
	for _, id := range s.order {
		wk := s.workers[id]
		got := s.ix.Blocks(id)
		want := map[uint64]bool{}
		for h := range wk.eng.Cached() {
			want[h] = true
		}
		if !maps.Equal(got, want) {
			return fmt.Errorf("invariant index: after quiescence the router holds %d blocks of %s, the worker %d (events dropped %d, repairs %d, dumps %d)",
				len(got), id, len(want), s.dropped, s.repairs, s.dumps)
		}
	}
	if s.ix.Len() > servingIndexCap {
		return fmt.Errorf("invariant bounds: index holds %d entries, cap %d", s.ix.Len(), servingIndexCap)
	}
	r.World.Tracef("serving: %d requests, %d KV events dropped, %d duplicated, %d repairs, %d dumps, %d stale decisions routed again, index %d entries",
		len(s.reqs), s.dropped, s.duplicated, s.repairs, s.dumps, s.reroutes, s.ix.Len())
	return nil
}
