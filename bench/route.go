package bench

import (
	"cmp"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/workload"
)

// RouteConfig sizes `triplane bench route`: a request trace replayed in
// virtual time through the router and one mock engine per worker.
type RouteConfig struct {
	// Records is the trace, in arrival order (sorted stably by timestamp if
	// not).
	Records []workload.Record
	// Workers engines of BlocksPerWorker KV blocks of BlockSize tokens each
	// (default 512, the trace's block).
	Workers, BlocksPerWorker, BlockSize int
	// Policies are replayed each on fresh engines and a fresh index.
	Policies []router.Policy
	// Params tune the kv policy.
	Params router.Params
	// SpeedUp divides every modelled engine duration (default 1).
	SpeedUp float64
	// MaxBatchTokens is the engines' token budget per iteration (default the
	// mock engine's, 8192).
	MaxBatchTokens int
	// Seed makes the draws of the random policy and of the kv policy's
	// temperature reproducible.
	Seed uint64
	// LoadInterval, when above 0, routes with what a frontend knows
	// instead of the engines' exact load: each engine's load as of its
	// last report (one every LoadInterval of virtual time, the worker's
	// default being 500 ms), corrected by the router's own requests in
	// flight (router.Flights), as the frontend does. 0 routes with the
	// exact load at each arrival.
	LoadInterval time.Duration
}

// RouteResult is one policy's replay.
type RouteResult struct {
	Policy router.Policy
	// Requests admitted by an engine; Rejected ones were refused by Add
	// (queue full, or larger than a worker's pool).
	Requests, Rejected int
	// PromptBlocks is the prompts' blocks (ceil(input/BlockSize) each).
	// HitBlocks is what the engines reported as cached at admission
	// (CachedTokens of each request's first output / BlockSize);
	// RouterBlocks is what the router's index predicted (the decision's
	// overlap).
	PromptBlocks, HitBlocks, RouterBlocks int
	// CeilingBlocks is the hits of one infinite cache: a prompt block hits
	// if an earlier request had the same prefix of hash ids. The same for
	// every policy.
	CeilingBlocks int
	// PrefillTokens is, per worker, the prompt tokens actually prefilled
	// (not cached; recomputation after a preemption included).
	PrefillTokens []int
	// TTFT is the time from arrival to the first token, p50 and p99.
	TTFTp50, TTFTp99 time.Duration
	// Simulated is the virtual time until the last request finished; Wall
	// the real time spent replaying this policy (policies replay side by
	// side, so the walls overlap and do not include making the prompts);
	// Steps the engine iterations.
	Simulated, Wall time.Duration
	Steps           int
}

// HitRatio is the share of prompt blocks the engines found cached.
func (r RouteResult) HitRatio() float64 { return ratio(r.HitBlocks, r.PromptBlocks) }

// RouterRatio is the share the router's index predicted.
func (r RouteResult) RouterRatio() float64 { return ratio(r.RouterBlocks, r.PromptBlocks) }

// Ceiling is the hit ratio of one infinite cache.
func (r RouteResult) Ceiling() float64 { return ratio(r.CeilingBlocks, r.PromptBlocks) }

// Balance is the busiest worker's prefill tokens over the mean (1 is even).
func (r RouteResult) Balance() float64 {
	var sum, most int
	for _, t := range r.PrefillTokens {
		sum += t
		most = max(most, t)
	}
	if sum == 0 {
		return 1
	}
	return float64(most) * float64(len(r.PrefillTokens)) / float64(sum)
}

