package sim

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/triplane-dev/triplane/actors"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	eventplane "github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
	"github.com/triplane-dev/triplane/router"
)

// The serving scenario's shape.
const (
	servingWorkers    = 8
	servingRate       = 100 // requests per virtual second
	servingBlockSize  = 16
	servingRing       = 8 // KV events a worker keeps for resends (small: partitions outlast it)
	servingIndexCap   = 1 << 20
	servingMaxPending = 4096 // out-of-order KV events buffered per worker
	// Workers register on the simulated etcd under a lease they keep
	// alive every heartbeat round; a dead worker leaves discovery when its
	// lease expires. The grace is that TTL plus the watch's delivery.
	servingLeaseTTL = 150 * time.Millisecond
	// servingGrace bounds how long discovery may list a dead worker: its
	// lease's TTL, an etcd leader change (up to 250 ms, after which the new
	// leader renews every lease), the keep-alive round and the watch.
	servingGrace   = 2*servingLeaseTTL + 250*time.Millisecond + servingTick
	servingRetries = 5 // routing attempts and migrations per request
	// servingRepairTimeout bounds one resend request (lost, or its worker
	// cut off or dead).
	servingRepairTimeout = 50 * time.Millisecond
	// servingResendBudget bounds a resend reply's bytes (see newWorker).
	servingResendBudget = 1 << 10
	// servingLoadInterval between a worker's load reports (the real
	// worker's default): between reports the routing shell knows only its
	// own flights.
	servingLoadInterval = 500 * time.Millisecond
	// servingHeartbeat between a worker's KV heartbeats, which reveal a
	// lost tail: a fifth of the real publisher's default (1 s), so repairs
	// start soon after a loss, but not every 50 ms round (a heartbeat per
	// worker per round was a third of the bus's messages).
	servingHeartbeat = 200 * time.Millisecond
	servingTick      = 50 * time.Millisecond // keep-alives, checks
)

// Bugs the serving scenario can plant.
const (
	// BugRouterIgnoresGap makes the routing shell ignore the sequencer's
	// call for a repair: a lost event leaves a gap nobody fills, and the
	// index drifts from the workers.
	BugRouterIgnoresGap = "router-ignores-gap"
	// BugStaleRoute sends a request to the worker the router chose even
	// when discovery removed it while the decision was pending.
	BugStaleRoute = "stale-route"
)

// servingScenario runs the serving path's real state machines: mock
// engines as workers, each with the real KV event log (kvevents.Log:
// numbering, resend ring, dumps), the router actor (journaled decisions)
// and the routing shell's real KV event sequencer (kvevents.Sequencer) and
// index. Event batches arrive late, out of order, twice or not at all (also
// for whole partitions of a worker's stream, healed later) and the
// sequencer's repairs fetch them from the rings (or a dump). Workers crash and restart (new epoch, empty cache); their requests
// migrate with the tokens generated so far. Router appends fail and the
// router actor crashes.
var servingScenario = Scenario{
	Name: "serving",
	Description: fmt.Sprintf("%d mock workers, the KV router actor, %d req/s over shared prefixes; KV events delayed, dropped and repaired; worker crashes with migration; journal append failures and router crashes",
		servingWorkers, servingRate),
	Registry: func() *actors.Registry { return actors.NewRegistry(routerm.Machine{}) },
	Drive:    driveServing,
	// The router actor journals through the host.
	Bugs: []string{BugApplyBeforePersist, BugSnapshotBeforePersist, BugRouterIgnoresGap, BugStaleRoute},
	// The engines', the workers' KV event logs' and the sequencer's:
	// driveServing hands each Run.Faults.
	FaultPoints: slices.Concat(mocker.FaultPoints, kvevents.FaultPoints),
	Crashes:     "each worker crashes once with probability 3x the rate (at most 1), and any rate above 0 also crashes the router actor twice",
	ReadsFaults: []string{"MessageLoss", "MessageDuplicate", "Partitions", "LeaderChanges"},
	Detailed:    true,
}

type simWorker struct {
	id      string
	epoch   int
	eng     *mocker.Engine
	log     *kvevents.Log // the worker's KV event numbering, mirror and resend ring
	bus     *BusClient
	unserve func() // stops answering resend requests (a crash)
	loadSeq uint64
	alive   bool
	diedAt  time.Time
	etcd    *EtcdClient
	lease   int64 // 0: not registered (etcd unavailable): the next round tries
	step    bool  // a step is scheduled, at stepAt (events for other times are stale)
	stepAt  time.Duration
	// A row of quiet engine iterations (mocker.Engine.Quiet) runs at once
	// when it ends or when something touches the engine mid-row: quiet of
	// them are pending, the first at quietFrom, each taking quietEach.
	quiet                int
	quietFrom, quietEach time.Duration
	running              map[string]*simRequest
	// The worker's subjects and its step, made once (a worker object is
	// one epoch: a restart makes a new one).
	eventsSubject, loadSubject string
	stepFn                     func()
}

