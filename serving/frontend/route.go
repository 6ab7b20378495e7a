package frontend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving/worker"
)

// ErrNoWorker means no worker can take the request now.
var ErrNoWorker = errors.New("frontend: no worker available")

// Router is the frontend's routing shell: it observes the workers (KV index
// fed by their KV events with gap repair, load reports, discovery) and asks
// the router actor to decide, which journals each decision with its
// reasons.
type Router struct {
	cfg   RouterConfig
	log   *slog.Logger
	disc  *control.Discovery
	cons  *kvevents.Consumer
	loads *event.LoadAggregator

	mu      sync.Mutex
	ix      *router.Index
	flights *router.Flights // per worker, requests routed and not finished
	// kept, once the router stopped, are workers it routes to even when
	// discovery no longer lists them.
	kept  atomic.Pointer[[]*triplanev1.InstanceInfo]
	unsub func()
	stop  chan struct{}
	done  chan struct{}
	// saverDone is closed when the saver stopped (nil without a store).
	saverDone chan struct{}
	closeOnce sync.Once
}

// RouterConfig configures a Router.
type RouterConfig struct {
	Namespace string
	Model     string
	Policy    router.Policy
	Params    router.Params
	// MaxIndexBlocks bounds the KV index; default 1,000,000.
	MaxIndexBlocks int
	Bus            *event.Bus
	Discovery      *control.Discovery
	// Host runs the router actor RouterID.
	Host     *actors.Host
	RouterID string
	// Store, when set, keeps the KV view across restarts: saved every
	// SaveEvery (default 30 s) and on Close, restored on start, so a
	// restarted router resumes from each worker's saved event id instead
	// of asking every worker for a full dump.
	Store     StateStore
	SaveEvery time.Duration
	Logger    *slog.Logger
	// Registerer receives the index's size and pruning counters.
	Registerer prometheus.Registerer
}

// StateStore keeps named protobuf state (journal.Snapshots does, in Pebble).
type StateStore interface {
	SaveState(name string, msg proto.Message) error
	LoadState(name string, msg proto.Message) error
}