func ratio(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// Route replays the trace once per policy and returns one result each.
// The policies replay side by side, in lockstep over the arrivals: each
// prompt's tokens and block hashes are made once and handed to every
// policy's engines, and up to GOMAXPROCS policies advance at once. Each
// replay is deterministic and independent of the others.
func Route(ctx context.Context, cfg RouteConfig, progress io.Writer) ([]RouteResult, error) {
	if cfg.BlockSize == 0 {
		cfg.BlockSize = workload.TraceBlockSize
	}
	if cfg.SpeedUp == 0 {
		cfg.SpeedUp = 1
	}
	if progress == nil {
		progress = io.Discard
	}
	switch {
	case len(cfg.Records) == 0:
		return nil, errors.New("bench route: empty trace")
	case cfg.Workers < 1 || cfg.BlocksPerWorker < 1 || cfg.BlockSize < 1:
		return nil, fmt.Errorf("bench route: %d workers of %d blocks of %d tokens: all must be positive", cfg.Workers, cfg.BlocksPerWorker, cfg.BlockSize)
	case len(cfg.Policies) == 0:
		return nil, errors.New("bench route: no policy")
	case cfg.LoadInterval < 0:
		return nil, fmt.Errorf("bench route: load interval %s is negative", cfg.LoadInterval)
	}
	for _, p := range cfg.Policies {
		if _, err := router.ParsePolicy(string(p)); err != nil {
			return nil, err
		}
	}
	for i := range cfg.Records {
		if err := cfg.Records[i].Validate(); err != nil {
			return nil, fmt.Errorf("bench route: record %d: %w", i, err)
		}
	}
	recs := cfg.Records
	if !slices.IsSortedFunc(recs, byTimestamp) {
		recs = slices.Clone(recs)
		slices.SortStableFunc(recs, byTimestamp)
	}
	promptBlocks := 0
	for i := range recs {
		promptBlocks += (recs[i].InputLength + cfg.BlockSize - 1) / cfg.BlockSize
	}
	ceiling := ceilingBlocks(recs, cfg.BlockSize)
	sims := make([]*sim, len(cfg.Policies))
	for i, p := range cfg.Policies {
		s, err := newSim(cfg, p)
		if err != nil {
			return nil, fmt.Errorf("bench route: %w", err)
		}
		s.res.PromptBlocks, s.res.CeilingBlocks = promptBlocks, ceiling
		sims[i] = s
	}
	fmt.Fprintf(progress, "  replaying %d requests on %d workers for %d policies...\n", len(recs), cfg.Workers, len(sims))

	// The prompts are made one step ahead of the replays, on their own
	// goroutine.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type prompt struct {
		tokens []uint32
		hashes []uint64 // the engines' chained hashes of the full blocks
	}
	prompts := make(chan prompt, 8)
	go func() {
		defer close(prompts)
		for i := range recs {
			toks := recs[i].Tokens(vocab)
			select {
			case prompts <- prompt{toks, mocker.BlockHashes(toks, cfg.BlockSize)}:
			case <-ctx.Done():
				return
			}
		}
	}()
	sem := make(chan struct{}, max(runtime.GOMAXPROCS(0), 1))
	each := func(f func(s *sim) error) error {
		var wg sync.WaitGroup
		errs := make([]error, len(sims))
		for k, s := range sims {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				t := time.Now()
				errs[k] = f(s)
				s.res.Wall += time.Since(t)
			}()
		}
		wg.Wait()
		for k, err := range errs {
			if err != nil {
				return fmt.Errorf("bench route (%s): %w", sims[k].policy, err)
			}
		}
		return nil
	}
	for i := range recs {
		p, ok := <-prompts
		if err := context.Cause(ctx); err != nil {
			return nil, err
		}
		if !ok {
			return nil, errors.New("bench route: the prompts ended early")
		}
		at := time.Duration(recs[i].Timestamp) * time.Millisecond
		if err := each(func(s *sim) error { return s.arrive(at, i, &recs[i], p.tokens, p.hashes) }); err != nil {
			return nil, err
		}
	}
	if err := each(func(s *sim) error { return s.advance(-1) }); err != nil {
		return nil, err
	}
	out := make([]RouteResult, len(sims))
	for i, s := range sims {
		out[i] = s.result()
	}
	return out, nil
}

func byTimestamp(a, b workload.Record) int { return cmp.Compare(a.Timestamp, b.Timestamp) }

const vocab = 32000 // the mock engine's default vocabulary