type simRequest struct {
	id        string
	prompt    []uint32
	hashes    []uint64
	maxTokens int
	generated int
	attempts  int
	started   bool // this attempt produced a token: its prefill is done
	worker    string
	on        *simWorker // the worker object running it (in its running set), or nil
	done      int        // completions seen: must end at exactly 1
	failed    error
}

type servingRun struct {
	r     *Run
	order []string
	ix    *router.Index
	// seq is the routing shell's KV event consumer core, the one
	// production runs: it orders each worker's events, buffers early ones
	// and says when to repair a gap.
	seq *kvevents.Sequencer
	// flights and loads are what the real routing shell knows of the
	// workers' load: its own requests in flight and the last load reports.
	flights  *router.Flights
	loads    *eventplane.LoadAggregator // the frontend's load view, on the virtual clock
	reqs     []*simRequest
	router   actors.Address
	bug      string
	problems *Problems
	// bus is the simulated event plane the workers and the routing shell
	// talk over: KV event batches and heartbeats, resend requests, load
	// reports; it loses, duplicates and delays them, and partitions a
	// worker off.
	bus       *Bus
	routerBus *BusClient
	// etcd is the simulated control plane: workers register there and the
	// shell's discovery (listed) follows its watch.
	etcd *Etcd
	// workerAt is each worker's running object and listedAt whether
	// discovery lists it, by position in order (at): the rounds and every
	// route walk all workers, and looking each up by name was 2-3% of a run.
	workerAt []*simWorker
	listedAt []bool
	at       map[string]int
	caughtUp bool // the index was checked once every view caught up
	reroutes uint64
	cands    []router.Candidate // route's buffer
}