// NewRouter starts following the workers.
func NewRouter(cfg RouterConfig) (_ *Router, err error) {
	if cfg.Policy == "" {
		cfg.Policy = router.PolicyKV
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Host == nil || cfg.Bus == nil || cfg.Discovery == nil {
		return nil, errors.New("frontend: the router needs an actor host, an event bus and discovery")
	}
	r := &Router{cfg: cfg, log: cfg.Logger, disc: cfg.Discovery, ix: router.NewIndex(cfg.MaxIndexBlocks),
		flights: router.NewFlights(), stop: make(chan struct{}), done: make(chan struct{})}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	ccfg := kvevents.ConsumerConfig{Namespace: cfg.Namespace, OnEvent: r.onEvent, OnReset: r.onReset, Follows: r.follows}
	if cfg.Store != nil {
		view := &triplanev1.KvView{}
		switch err := cfg.Store.LoadState(r.viewName(), view); {
		case err == nil:
			ccfg.Initial = view
			r.log.Info("KV index restored", "workers", len(view.Workers),
				"saved", time.Unix(0, view.SavedUnixNanos).UTC().Format(time.RFC3339))
		case errors.Is(err, journal.ErrNoState):
		default:
			r.log.Warn("saved KV index unusable; rebuilding it from the workers", "err", err)
		}
	}
	r.cons, err = kvevents.NewConsumer(cfg.Bus, ccfg)
	if err != nil {
		return nil, fmt.Errorf("frontend: kv events: %w", err)
	}
	subj, err := cfg.Bus.LoadSubject(cfg.Namespace, worker.Component)
	if err != nil {
		return nil, err
	}
	if r.loads, err = event.NewLoadAggregator(cfg.Bus, subj, event.AggregatorConfig{}); err != nil {
		return nil, fmt.Errorf("frontend: load reports: %w", err)
	}
	if cfg.Registerer != nil {
		// A second router on the same registry (tests, two frontends in a
		// process) keeps the first one's series: logged, not fatal.
		for _, c := range []prometheus.Collector{
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "triplane_router_index_entries",
				Help: "(block, worker) entries in the router's KV index."}, func() float64 { return float64(r.IndexLen()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_index_pruned_total",
				Help: "Index entries dropped to stay within its cap (least recently stored first)."}, func() float64 {
				r.mu.Lock()
				defer r.mu.Unlock()
				return float64(r.ix.Pruned)
			}),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_events_applied_total",
				Help: "KV events applied to the router's view, in order."}, func() float64 { return float64(r.cons.Stats().Applied) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_gaps_total",
				Help: "Gaps in workers' KV event ids the router noticed (repaired by resend or dump)."}, func() float64 { return float64(r.cons.Stats().Gaps) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_dumps_total",
				Help: "Full dumps of a worker's blocks the router applied: one-reply dumps and paged dumps completed."}, func() float64 { return float64(r.cons.Stats().Dumps) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_dump_pages_total",
				Help: "Pages of paged dumps the router took (a large worker's dump comes in several)."}, func() float64 { return float64(r.cons.Stats().DumpPages) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_dump_restarts_total",
				Help: "Paged dumps started over: the worker restarted, lost its dump or answered with another."}, func() float64 { return float64(r.cons.Stats().DumpRestarts) }),
			// Not a reason of _kv_dropped_total: a stale page is a resend
			// reply (counted in _repair_failures_total too), not a batch or
			// an event.
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_dump_stale_pages_total",
				Help: "Dump pages refused: not the page asked for, or not adding up with the pages before them."}, func() float64 { return float64(r.cons.Stats().StalePages) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_repair_failures_total",
				Help: "Resend requests of a gap repair that failed or filled nothing."}, func() float64 { return float64(r.cons.Stats().RepairFailures) }),
			kvDropped(r.cons, "malformed", "an invalid batch", func(s kvevents.Stats) uint64 { return s.Malformed }),
			kvDropped(r.cons, "stale_epoch", "a batch of a worker's earlier run", func(s kvevents.Stats) uint64 { return s.StaleEpoch }),
			kvDropped(r.cons, "pending_full", "an early event with no room to wait for its gap (fetched again)", func(s kvevents.Stats) uint64 { return s.DroppedPending }),
			kvDropped(r.cons, "too_many_workers", "a batch of a worker past MaxWorkers", func(s kvevents.Stats) uint64 { return s.DroppedWorkers }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_load_reports_evicted_total",
				Help: "Workers whose last load report the router forgot: silent past its TTL, or no room."}, func() float64 { return float64(r.loads.Evicted()) }),
			kvDropped(r.cons, "too_many_blocks", "block hashes of a worker past MaxBlocksPerWorker", func(s kvevents.Stats) uint64 { return s.DroppedBlocks }),
			kvDropped(r.cons, "unlisted", "a batch of a worker discovery does not list", func(s kvevents.Stats) uint64 { return s.Unfollowed }),
		} {
			if err := cfg.Registerer.Register(c); err != nil {
				r.log.Warn("router metric not registered", "err", err)
			}
		}
	}
	events, unsub := r.disc.Subscribe()
	r.unsub = unsub
	go r.follow(events)
	if ccfg.Initial != nil {
		r.forgetUnlisted()
	}
	if cfg.Store != nil {
		if cfg.SaveEvery <= 0 {
			cfg.SaveEvery = 30 * time.Second
		}
		r.saverDone = make(chan struct{})
		go r.saver(cfg.SaveEvery)
	}
	return r, nil
}

// follows is the consumer's Follows: the workers discovery lists, so that
// a worker that left (and heartbeats while it drains) does not come back
// into the view after follow forgot it. Discovery removes an instance
// before it reports the removal, so no batch after Forget starts a view.
// It runs only for batches of workers without a view.
func (r *Router) follows(worker string) bool { return r.disc.Has(worker) }

// kvDropped is one reason of triplane_router_kv_dropped_total.
func kvDropped(c *kvevents.Consumer, reason, what string, n func(kvevents.Stats) uint64) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "triplane_router_kv_dropped_total",
		Help:        "KV event batches or events the router dropped, by reason.",
		ConstLabels: prometheus.Labels{"reason": reason}}, func() float64 { return float64(n(c.Stats())) })
}

// forgetUnlisted drops the workers discovery does not list: restored ones
// that left while the router was down, and (swept now and then) ones whose
// removal event a full subscription buffer dropped.
func (r *Router) forgetUnlisted() {
	for _, w := range r.cons.Workers() {
		if !r.disc.Has(w) {
			r.cons.Forget(w)
			r.mu.Lock()
			r.ix.RemoveWorker(w)
			r.mu.Unlock()
			r.log.Info("worker not listed by discovery; its blocks dropped", "worker", w)
		}
	}
}

// unlistedSweep is how often follow looks for workers discovery no
// longer lists though no removal event said so.
const unlistedSweep = 30 * time.Second

func (r *Router) viewName() string { return "kvview-" + r.cfg.RouterID }