// ceilingBlocks counts the prompt blocks one infinite cache would hold at
// each arrival: block i hits when an earlier request had the same first
// i+1 hash ids. With a block size other than the trace's, a block hits
// when the trace block holding its last token does.
func ceilingBlocks(recs []workload.Record, blockSize int) int {
	type node struct {
		parent int
		id     int64
	}
	seen := map[node]int{} // (parent prefix, hash id) -> prefix number
	hits := 0
	for _, r := range recs {
		parent := 0
		hit := make([]bool, len(r.HashIDs))
		for i, id := range r.HashIDs {
			k := node{parent, id}
			n, ok := seen[k]
			if !ok {
				n = len(seen) + 1
				seen[k] = n
			}
			hit[i], parent = ok, n
		}
		for b := range (r.InputLength + blockSize - 1) / blockSize {
			last := min((b+1)*blockSize, r.InputLength) - 1
			if hit[last/workload.TraceBlockSize] {
				hits++
			}
		}
	}
	return hits
}

// An event is a worker's iteration ending (its KV events and outputs
// become visible, and the next one starts).
type event struct {
	at     time.Duration
	worker int
}

type eventQueue []event

func (q eventQueue) Len() int { return len(q) }
func (q eventQueue) Less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].worker < q[j].worker
}
func (q eventQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *eventQueue) Push(x any)   { *q = append(*q, x.(event)) }
func (q *eventQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

type worker struct {
	id        string
	eng       *mocker.Engine
	busy      bool        // an iteration is in progress (an event is queued)
	pending   engine.Step // the iteration in progress, visible when it ends
	prefilled int
	zeroSteps int
}

type inflight struct {
	arrival time.Duration
	started bool
}

// sim is one policy's replay in virtual time: arrivals at the trace's
// timestamps, each engine iterating back to back while it has work, each
// iteration lasting what its Step says. A Step's outputs and KV events are
// applied when the iteration ends; the router sees the index and the
// engines' loads as they are at each arrival.
type sim struct {
	cfg    RouteConfig
	policy router.Policy
	ws     []*worker
	byID   map[string]int
	ix     *router.Index
	rng    *rand.Rand
	live   map[string]*inflight
	ttfts  []time.Duration
	q      eventQueue
	now    time.Duration
	cands  []router.Candidate
	res    RouteResult
	// With LoadInterval: the last reports, when the next is due, and the
	// router's flights.
	reports    []router.Report
	nextReport time.Duration
	flights    *router.Flights
}

// epoch turns the replay's virtual durations into the times Flights and
// reports carry.
var epoch = time.Unix(0, 0)

// reportUntil takes the load reports due up to t: each engine's load as it
// is now, which is its load at the report's time when nothing happened in
// between.
func (s *sim) reportUntil(t time.Duration) {
	if s.cfg.LoadInterval <= 0 {
		return
	}
	if s.nextReport > t {
		return
	}
	// Of the reports due, only the last counts: nothing changed between
	// them. Jumping to it keeps a tiny interval from costing a pass per
	// tick.
	last := s.nextReport + (t-s.nextReport)/s.cfg.LoadInterval*s.cfg.LoadInterval
	for k, w := range s.ws {
		l := w.eng.Load()
		s.reports[k] = router.Report{BlocksUsed: l.BlocksUsed, BlocksTotal: l.BlocksTotal, Waiting: l.Waiting, SentAt: epoch.Add(last)}
	}
	s.nextReport = last + s.cfg.LoadInterval
}

// newSim makes fresh engines and a fresh index. The engines' blocks carry
// 64 bytes instead of the default 2048: the contents play no part in
// routing and the smaller pools keep many engines light.
func newSim(cfg RouteConfig, policy router.Policy) (*sim, error) {
	s := &sim{cfg: cfg, policy: policy, ws: make([]*worker, cfg.Workers), byID: map[string]int{},
		ix:   router.NewIndex(cfg.Workers * cfg.BlocksPerWorker),
		rng:  rand.New(rand.NewPCG(cfg.Seed, 0x7269706c616e65)),
		live: map[string]*inflight{}, cands: make([]router.Candidate, cfg.Workers),
		res:     RouteResult{Policy: policy, PrefillTokens: make([]int, cfg.Workers)},
		reports: make([]router.Report, cfg.Workers), flights: router.NewFlights()}
	width := len(fmt.Sprint(cfg.Workers - 1))
	for i := range s.ws {
		e, err := mocker.New(mocker.Config{BlockSize: cfg.BlockSize, NumBlocks: cfg.BlocksPerWorker, BlockBytes: 64,
			MaxBatchTokens: cfg.MaxBatchTokens, SpeedUp: cfg.SpeedUp})
		if err != nil {
			return nil, err
		}
		// Zero-padded ids, so the router's order by id is the workers' order.
		s.ws[i] = &worker{id: fmt.Sprintf("w%0*d", width, i), eng: e}
		s.byID[s.ws[i].id] = i
	}
	return s, nil
}

// advance ends every iteration that ends by until (all of them if until
// is negative). Iterations ending at the instant of an arrival end first,
// so the router sees their KV events.
func (s *sim) advance(until time.Duration) error {
	for s.q.Len() > 0 && (until < 0 || s.q[0].at <= until) {
		// Reports due before this iteration ends see the engines as they
		// were then.
		s.reportUntil(s.q[0].at - 1)
		ev := heap.Pop(&s.q).(event)
		s.now = ev.at
		if err := s.iterate(ev.worker); err != nil {
			return err
		}
	}
	if until >= 0 {
		s.reportUntil(until)
	}
	return nil
}

// iterate ends worker k's iteration at now and starts the next one.
func (s *sim) iterate(k int) error {
	w := s.ws[k]
	for _, ev := range w.pending.Events {
		if gap := s.ix.Apply(w.id, ev); gap != nil {
			return fmt.Errorf("KV events of %s out of order: %v", w.id, gap)
		}
	}
	for _, o := range w.pending.Outputs {
		f := s.live[o.ID]
		if f == nil {
			continue
		}
		if !f.started && len(o.Tokens) > 0 {
			f.started = true
			if s.cfg.LoadInterval > 0 {
				s.flights.Started(w.id, o.ID)
			}
			s.res.HitBlocks += o.CachedTokens / s.cfg.BlockSize
			s.ttfts = append(s.ttfts, s.now-f.arrival)
		}
		if o.Finished {
			delete(s.live, o.ID)
			if s.cfg.LoadInterval > 0 {
				s.flights.Done(w.id, o.ID)
			}
		}
	}
	w.pending = engine.Step{}
	if w.eng.Idle() {
		w.busy = false
		return nil
	}
	st := w.eng.Step()
	s.res.Steps++
	w.pending = st
	w.prefilled += st.PrefillTokens
	if st.Duration <= 0 {
		// An iteration that did nothing yet left work: let a nanosecond
		// pass, but not forever.
		if w.zeroSteps++; w.zeroSteps > 1000 {
			return fmt.Errorf("engine %s makes no progress at %v", w.id, s.now)
		}
		st.Duration = 1
	} else {
		w.zeroSteps = 0
	}
	w.busy = true
	heap.Push(&s.q, event{at: s.now + st.Duration, worker: k})
	return nil
}

// arrive routes request i arriving at at and hands it to the chosen engine.
func (s *sim) arrive(at time.Duration, i int, rec *workload.Record, tokens []uint32, hashes []uint64) error {
	if err := s.advance(at); err != nil {
		return err
	}
	s.now = at
	for k, w := range s.ws {
		if s.cfg.LoadInterval > 0 {
			// advance took the report due at 0 or since.
			s.cands[k] = s.flights.Candidate(w.id, &s.reports[k])
			continue
		}
		l := w.eng.Load()
		s.cands[k] = router.Candidate{ID: w.id, Active: l.Active + l.Waiting, Waiting: l.Waiting, BlocksUsed: l.BlocksUsed, BlocksTotal: l.BlocksTotal}
	}
	d, err := router.Choose(s.policy, s.cfg.Params, router.RequestOf(hashes), s.ix.WithOverlap(hashes, s.cands), uint64(i), s.rng.Float64())
	if err != nil {
		return err
	}
	k := s.byID[d.Worker]
	w := s.ws[k]
	id := fmt.Sprintf("r%d", i)
	// Add copies the tokens, so every policy's engines share one prompt.
	if err := w.eng.Add(engine.Request{ID: id, Tokens: tokens, MaxTokens: rec.OutputLength}); err != nil {
		if errors.Is(err, engine.ErrQueueFull) || errors.Is(err, engine.ErrBadRequest) {
			s.res.Rejected++
			return nil
		}
		return err
	}
	s.res.Requests++
	s.res.RouterBlocks += d.Overlap
	s.live[id] = &inflight{arrival: at}
	if s.cfg.LoadInterval > 0 {
		s.flights.Add(w.id, id, epoch.Add(at), len(hashes)-d.Overlap)
	}
	if !w.busy {
		return s.iterate(k) // an idle engine starts an iteration now
	}
	return nil
}

func (s *sim) result() RouteResult {
	r := s.res
	for k, w := range s.ws {
		r.PrefillTokens[k] = w.prefilled
	}
	slices.Sort(s.ttfts)
	r.TTFTp50, r.TTFTp99 = percentile(s.ttfts, 0.50), percentile(s.ttfts, 0.99)
	r.Simulated = s.now
	return r
}

// percentile is the nearest-rank percentile p (0..1) of sorted: the
// smallest value at least a share p of the values do not exceed. Both
// benchmarks of this package report with it.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(max(int(math.Ceil(p*float64(len(sorted))))-1, 0), len(sorted)-1)]
}