func driveServing(r *Run) Invariant {
	s := &servingRun{r: r, problems: NewProblems(r.World), ix: router.NewIndex(servingIndexCap), bus: NewBus(r.World),
		etcd:   NewEtcd(r.World),
		router: actors.Address{Kind: routerm.Kind, ID: "r0"}, bug: r.Opts.Bug, flights: router.NewFlights()}
	s.loads = eventplane.NewLoadView(eventplane.AggregatorConfig{Now: r.World.Now})
	s.seq = kvevents.NewSequencer(kvevents.SequencerConfig{MaxPending: servingMaxPending, Faults: r.Faults(),
		// As the frontend: only workers discovery lists get a view.
		Follows: s.isListed,
		OnEvent: s.ix.ApplyKvEvent,
		OnReset: func(worker string, blocks map[uint64]kvevents.Block, last uint64) {
			s.ix.Reset(worker, slices.Sorted(maps.Keys(blocks)), last)
		}})
	w := r.World
	// Harsher than NATS: besides losses, some messages arrive twice and
	// out of order, which the KV event sequencer must absorb.
	s.bus.Loss, s.bus.Duplicate, s.bus.Reorder = r.Opts.Faults.MessageLoss, r.Opts.Faults.MessageDuplicate, true
	s.routerBus = s.bus.Client("router")
	// The routing shell's subscriptions, as the frontend's consumer and
	// load aggregator make them.
	if _, err := s.routerBus.Subscribe("kv.events.*", "", func(_ string, m proto.Message) { s.ingest(m.(*triplanev1.KvEventBatch)) }); err != nil {
		panic(err) // a constant subject
	}
	if _, err := s.routerBus.Subscribe("load.*", "", func(_ string, m proto.Message) { s.onLoad(m.(*triplanev1.LoadReport)) }); err != nil {
		panic(err)
	}
	// Discovery: the shell watches the instances and reads the key a
	// change names (level-triggered: a late notification cannot undo a
	// newer registration).
	disc := s.etcd.Client("router")
	var learn func(key string)
	learn = func(key string) {
		id := strings.TrimPrefix(key, "instances/")
		_, _, ok, err := disc.Get(key)
		switch {
		case err != nil:
			// etcd is electing a leader: read again shortly, or a change
			// notified meanwhile would be missed for good.
			w.After(10*time.Millisecond, func() { learn(key) })
		case ok:
			s.setListed(id, true)
		case s.isListed(id):
			s.setListed(id, false)
			s.seq.Forget(id)
			s.ix.RemoveWorker(id)
			w.Tracef("discovery: %s left (its lease expired); its blocks dropped from the index", id)
		}
	}
	disc.Watch("instances/", func(key string, _ bool) { learn(key) })
	s.at = map[string]int{}
	for i := range servingWorkers {
		id := fmt.Sprintf("w%d", i)
		s.order, s.at[id] = append(s.order, id), i
		s.workerAt, s.listedAt = append(s.workerAt, nil), append(s.listedAt, false)
		s.setWorker(id, s.newWorker(id, 1))
	}
	// Prompts share one of a few system prompts, then a conversation
	// prefix, then a unique tail: the KV router has prefixes to find.
	n := int(r.Opts.Duration.Seconds() * servingRate)
	var at time.Duration
	arrivals := make([]time.Duration, 0, n)
	// The system prompt and conversation prefix of a pair are made, and
	// their blocks hashed, once: hashing every prompt whole was 3% of a
	// run, though only its tail differs.
	var prefixes [4][40]*promptPrefix
	for i := range n {
		at += time.Duration(w.Rand().ExpFloat64() * float64(time.Second) / servingRate)
		sys := w.Rand().IntN(4)
		conv := w.Rand().IntN(40)
		tail := 8 + w.Rand().IntN(24) // drawn after conv, as always
		p := prefixes[sys][conv]
		if p == nil {
			p = newPromptPrefix(sys, conv)
			prefixes[sys][conv] = p
		}
		prompt := append(make([]uint32, 0, len(p.tokens)+tail), p.tokens...)
		for j := range tail {
			prompt = append(prompt, uint32(20000+i*7+j)%30000+1)
		}
		req := &simRequest{id: "q" + strconv.Itoa(i), prompt: prompt, hashes: p.blockHashes(prompt),
			maxTokens: 4 + w.Rand().IntN(60)}
		s.reqs = append(s.reqs, req)
		arrivals = append(arrivals, at)
	}
	// The arrivals run in the order they had when all were scheduled here,
	// but each is queued by the one before: a thousand events waiting in
	// the queue for the whole run made every other event's turn slower.
	if n > 0 {
		// Arrival times are after now, as After's delays are.
		first, next, base := w.reserve(n), 0, w.Elapsed()
		var arrive func()
		arrive = func() {
			req := s.reqs[next]
			if next++; next < n {
				w.at(base+arrivals[next], first+uint64(next), arrive)
			}
			s.route(req)
		}
		w.at(base+arrivals[0], first, arrive)
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
	}
	// In this order, the draws of DefaultFaults are those of the runs
	// before these faults had knobs of their own: same seeds, same runs.
	for range r.Opts.Faults.LeaderChanges {
		// etcd elects a new leader: registrations and reads fail a while.
		w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() {
			s.etcd.LeaderChange(time.Duration(50+w.Rand().IntN(200)) * time.Millisecond)
		})
	}
	for range r.Opts.Faults.Partitions {
		id := s.order[w.Rand().IntN(len(s.order))]
		d := time.Duration(200+w.Rand().IntN(600)) * time.Millisecond
		w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() { s.partition(id, d) })
	}
	// Heartbeats carry each worker's last event id, so a lost tail is
	// noticed. They stop a few rounds after the load, once every engine is
	// idle (slow iterations can run past the load), so the world goes quiet.
	var tick func()
	quiet, ticks := 0, 0
	tick = func() {
		busy := w.Elapsed() < r.Opts.Duration+time.Second
		ticks++
		for i, id := range s.order {
			wk, listed := s.workerAt[i], s.listedAt[i]
			if wk.alive && ticks%int(servingHeartbeat/servingTick) == 0 {
				// Even before its first event, as the real publisher: a
				// restarted worker's heartbeat carries its new epoch, which
				// resets a view that discovery never dropped (it came back
				// before its old lease expired).
				s.heartbeat(wk)
			}
			if !wk.alive && listed && w.Now().Sub(wk.diedAt) > servingGrace {
				s.fail(fmt.Errorf("invariant discovery: %s dead for %s and still listed (grace %s)", id, w.Now().Sub(wk.diedAt), servingGrace))
			}
			if wk.alive {
				s.keepAlive(wk)
				// Not quiet until the shell's view caught up with the worker
				// (a repair may still run), unless that takes implausibly
				// long (a bug that never repairs: the check then fails).
				behind := listed && s.seq.LastEventID(id) != wk.log.Last()
				busy = busy || (behind && w.Elapsed() < r.Opts.Duration+10*time.Second)
			}
			if wk.alive && ticks%int(servingLoadInterval/servingTick) == 0 {
				s.reportLoad(wk)
			}
			busy = busy || (wk.alive && !wk.eng.Idle())
		}
		if quiet = quiet + 1; busy {
			quiet = 0
		}
		if quiet < 3 {
			w.After(servingTick, tick)
			return
		}
		// Quiet: check the index now, while every worker is still
		// registered; then the keep-alives stop, the leases expire and
		// discovery drops every worker (checked at the end).
		s.checkIndex()
		s.caughtUp = true
	}
	w.After(servingTick, tick)
	return s.check
}