func (r *Router) saver(every time.Duration) {
	defer close(r.saverDone)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
			r.save()
		}
	}
}

// save writes the consumer's view: it is ordered and complete up to each
// worker's last applied id, which the index follows.
func (r *Router) save() {
	view := r.cons.View()
	view.SavedUnixNanos = time.Now().UnixNano()
	if err := r.cfg.Store.SaveState(r.viewName(), view); err != nil {
		r.log.Warn("saving the KV index failed", "err", err)
	}
}

// follow drops a worker's blocks once discovery removed it, so no request
// is steered to a dead worker by its stale prefix.
func (r *Router) follow(events <-chan control.Event[*triplanev1.InstanceInfo]) {
	defer close(r.done)
	sweep := time.NewTicker(unlistedSweep)
	defer sweep.Stop()
	for {
		var ev control.Event[*triplanev1.InstanceInfo]
		var ok bool
		select {
		case <-r.stop:
			return
		case <-sweep.C:
			// A subscriber that fell behind lost events (counted in
			// triplane_control_events_dropped_total): a removal among
			// them would leave the worker's blocks in the index.
			r.forgetUnlisted()
			continue
		case ev, ok = <-events:
			if !ok {
				return
			}
		}
		if ev.Type != control.Removed || ev.Value == nil {
			continue
		}
		id := ev.Value.GetInstanceId()
		r.cons.Forget(id)
		r.mu.Lock()
		r.ix.RemoveWorker(id)
		r.mu.Unlock()
		r.log.Info("worker left; its blocks dropped from the index", "worker", id)
	}
}

func (r *Router) onEvent(w string, e *triplanev1.KvEvent) {
	r.mu.Lock()
	r.ix.ApplyKvEvent(w, e)
	r.mu.Unlock()
}

func (r *Router) onReset(w string, blocks map[uint64]kvevents.Block, last uint64) {
	hashes := make([]uint64, 0, len(blocks))
	for h := range blocks {
		hashes = append(hashes, h)
	}
	r.mu.Lock()
	r.ix.Reset(w, hashes, last)
	r.mu.Unlock()
}

// Pool selects the workers a request may go to.
type Pool struct {
	// Prefill selects prefill workers; otherwise workers that decode
	// (role decode or both).
	Prefill bool
	// MaxWaiting, when above 0, skips workers reporting that many waiting
	// requests or more (a full prefill queue).
	MaxWaiting int
}

func (p Pool) admits(in *triplanev1.InstanceInfo, l *triplanev1.LoadReport) bool {
	role := in.GetMetadata()["role"]
	if p.Prefill != (role == worker.RolePrefill) {
		return false
	}
	return p.MaxWaiting <= 0 || l == nil || int(l.WaitingRequests) < p.MaxWaiting
}

// Route chooses a worker of the pool for a request, skipping the excluded
// ones. The caller must call the returned done func when the request ends.
func (r *Router) Route(ctx context.Context, requestID string, hashes []uint64, exclude map[string]bool, pool Pool) (*triplanev1.InstanceInfo, int, func(), error) {
	// A decision can wait (the router actor recovering, a slow journal);
	// a worker that discovery dropped meanwhile is not used: decide again
	// without it. The simulator's serving scenario found this
	// (--bug stale-route).
	for try := 0; ; try++ {
		id := requestID
		if try > 0 {
			id = fmt.Sprintf("%s.r%d", requestID, try)
		}
		in, overlap, release, err := r.route(ctx, id, hashes, exclude, pool)
		if err != nil || try == 2 || r.available(in.GetInstanceId()) {
			return in, overlap, release, err
		}
		release()
		exclude = maps.Clone(exclude)
		if exclude == nil {
			exclude = map[string]bool{}
		}
		exclude[in.GetInstanceId()] = true
		r.log.Info("the chosen worker left while the decision was made; routing again", "request", requestID, "worker", in.GetInstanceId())
	}
}

func (r *Router) available(id string) bool {
	has := func(in *triplanev1.InstanceInfo) bool { return in.GetInstanceId() == id }
	if slices.ContainsFunc(r.disc.Available(), has) {
		return true
	}
	kept := r.kept.Load()
	return kept != nil && slices.ContainsFunc(*kept, has)
}