// PrintRoute writes the results as a table. Ratios against round-robin are
// left blank when round-robin was not replayed.
func PrintRoute(w io.Writer, title string, rs []RouteResult) {
	fmt.Fprintf(w, "%s\n", title)
	var rr *RouteResult
	for i := range rs {
		if rs[i].Policy == router.PolicyRoundRobin {
			rr = &rs[i]
		}
	}
	fmt.Fprintf(w, "  %-13s %9s %9s %9s %9s %9s %9s %9s %9s %10s %8s\n", "policy", "hit", "router", "vs rr", "vs ceil",
		"busiest", "TTFT p50", "TTFT p99", "rejected", "simulated", "wall")
	for _, r := range rs {
		vsRR := "-"
		if rr != nil && rr.HitRatio() > 0 {
			vsRR = fmt.Sprintf("%.2fx", r.HitRatio()/rr.HitRatio())
		}
		vsCeil := "-"
		if r.Ceiling() > 0 {
			vsCeil = fmt.Sprintf("%.2fx", r.HitRatio()/r.Ceiling())
		}
		fmt.Fprintf(w, "  %-13s %9.3f %9.3f %9s %9s %8.2fx %9s %9s %9d %9.0fs %7.2fs\n", r.Policy, r.HitRatio(), r.RouterRatio(), vsRR, vsCeil,
			r.Balance(), roundDur(r.TTFTp50), roundDur(r.TTFTp99), r.Rejected, r.Simulated.Seconds(), r.Wall.Seconds())
	}
	if len(rs) > 0 {
		r := rs[0]
		fmt.Fprintf(w, "  ceiling (one infinite cache): %.3f of %d prompt blocks\n", r.Ceiling(), r.PromptBlocks)
		fmt.Fprintf(w, "  hit: prompt blocks the chosen engine reported cached at admission (its CachedTokens / block size);\n"+
			"  router: the index's predicted overlap for the same decisions; busiest: the busiest worker's prefilled tokens / the mean;\n"+
			"  TTFT: arrival to first token in virtual time; wall: real time spent replaying the policy (policies replay side by side)\n")
		var parts []string
		for _, r := range rs {
			parts = append(parts, fmt.Sprintf("%s %d steps", r.Policy, r.Steps))
		}
		fmt.Fprintf(w, "  engine iterations: %s\n", strings.Join(parts, ", "))
	}
}

func roundDur(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond).String()
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	default:
		return d.Round(time.Millisecond).String()
	}
}