// promptPrefix is the start of the prompts of one system prompt and
// conversation: its tokens and the chained hashes of its blocks.
type promptPrefix struct {
	tokens []uint32
	hashes []uint64
}

func newPromptPrefix(sys, conv int) *promptPrefix {
	p := &promptPrefix{tokens: make([]uint32, 0, 64+64+16*(conv%4))}
	for j := range 64 {
		p.tokens = append(p.tokens, uint32(1000+sys*100+j))
	}
	for j := range 64 + 16*(conv%4) {
		p.tokens = append(p.tokens, uint32(5000+conv*200+j))
	}
	p.hashes = mocker.BlockHashes(p.tokens, servingBlockSize)
	return p
}

// blockHashes is mocker.BlockHashes(prompt, servingBlockSize) for a prompt
// that starts with the prefix: the prefix's hashes, then the rest chained
// on (whole blocks in the prefix: else all of it is hashed).
func (p *promptPrefix) blockHashes(prompt []uint32) []uint64 {
	bs := servingBlockSize
	if len(p.tokens)%bs != 0 || len(p.hashes) == 0 {
		return mocker.BlockHashes(prompt, bs)
	}
	out := make([]uint64, len(prompt)/bs)
	parent := p.hashes[len(p.hashes)-1]
	for b := copy(out, p.hashes); b < len(out); b++ {
		parent = mocker.BlockHash(parent, prompt[b*bs:(b+1)*bs])
		out[b] = parent
	}
	return out
}

func (s *servingRun) newWorker(id string, epoch int) *simWorker {
	eng, err := mocker.New(mocker.Config{BlockSize: servingBlockSize, NumBlocks: 512, BlockBytes: 64,
		MaxBatchTokens: 2048, MaxSeqs: 64, MaxWaiting: 256, Faults: s.r.Faults()})
	if err != nil {
		panic(err) // a constant configuration
	}
	wk := &simWorker{id: id, epoch: epoch, eng: eng, alive: true, running: map[string]*simRequest{},
		log: kvevents.NewLog(id, uint64(epoch), servingRing, 0, s.r.Faults()), bus: s.bus.Client(id)}
	wk.etcd = s.etcd.Client(id)
	wk.eventsSubject, wk.loadSubject = "kv.events."+id, "load."+id
	wk.stepFn = func() { s.stepWorker(wk) }
	s.register(wk)
	wk.unserve, err = wk.bus.Serve("kv.resend."+id, "", func(m proto.Message) (proto.Message, error) {
		// 1 KiB, not the real publisher's half of 1 MiB: a full pool (512
		// blocks, about 12 KiB dumped) then takes about 12 pages, so the runs
		// exercise paged dumps (pages of one frozen state while the worker
		// changes, lost and restarted ones) as a real pool beyond 40k
		// blocks does.
		return wk.log.Resend(m.(*triplanev1.KvResendRequest), servingResendBudget), nil
	})
	if err != nil {
		panic(err) // a constant subject
	}
	return wk
}

func (s *servingRun) fail(err error) { s.problems.Add(err) }

// setListed records whether discovery lists worker id (only the
// scenario's workers register).
func (s *servingRun) setListed(id string, listed bool) {
	if i, ok := s.at[id]; ok {
		s.listedAt[i] = listed
	}
}

// isListed reports whether discovery lists worker id.
func (s *servingRun) isListed(id string) bool {
	i, ok := s.at[id]
	return ok && s.listedAt[i]
}

// worker is the running object of worker id (one of order).
func (s *servingRun) worker(id string) *simWorker { return s.workerAt[s.at[id]] }

// setWorker makes wk the running object of worker id (one of order).
func (s *servingRun) setWorker(id string, wk *simWorker) { s.workerAt[s.at[id]] = wk }

// request returns the request with the given id ("q" and its number in
// decimal, as the requests are named), or nil. The number is read by hand
// and only in its one spelling (no sign, no leading zero), so the id is
// that request's without comparing them.
func (s *servingRun) request(id string) *simRequest {
	if len(id) < 2 || id[0] != 'q' || (id[1] == '0' && len(id) > 2) {
		return nil
	}
	n := 0
	for _, c := range []byte(id[1:]) {
		if c < '0' || c > '9' {
			return nil
		}
		if n = 10*n + int(c-'0'); n >= len(s.reqs) {
			return nil
		}
	}
	return s.reqs[n]
}