func (r *Router) route(ctx context.Context, requestID string, hashes []uint64, exclude map[string]bool, pool Pool) (*triplanev1.InstanceInfo, int, func(), error) {
	avail := r.workers()
	byID := make(map[string]*triplanev1.InstanceInfo, len(avail))
	loads := r.loads.Latest()
	now := time.Now()
	r.mu.Lock()
	var cands []router.Candidate
	for _, in := range avail {
		id := in.GetInstanceId()
		if exclude[id] || streamAddr(in) == "" {
			continue
		}
		if m := in.GetMetadata()["model"]; r.cfg.Model != "" && m != "" && m != r.cfg.Model {
			continue
		}
		if !pool.admits(in, loads[id]) {
			continue
		}
		byID[id] = in
		cands = append(cands, r.flights.Candidate(id, router.ReportOf(loads[id])))
	}
	r.ix.SetOverlap(hashes, cands)
	r.mu.Unlock()
	if len(cands) == 0 {
		return nil, 0, nil, ErrNoWorker
	}
	req := routerm.Command(requestID, r.cfg.Policy, r.cfg.Params, hashes, cands)
	reply, err := r.cfg.Host.Request(ctx, actors.Address{Kind: routerm.Kind, ID: r.cfg.RouterID}, req)
	if err != nil {
		if errors.Is(err, router.ErrNoWorkers) {
			return nil, 0, nil, ErrNoWorker
		}
		return nil, 0, nil, fmt.Errorf("frontend: router: %w", err)
	}
	rr, ok := reply.(*triplanev1.RouteReply)
	if !ok || byID[rr.GetWorker()] == nil {
		return nil, 0, nil, fmt.Errorf("frontend: router replied %v, not one of the candidates", reply)
	}
	w := rr.GetWorker()
	r.mu.Lock()
	r.flights.Add(w, requestID, now, len(hashes)-int(rr.Overlap))
	r.mu.Unlock()
	release := func() {
		r.mu.Lock()
		r.flights.Done(w, requestID)
		r.mu.Unlock()
	}
	return byID[w], int(rr.Overlap), release, nil
}

// Started marks a routed request as past its prefill (its first token
// arrived), so it no longer counts as prefill queued on its worker.
func (r *Router) Started(worker, requestID string) {
	r.mu.Lock()
	r.flights.Started(worker, requestID)
	r.mu.Unlock()
}

// ReportDown tells discovery a worker failed, so it is skipped for a
// grace period.
func (r *Router) ReportDown(in *triplanev1.InstanceInfo) { r.disc.ReportDown(in) }

// IndexLen is the number of (block, worker) entries in the KV index.
func (r *Router) IndexLen() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ix.Len()
}

// IndexBlocks is the index's view of one worker's blocks (tests compare it
// with the worker's real blocks).
func (r *Router) IndexBlocks(worker string) map[uint64]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ix.Blocks(worker)
}

// workers are the workers to route among: discovery's available ones,
// and once the router stopped keeping some (a node shutting down: its own
// workers, deregistered but still serving the frontend's last requests),
// those as they were then.
func (r *Router) workers() []*triplanev1.InstanceInfo {
	avail := r.disc.Available()
	kept := r.kept.Load()
	if kept == nil {
		return avail
	}
	for _, in := range *kept {
		if !slices.ContainsFunc(avail, func(a *triplanev1.InstanceInfo) bool { return a.GetInstanceId() == in.GetInstanceId() }) {
			avail = append(avail, in)
		}
	}
	return avail
}

// Close stops following the workers and saves the view. Safe to call
// more than once.
func (r *Router) Close() { r.CloseKeeping(nil) }

// CloseKeeping is Close that goes on routing to the workers named in keep
// after discovery no longer lists them (a node's own, which deregister
// first and serve the frontend's last requests).
func (r *Router) CloseKeeping(keep map[string]bool) {
	r.closeOnce.Do(func() {
		var kept []*triplanev1.InstanceInfo
		for _, in := range r.disc.Available() {
			if keep[in.GetInstanceId()] {
				kept = append(kept, in)
			}
		}
		r.kept.Store(&kept)
		r.close()
	})
}

func (r *Router) close() {
	if r.unsub != nil {
		close(r.stop)
		<-r.done
		r.unsub()
	}
	if r.saverDone != nil {
		<-r.saverDone
	}
	if r.cons != nil {
		r.cons.Close()
		if r.cfg.Store != nil {
			r.save()
		}
	}
	if r.loads != nil {
		_ = r.loads.Close()
	}
}

func streamAddr(in *triplanev1.InstanceInfo) string {
	for _, e := range in.GetAddresses() {
		if e.GetProtocol() == triplanev1.Protocol_PROTOCOL_RESPONSE_STREAM {
			return e.GetAddress()
		}
	}
	return ""
}