// route asks the router actor for a worker, then hands the request over.
func (s *servingRun) route(req *simRequest) {
	w := s.r.World
	req.attempts++
	if req.attempts > servingRetries {
		req.failed = fmt.Errorf("request %s: no worker after %d attempts", req.id, servingRetries)
		req.done++
		if w.Detail {
			w.Detailf("%s failed: %v", req.id, req.failed)
		}
		return
	}
	// The routing shell's view, as the frontend's: discovery's workers,
	// each one's last load report corrected by the shell's own flights,
	// and the index's overlap.
	// The candidates go into a buffer reused by every route: Command
	// copies what it needs.
	cands := s.cands[:0]
	loads := s.loads.Latest()
	for i, id := range s.order {
		if !s.listedAt[i] {
			continue
		}
		cands = append(cands, s.flights.Candidate(id, router.ReportOf(loads[id])))
	}
	s.cands = cands
	s.ix.SetOverlap(req.hashes, cands)
	cmd := routerm.Command(req.id+"."+strconv.Itoa(req.attempts), router.PolicyKV, router.Params{}, req.hashes, cands)
	s.r.Host.Deliver(s.router, cmd.RequestId, cmd, func(m proto.Message, err error) {
		switch {
		case err == nil:
		case errors.Is(err, actors.ErrPersist), errors.Is(err, router.ErrNoWorkers), errors.Is(err, ErrCrashed):
			// The client's frontend retries after a pause.
			if w.Detail {
				w.Detailf("%s: no decision (%v); routing again in 10ms", cmd.RequestId, err)
			}
			w.After(10*time.Millisecond, func() { s.route(req) })
			return
		default:
			s.fail(fmt.Errorf("request %s: unexpected routing error: %w", req.id, err))
			req.failed = err
			req.done++
			return
		}
		reply := m.(*triplanev1.RouteReply)
		choice := reply.Worker
		wk := s.worker(choice)
		if !s.isListed(choice) {
			if s.bug != BugStaleRoute {
				// The decision waited (the router actor was recovering)
				// and discovery has removed the worker since: route again.
				if w.Detail {
					w.Detailf("%s: the router chose %s, which discovery dropped meanwhile; routing again", cmd.RequestId, choice)
				}
				s.reroutes++
				w.After(time.Millisecond, func() { s.route(req) })
				return
			}
			if !wk.alive {
				// The planted bug sends it anyway to a worker known dead:
				// discovery dropped it (its lease expired) before the
				// request was sent.
				s.fail(fmt.Errorf("invariant dead-routing: request %s routed to %s, dead for %s and dropped by discovery",
					req.id, choice, w.Now().Sub(wk.diedAt)))
			}
		}
		s.flights.Add(choice, req.id, w.Now(), len(req.hashes)-int(reply.Overlap))
		if w.Detail {
			w.Detailf("%s routed to %s (%d of %d prompt blocks cached there, of %d candidates)", cmd.RequestId, choice, reply.Overlap, len(req.hashes), len(cmd.Candidates))
		}
		// The stream to the worker takes a moment to open.
		w.After(time.Millisecond, func() { s.start(req, wk) })
	})
}

// start adds the request (with what it generated so far) to the worker's
// engine; a dead worker fails the stream and the request migrates.
func (s *servingRun) start(req *simRequest, wk *simWorker) {
	w := s.r.World
	if !wk.alive {
		if w.Detail {
			w.Detailf("%s: %s died before the stream opened; routing again", req.id, wk.id)
		}
		s.flights.Done(wk.id, req.id)
		w.After(time.Millisecond, func() { s.route(req) })
		return
	}
	// The engine copies the prompt (Add keeps its own tokens): a first
	// attempt hands over the request's own, full so nothing can append to it.
	prompt := req.prompt[:len(req.prompt):len(req.prompt)]
	if req.generated > 0 {
		prompt = slices.Clone(req.prompt)
		for k := range req.generated {
			prompt = append(prompt, mocker.TokenAt(req.id, k, 32000))
		}
	}
	s.catchUp(wk)
	err := wk.eng.Add(engine.Request{ID: req.id, Tokens: prompt, MaxTokens: req.maxTokens - req.generated})
	if err != nil {
		s.flights.Done(wk.id, req.id)
		req.failed = fmt.Errorf("request %s refused by %s: %w", req.id, wk.id, err)
		req.done++
		if w.Detail {
			w.Detailf("%s failed: %v", req.id, req.failed)
		}
		return
	}
	if req.on != nil && req.on != wk {
		// Outputs are credited to the worker a request is on: one running
		// on two would have the first's dropped without a word.
		s.fail(fmt.Errorf("request %s started on %s while running on %s", req.id, wk.id, req.on.id))
	}
	req.worker, req.started, req.on = wk.id, false, wk
	wk.running[req.id] = req
	if w.Detail {
		w.Detailf("%s started on %s (epoch %d): %d prompt tokens, %d of %d tokens generated before", req.id, wk.id, wk.epoch, len(req.prompt), req.generated, req.maxTokens)
	}
	s.kick(wk)
}

// kick schedules the worker's next engine step if none is, and ends a row
// of quiet iterations at the next one (the engine changed: its next
// iteration admits).
func (s *servingRun) kick(wk *simWorker) {
	if !wk.alive {
		return
	}
	if wk.step {
		if wk.quiet > 0 {
			wk.quiet = 0
			s.schedule(wk, wk.quietFrom)
		}
		return
	}
	s.schedule(wk, s.r.World.Elapsed())
}

// schedule sets wk's next step at virtual time at (an earlier scheduled
// one goes stale).
func (s *servingRun) schedule(wk *simWorker, at time.Duration) {
	w := s.r.World
	// Never in the past: the event would run now and find itself stale.
	at = max(at, w.Elapsed())
	wk.step, wk.stepAt = true, at
	w.After(at-w.Elapsed(), wk.stepFn)
}

// catchUp runs the worker's pending quiet iterations that started before
// now, before anything touches its engine or its requests.
func (s *servingRun) catchUp(wk *simWorker) {
	now := s.r.World.Elapsed()
	if wk.quiet == 0 || now <= wk.quietFrom {
		return
	}
	n := min(wk.quiet, int((now-wk.quietFrom-1)/wk.quietEach)+1)
	s.absorb(wk, wk.eng.StepQuiet(n))
	wk.quiet -= n
	wk.quietFrom += time.Duration(n) * wk.quietEach
}

// stepWorker runs one engine iteration of wk, after the row of quiet ones
// before it (a worker object is one epoch: a crash stops it for good, a
// restart makes a new one).
func (s *servingRun) stepWorker(wk *simWorker) {
	w := s.r.World
	if !wk.alive || !wk.step || w.Elapsed() != wk.stepAt {
		return // stale: the step moved
	}
	s.catchUp(wk)
	st := wk.eng.Step()
	s.absorb(wk, st)
	wk.step = false
	if !wk.eng.Idle() {
		next := w.Elapsed() + max(st.Duration, time.Microsecond)
		// The iterations after this one that only decode run as one, at
		// the end of their row.
		q, each := wk.eng.Quiet()
		wk.quiet, wk.quietFrom, wk.quietEach = q, next, max(each, time.Microsecond)
		s.schedule(wk, next+time.Duration(q)*wk.quietEach)
	}
}

// absorb publishes a step's KV events and credits its outputs to the
// requests.
func (s *servingRun) absorb(wk *simWorker, st engine.Step) {
	// One batch per step, as the real worker's PublishAll (a bound, though the bus has none).
	for _, b := range wk.log.AppendAll(kvevents.FromEngine(st.Events), 1<<20) {
		s.send(wk, b)
	}
	for _, o := range st.Outputs {
		// wk.running[o.ID], without hashing the id per output (2.5% of a
		// run): the request by its number, running here if its on says so.
		req := s.request(o.ID)
		if req == nil || req.on != wk {
			continue
		}
		req.generated += len(o.Tokens)
		if !req.started && len(o.Tokens) > 0 {
			req.started = true
			s.flights.Started(wk.id, req.id)
		}
		if o.Finished {
			s.flights.Done(wk.id, req.id)
			delete(wk.running, o.ID)
			req.on = nil
			if w := s.r.World; w.Detail {
				w.Detailf("%s finished on %s: %d tokens, error %v", req.id, wk.id, req.generated, o.Err)
			}
			if o.Err != nil {
				req.failed = o.Err
			} else if req.generated != req.maxTokens {
				s.fail(fmt.Errorf("invariant tokens: request %s got %d tokens, asked %d", req.id, req.generated, req.maxTokens))
			}
			req.done++
		}
	}
}

// send publishes one batch of a worker's KV events.
func (s *servingRun) send(wk *simWorker, b *triplanev1.KvEventBatch) {
	_ = wk.bus.Publish(wk.eventsSubject, b)
}

// partition cuts one worker off the event plane for d (it keeps serving
// its streams): its KV events, heartbeats, load reports and resend answers
// are lost; after the heal, heartbeats reveal the gap and the repair
// fetches it from the ring or a dump.
func (s *servingRun) partition(id string, d time.Duration) { s.bus.Partition(id, d) }

// ingest hands a batch to the sequencer, as the real consumer's
// subscription does, and starts a repair when it says so.
func (s *servingRun) ingest(b *triplanev1.KvEventBatch) {
	repair, err := s.seq.Ingest(b)
	if err != nil {
		s.fail(fmt.Errorf("the sequencer refused a worker's batch: %w", err))
		return
	}
	if repair {
		if w := s.r.World; w.Detail {
			w.Detailf("kv: a gap in %s's events (batch up to event %d, head %d); repair in 5ms", b.WorkerId, lastEventID(b), b.HeadEventId)
		}
		s.repair(b.WorkerId, 5*time.Millisecond)
	}
}

func (s *servingRun) heartbeat(wk *simWorker) {
	_ = wk.bus.Publish(wk.eventsSubject, wk.log.Heartbeat())
}

// reportLoad publishes the worker's load report, as the real worker does.
func (s *servingRun) reportLoad(wk *simWorker) {
	l := wk.eng.Load()
	wk.loadSeq++
	_ = wk.bus.Publish(wk.loadSubject, &triplanev1.LoadReport{InstanceId: wk.id, Seq: wk.loadSeq, ActiveRequests: uint32(l.Active), WaitingRequests: uint32(l.Waiting),
		KvBlocksUsed: uint64(l.BlocksUsed), KvBlocksTotal: uint64(l.BlocksTotal), SentAt: timestamppb.New(s.r.World.Now())})
}

// onLoad hands a report to the frontend's load aggregator (which keeps
// each worker's newest and ages out the silent).
func (s *servingRun) onLoad(l *triplanev1.LoadReport) { s.loads.Observe(l) }

// repair runs one resend request of the sequencer's repair after wait, as
// the real consumer's repairer does: ask the worker's log, hand the answer
// (or the failure) back, and go on as the sequencer says.
func (s *servingRun) repair(id string, wait time.Duration) {
	w := s.r.World
	w.After(wait, func() {
		req, epoch, ok := s.seq.RepairRequest(id)
		if !ok {
			return
		}
		if s.bug == BugRouterIgnoresGap {
			// The bug: the routing shell never asks; the gap stays and the
			// events after it wait in the buffer.
			return
		}
		if w.Detail {
			w.Detailf("kv: asking %s to resend events %d..%d (dump pages %v)", id, req.FromEventId, req.ToEventId, req.DumpPages)
		}
		_ = s.routerBus.Request("kv.resend."+id, req, servingRepairTimeout, func(m proto.Message, err error) {
			reply, _ := m.(*triplanev1.KvResendReply)
			res := s.seq.RepairDone(id, epoch, reply, err)
			if w.Detail {
				w.Detailf("kv: %s's resend answered (%s, error %v): next %v", id, resendKind(reply), err, res.Next)
			}
			switch res.Next {
			case kvevents.RepairAgain:
				s.repair(id, 0)
			case kvevents.RepairAfterBackoff:
				s.repair(id, 20*time.Millisecond)
			case kvevents.RepairGaveUp:
				w.Tracef("kv repair of %s gave up until its next batch (missing from %d, head %d)", id, res.Missing, res.Head)
			}
		})
	})
}

// register puts the worker's instance key on a fresh lease (its epoch as
// the value), as the real registrar does; while etcd is unavailable it
// fails and the next round tries again.
func (s *servingRun) register(wk *simWorker) {
	lease, err := wk.etcd.Grant(servingLeaseTTL)
	if err != nil {
		wk.lease = 0
		return
	}
	if _, ok := wk.etcd.Put("instances/"+wk.id, fmt.Sprint(wk.epoch), lease); ok {
		wk.lease = lease
	}
}

// keepAlive renews the worker's lease, registering again when it was
// lost (an unavailable etcd is no news: the next round tries).
func (s *servingRun) keepAlive(wk *simWorker) {
	if wk.lease == 0 {
		s.register(wk)
		return
	}
	if alive, err := wk.etcd.KeepAlive(wk.lease); err == nil && !alive {
		s.register(wk)
	}
}

// checkIndex compares the router's index with every worker's real blocks,
// once the load is quiet and every view caught up.
func (s *servingRun) checkIndex() {
	if s.ix.Len() > servingIndexCap {
		s.fail(fmt.Errorf("invariant bounds: index holds %d entries, cap %d", s.ix.Len(), servingIndexCap))
	}
	for _, id := range s.order {
		wk := s.worker(id)
		// The same sets: as many blocks (the index holds a worker's block
		// once), each of them cached. Walked in place: copying both sets
		// into maps was 2% of a run.
		got, same := 0, true
		s.ix.BlocksOf(id, func(h uint64) bool {
			got++
			same = wk.eng.IsCached(h)
			return same
		})
		if !same || got != wk.eng.CachedLen() {
			st := s.seq.Stats()
			s.fail(fmt.Errorf("invariant index: once quiet the router holds %d blocks of %s, the worker %d (messages lost %d, repairs %d, dumps %d)",
				len(s.ix.Blocks(id)), id, wk.eng.CachedLen(), s.bus.Lost, st.Resends, st.Dumps))
			return
		}
	}
}

// crashWorker kills a worker: its streams fail (the requests migrate), the
// router drops it when discovery does (after the grace), and it restarts
// with an empty cache and a new epoch.
func (s *servingRun) crashWorker(id string) {
	w := s.r.World
	wk := s.worker(id)
	if !wk.alive {
		return
	}
	// The tokens generated before the crash go with the requests.
	s.catchUp(wk)
	wk.alive, wk.diedAt = false, w.Now()
	wk.unserve()
	w.Tracef("worker %s crashed with %d requests", id, len(wk.running))
	for _, rid := range slices.Sorted(maps.Keys(wk.running)) {
		req := wk.running[rid]
		req.on = nil
		if w.Detail {
			w.Detailf("%s migrates from %s with %d of %d tokens", req.id, id, req.generated, req.maxTokens)
		}
		s.flights.Done(id, req.id)
		w.After(time.Millisecond, func() { s.route(req) })
	}
	wk.running = map[string]*simRequest{}
	// Its keep-alives stop: discovery drops it when the lease expires. It
	// usually comes back before that, sometimes only after the grace (so
	// the discovery invariant can see a dead worker listed too long).
	back := 200 * time.Millisecond
	if w.Chance(0.3) {
		back = servingGrace + 400*time.Millisecond
	}
	w.After(back, func() {
		nw := s.newWorker(id, wk.epoch+1)
		s.setWorker(id, nw)
		w.Tracef("worker %s restarted, epoch %d", id, nw.epoch)
	})
}

func (s *servingRun) check(r *Run) error {
	if err := s.problems.Err(); err != nil {
		return err
	}
	for _, req := range s.reqs {
		switch {
		case req.done == 0:
			return fmt.Errorf("invariant exactly-once: request %s never completed nor failed (attempts %d, worker %s)", req.id, req.attempts, req.worker)
		case req.done > 1:
			return fmt.Errorf("invariant exactly-once: request %s completed %d times", req.id, req.done)
		}
	}
	if !s.caughtUp {
		return errors.New("invariant quiescence: the load never went quiet")
	}
	// After the load every lease expired: discovery dropped every worker
	// and the index keeps none of their blocks.
	listed := 0
	for _, l := range s.listedAt {
		if l {
			listed++
		}
	}
	if listed > 0 || s.ix.Len() > 0 {
		return fmt.Errorf("invariant discovery: after every lease expired, discovery lists %d workers and the index holds %d blocks", listed, s.ix.Len())
	}
	for _, id := range s.order {
		if n := s.flights.Len(id); n > 0 {
			return fmt.Errorf("invariant bounds: after quiescence the routing shell still counts %d requests in flight to %s", n, id)
		}
	}
	failed := 0
	for _, req := range s.reqs {
		if req.failed != nil {
			failed++
		}
	}
	r.World.Tracef("serving: %d requests (%d failed visibly), bus %d published, %d delivered, %d lost, %d duplicated, %d without responders, etcd %d leader changes, sequencer %s, %d stale decisions routed again",
		len(s.reqs), failed, s.bus.Published, s.bus.Delivered, s.bus.Lost, s.bus.Duplicated, s.bus.NoResponders, s.etcd.LeaderChanges, s.seq.Stats(), s.reroutes)
	return nil
}

// lastEventID is the id of a batch's last event (0: a heartbeat), for the
// trace's detail.
func lastEventID(b *triplanev1.KvEventBatch) uint64 {
	if n := len(b.Events); n > 0 {
		return b.Events[n-1].GetEventId()
	}
	return 0
}

// resendKind says what a resend reply held, for the trace's detail.
func resendKind(r *triplanev1.KvResendReply) string {
	switch k := r.GetReply().(type) {
	case *triplanev1.KvResendReply_Range:
		return fmt.Sprintf("%d events", len(k.Range.GetEvents()))
	case *triplanev1.KvResendReply_Dump:
		return fmt.Sprintf("a dump page of %d blocks", len(k.Dump.GetBlocks()))
	case nil:
		return "no reply"
	}
	return fmt.Sprintf("%T", r.GetReply())
}
