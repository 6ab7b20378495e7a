// Package worker is the serving worker: the shell around an engine. One
// goroutine owns the engine (the actor's mailbox is a bounded channel): it
// admits requests, steps the engine for as long as each iteration is modelled
// to take, publishes the engine's KV events (with gap repair, package
// kvevents) and its load on the event plane, and hands each request's tokens
// to its response stream on the data plane. The worker registers on the
// control plane so routers find it, and drains on shutdown: deregistered
// first, then the running requests finish.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/transfer"
	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planes/data"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

// Control-plane names of workers.
const (
	Component = "worker"
	Endpoint  = "generate"
)

// Errors a frontend sees in the stream's final frame.
var (
	ErrDraining   = errors.New("worker: draining, not taking requests")
	ErrOverloaded = errors.New("worker: overloaded")
	ErrBadRequest = errors.New("worker: bad request")
	// ErrTooLarge: the request does not fit this worker (its KV pool);
	// another worker may take it.
	ErrTooLarge = errors.New("worker: too large for this worker")
	ErrStopped  = errors.New("worker: stopped")
)

// Config configures a worker.
type Config struct {
	// ID is the worker's instance id (unique in the namespace).
	ID        string
	Namespace string
	Model     string
	Engine    mocker.Config
	// Bus carries KV events and load reports; Registrar, when set,
	// registers the worker on the control plane.
	Bus       *event.Bus
	Registrar *control.Registrar
	// ListenHost is the address the worker's response-stream and block servers
	// listen on (any free port); default 127.0.0.1. Use a routable address,
	// or 0.0.0.0, when frontends or peers run on other machines.
	ListenHost string
	// AdvertiseHost is the address published for those servers (what peers
	// dial); default ListenHost, or this machine's first non-loopback
	// address when ListenHost is 0.0.0.0 or ::.
	AdvertiseHost string
	// Token, when set, is required from frontends opening a stream.
	Token string
	// LoadInterval between load reports; default 500 ms.
	LoadInterval time.Duration
	// MaxTokens bounds one request's generation; default 32768.
	MaxTokens int
	// Mailbox bounds the commands waiting for the engine goroutine;
	// default 4096. A full mailbox refuses with ErrOverloaded. It also
	// bounds the cancels waiting for the engine goroutine (kept apart from
	// the mailbox, so a full mailbox does not lose them).
	Mailbox int
	// Role is RoleBoth (default), RolePrefill, RoleDecode or
	// RoleAggregated. Decode-capable workers (both, decode) receive KV
	// blocks on a data-plane server into a staging region;
	// prefill-capable ones (both, prefill) answer prefill requests and
	// send blocks with transfer sessions run on Host. An aggregated worker
	// does neither: it opens no data-plane server or socket and takes no
	// prefill requests.
	Role string
	Host *actors.Host
	// DataToken authenticates block transfers between workers.
	DataToken string
	// StagingBlocks is the size of the region incoming blocks land in
	// (default a quarter of the engine's blocks, at least 16); an import
	// that does not fit is prefilled locally.
	StagingBlocks int
	// MaxPrefills bounds the prefills a prefill worker runs at once
	// (default 16); requests beyond it are refused at once and the decode
	// worker prefills locally.
	MaxPrefills int
	// TransferMetrics count the transfer sessions this worker runs (shared
	// by a node's workers); nil keeps them private.
	TransferMetrics *transfer.Metrics
	// DataMetrics and StreamMetrics count this worker's block transfers
	// (bytes, refused connections) and response streams; shared by a
	// node's workers, nil keeps them private.
	DataMetrics   *data.Metrics
	StreamMetrics *stream.Metrics
	Logger        *slog.Logger
	// Registerer receives the worker's metrics (labelled with its id)
	// until Close; nil keeps them private. Start fails when a live
	// worker with the same id already registered on it.
	Registerer prometheus.Registerer
}

// Worker is a running worker.
type Worker struct {
	cfg     Config
	log     *slog.Logger
	eng     *mocker.Engine
	srv     *stream.Server
	pub     *kvevents.Publisher
	inbox   chan op
	stop    context.CancelFunc
	done    chan struct{}
	metrics *metrics

	stats   stats
	region  *data.Region
	dataSrv *data.Server
	shmSrv  *data.ShmServer
	shmDir  string
	prefill *event.Subscription
	// prefillCancels takes decode workers' cancels of the prefills runs
	// holds (a worker that prefills).
	prefillCancels *event.Subscription
	runs           prefillRuns
	xfer           *transfer.Metrics
	// dataPeer describes the block receivers and staging region of a
	// worker that takes blocks (nil otherwise); read-only once started.
	dataPeer *triplanev1.DataPeer
	// dialer and sup send a prefill worker's blocks (nil otherwise).
	dialer *data.Dialer
	sup    *transfer.Supervisor

	// Descriptors reserved for incoming blocks and those that landed
	// (verified by the data server), and the free staging slots (FIFO, so
	// a slot given up is reused as late as possible); guarded by mu.
	// expect are the staging blocks reserved for imports; landed counts
	// the verified bytes of each (a transport may land a block in
	// several frames, or several blocks in one).
	expect map[data.Descriptor]bool
	landed map[data.Descriptor]uint64
	slots  []int

	mu       sync.Mutex
	draining bool
	// deregistered: Deregister succeeded (Drain's own is then skipped).
	deregistered atomic.Bool
	reqs         map[string]*pending
	// cancels are the requests whose clients went away, in order, for
	// the engine goroutine to cancel before it handles its next op or
	// steps again; kick wakes it for them. Apart from the mailbox so
	// that a full mailbox cannot drop a cancel (the engine would run the
	// request to its end for nobody); bounded by cfg.Mailbox.
	cancels  []string
	kick     chan struct{}
	lastLoad engine.Load
	idle     chan struct{} // closed when draining and no request is left
}

type op struct {
	add *pending
	res chan error
	fn  func() // runs on the engine goroutine
}

// pending is one request's tokens between the engine goroutine and its
// stream handler: the engine appends and signals, the handler takes.
type pending struct {
	req    engine.Request
	mu     sync.Mutex
	tokens []uint32
	cached int
	first  bool
	done   bool
	reason string
	err    error
	notify chan struct{}
}

func (p *pending) push(o engine.Output) {
	p.mu.Lock()
	p.tokens = append(p.tokens, o.Tokens...)
	if o.CachedTokens > 0 {
		p.cached = o.CachedTokens
	}
	if o.Finished {
		p.done, p.reason, p.err = true, o.Reason, o.Err
	}
	p.mu.Unlock()
	select {
	case p.notify <- struct{}{}:
	default:
	}
}

func (p *pending) fail(err error) {
	p.push(engine.Output{Finished: true, Reason: "error", Err: err})
}

// Start starts a worker: its engine goroutine, stream server, KV event
// publisher, load reports and registration.
func Start(ctx context.Context, cfg Config) (_ *Worker, err error) {
	if err := control.CheckName("worker id", cfg.ID); err != nil {
		return nil, err
	}
	if cfg.Bus == nil {
		return nil, errors.New("worker: an event bus is required")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "default"
	}
	if cfg.ListenHost == "" {
		cfg.ListenHost = "127.0.0.1"
	}
	if cfg.AdvertiseHost, err = advertiseHost(cfg.ListenHost, cfg.AdvertiseHost, net.InterfaceAddrs); err != nil {
		return nil, err
	}
	if cfg.LoadInterval <= 0 {
		cfg.LoadInterval = 500 * time.Millisecond
	}
	if cfg.MaxTokens <= 0 {
		cfg.MaxTokens = 32768
	}
	if cfg.Mailbox <= 0 {
		cfg.Mailbox = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	switch cfg.Role {
	case "":
		cfg.Role = RoleBoth
	case RoleBoth, RolePrefill, RoleDecode, RoleAggregated:
	default:
		return nil, fmt.Errorf("worker %s: role %q is not %s, %s, %s or %s", cfg.ID, cfg.Role, RoleBoth, RolePrefill, RoleDecode, RoleAggregated)
	}
	if (cfg.Role == RolePrefill || cfg.Role == RoleDecode) && cfg.Host == nil {
		return nil, fmt.Errorf("worker %s: a %s worker needs an actor host for transfer sessions", cfg.ID, cfg.Role)
	}
	cfg.Engine.Defaults()
	if err := cfg.Engine.Validate(); err != nil {
		return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
	}
	// Registered first, so a worker whose id is already counted here is
	// refused before it opens anything.
	m := newMetrics(cfg.ID)
	if err := m.register(cfg.Registerer); err != nil {
		return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
	}
	var region *data.Region
	if decodes(cfg.Role) {
		// Peers land transferred blocks in a staging region, never in
		// the engine's own blocks: a transfer that arrives after its
		// reservation was given up can then only spoil a staging slot,
		// which is checked again when a reservation commits from it.
		if cfg.StagingBlocks <= 0 {
			cfg.StagingBlocks = max(16, cfg.Engine.NumBlocks/4)
		}
		// memfd-backed where the OS has it, so a prefill worker on this
		// host can copy straight in (shared memory); else plain memory
		// (TCP only).
		var err error
		if region, err = data.NewSharedRegion(1, cfg.Engine.BlockBytes, cfg.StagingBlocks); err != nil {
			if region, err = data.NewRegion(1, cfg.Engine.BlockBytes, cfg.StagingBlocks); err != nil {
				m.unregister()
				return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
			}
		}
	}
	eng, err := mocker.New(cfg.Engine)
	if err != nil {
		if region != nil {
			region.Close()
		}
		m.unregister()
		return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
	}
	rctx, cancel := context.WithCancel(context.Background())
	w := &Worker{cfg: cfg, log: cfg.Logger.With("worker", cfg.ID), eng: eng, inbox: make(chan op, cfg.Mailbox),
		stop: cancel, done: make(chan struct{}), reqs: map[string]*pending{}, metrics: m, kick: make(chan struct{}, 1),
		region: region, landed: map[data.Descriptor]uint64{}, expect: map[data.Descriptor]bool{}}
	if region != nil {
		for i := range cfg.StagingBlocks {
			w.slots = append(w.slots, i)
		}
	}
	defer func() {
		if err != nil {
			w.Close()
		}
	}()
	w.pub, err = kvevents.NewPublisher(cfg.Bus, kvevents.PublisherConfig{WorkerID: cfg.ID, Namespace: cfg.Namespace,
		Epoch: uint64(time.Now().UnixNano())})
	if err != nil {
		return nil, fmt.Errorf("worker %s: kv events: %w", cfg.ID, err)
	}
	go w.run(rctx)
	w.srv, err = stream.Listen(net.JoinHostPort(cfg.ListenHost, "0"), stream.ServerConfig{Handler: w.serve, Token: cfg.Token, ErrorCode: ErrorCode,
		Logger: w.log, Metrics: cfg.StreamMetrics})
	if err != nil {
		return nil, fmt.Errorf("worker %s: response streams: %w", cfg.ID, err)
	}
	if err := w.startDisagg(); err != nil {
		return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
	}
	loadSubject, err := cfg.Bus.LoadSubject(cfg.Namespace, Component)
	if err != nil {
		return nil, err
	}
	go func() {
		_ = event.ReportLoad(rctx, cfg.Bus, loadSubject, cfg.LoadInterval, w.loadReport)
	}()
	if cfg.Registrar != nil {
		err = cfg.Registrar.Register(ctx, &triplanev1.InstanceInfo{
			Component: Component, Endpoint: Endpoint, InstanceId: cfg.ID,
			Addresses: w.Endpoints(), DataPeer: w.dataPeer,
			Metadata: map[string]string{"model": cfg.Model, "block_size": fmt.Sprint(eng.Config().BlockSize),
				"engine": "mocker", "role": cfg.Role, "host_id": data.HostID()},
		})
		if err != nil {
			return nil, fmt.Errorf("worker %s: %w", cfg.ID, err)
		}
	}
	w.log.Info("worker started", "stream_addr", w.Addr(), "listen", w.srv.Addr(), "model", cfg.Model,
		"blocks", eng.Config().NumBlocks, "block_size", eng.Config().BlockSize)
	return w, nil
}

// Addr is the response-stream server's address.
func (w *Worker) Addr() string { return w.advertised(w.srv.Addr()) }

// ID is the worker's instance id.
func (w *Worker) ID() string { return w.cfg.ID }

// Info is the worker's registration, for callers that route without etcd.
func (w *Worker) Info() *triplanev1.InstanceInfo {
	return &triplanev1.InstanceInfo{Namespace: w.cfg.Namespace, Component: Component, Endpoint: Endpoint, InstanceId: w.cfg.ID,
		Addresses: w.Endpoints(), DataPeer: w.dataPeer, Metadata: map[string]string{"model": w.cfg.Model, "role": w.cfg.Role}}
}

func (w *Worker) loadReport() *triplanev1.LoadReport {
	l := w.load()
	return &triplanev1.LoadReport{InstanceId: w.cfg.ID, Namespace: w.cfg.Namespace, Component: Component,
		ActiveRequests: uint32(l.Active), WaitingRequests: uint32(l.Waiting),
		KvBlocksUsed: uint64(l.BlocksUsed), KvBlocksTotal: uint64(l.BlocksTotal), CacheHitRate: l.HitRate}
}

// Load is the engine's load as of its last iteration.
func (w *Worker) Load() engine.Load { return w.load() }

func (w *Worker) load() engine.Load {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastLoad
}

// run is the engine goroutine: the only one that touches the engine.
func (w *Worker) run(ctx context.Context) {
	defer close(w.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		if w.eng.Idle() {
			w.setLoad()
			if !w.awaitInbox(ctx) {
				return
			}
			continue
		}
		// Take whatever arrived, then run one iteration and let the
		// modelled time pass while accepting more.
		for drained := false; !drained; {
			select {
			case o := <-w.inbox:
				w.handle(o)
			default:
				drained = true
			}
		}
		w.runCancels()
		st := w.eng.Step()
		w.publish(st.Events)
		for _, o := range st.Outputs {
			w.deliver(o)
		}
		w.metrics.steps.Inc()
		w.setLoad()
		if st.PrefillTokens == 0 && st.DecodeSeqs == 0 && len(st.Outputs) == 0 && len(st.Events) == 0 {
			// Not idle, yet nothing could run (the waiting request does
			// not fit while an import holds blocks): stepping again at
			// once would spin a core. Whatever frees room (an import
			// settling, a cancel, a new request) comes through the inbox.
			if !w.awaitInbox(ctx) {
				return
			}
			continue
		}
		if st.Duration <= 0 {
			continue
		}
		timer.Reset(st.Duration)
	wait:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				w.failAll(ErrStopped)
				return
			case o := <-w.inbox:
				w.handle(o)
			case <-w.kick:
				w.runCancels()
			case <-timer.C:
				break wait
			}
		}
	}
}

// awaitInbox handles the next message, or fails every request and
// reports false when ctx ends first.
func (w *Worker) awaitInbox(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		w.failAll(ErrStopped)
		return false
	case o := <-w.inbox:
		w.handle(o)
		return true
	case <-w.kick:
		w.runCancels()
		return true
	}
}

func (w *Worker) setLoad() {
	l := w.eng.Load()
	w.mu.Lock()
	w.lastLoad = l
	w.mu.Unlock()
	w.metrics.active.Set(float64(l.Active))
	w.metrics.waiting.Set(float64(l.Waiting))
	w.metrics.blocksUsed.Set(float64(l.BlocksUsed))
}

func (w *Worker) handle(o op) {
	// Cancels asked before this op was sent go first: a request id
	// cancelled and then sent again (its handler forgot it, a new one
	// registered it) is then cancelled before it is added, never after.
	w.runCancels()
	switch {
	case o.add != nil:
		err := w.eng.Add(o.add.req)
		switch {
		case errors.Is(err, engine.ErrQueueFull):
			err = fmt.Errorf("%w: %w", ErrOverloaded, err)
		case errors.Is(err, engine.ErrTooLarge):
			err = fmt.Errorf("%w: %w", ErrTooLarge, err)
		case errors.Is(err, engine.ErrBadRequest):
			// The request's fault, not the worker's: the frontend answers
			// 400 instead of reporting this worker down and migrating.
			err = fmt.Errorf("%w: %w", ErrBadRequest, err)
		}
		o.res <- err
	case o.fn != nil:
		o.fn()
	}
}

func (w *Worker) deliver(o engine.Output) {
	w.mu.Lock()
	p := w.reqs[o.ID]
	w.mu.Unlock()
	if p != nil {
		p.push(o)
		w.metrics.tokens.Add(float64(len(o.Tokens)))
	}
}

func (w *Worker) failAll(err error) {
	w.mu.Lock()
	ps := make([]*pending, 0, len(w.reqs))
	for _, p := range w.reqs {
		ps = append(ps, p)
	}
	w.mu.Unlock()
	for _, p := range ps {
		p.fail(err)
	}
}

// publish announces one engine iteration's KV events: consecutive stored
// blocks of one chain make one event, and the iteration's events go out as
// one batch (more only past half the max payload), so each router takes
// one message per iteration, not one per event.
func (w *Worker) publish(evs []engine.KVEvent) {
	if err := w.pub.PublishAll(kvevents.FromEngine(evs)); err != nil {
		w.metrics.publishErrors.Inc()
	}
}

// serve is the response-stream handler of one request.
func (w *Worker) serve(ctx context.Context, open *triplanev1.StreamOpen, send func([]byte) error) (string, error) {
	req := &triplanev1.GenerateRequest{}
	if err := proto.Unmarshal(open.Payload, req); err != nil {
		w.metrics.requests.WithLabelValues("bad_request").Inc()
		return "", fmt.Errorf("%w: payload is not a GenerateRequest: %v", ErrBadRequest, err)
	}
	if err := w.check(req); err != nil {
		w.metrics.requests.WithLabelValues("bad_request").Inc()
		return "", err
	}
	p, err := w.register(engine.Request{ID: req.RequestId, Tokens: req.Tokens, MaxTokens: int(req.MaxTokens)})
	if err != nil {
		outcome := "bad_request"
		if errors.Is(err, ErrDraining) {
			outcome = "draining"
		}
		w.metrics.requests.WithLabelValues(outcome).Inc()
		return "", err
	}
	defer w.forget(req.RequestId)
	if req.PrefillWorker != "" {
		w.importPrefix(ctx, req)
		if ctx.Err() != nil {
			// The frontend went away while the prefix was being imported
			// (the import settled its reservation and staging slots):
			// handing the request to the engine now would prefill and
			// decode it for nobody.
			w.metrics.requests.WithLabelValues("cancelled").Inc()
			return "", fmt.Errorf("worker %s: request %s cancelled while importing its prefix: %w",
				w.cfg.ID, req.RequestId, context.Cause(ctx))
		}
	}
	if err := w.add(p); err != nil {
		outcome := "refused"
		if errors.Is(err, errMailboxFull) {
			outcome = "overloaded"
		}
		w.metrics.requests.WithLabelValues(outcome).Inc()
		return "", err
	}
	for {
		select {
		case <-p.notify:
		case <-ctx.Done():
			// The frontend went away (or the server is closing): stop
			// generating.
			w.cancel(req.RequestId)
			w.metrics.requests.WithLabelValues("cancelled").Inc()
			return "", context.Cause(ctx)
		}
		p.mu.Lock()
		toks, cached, done, reason, perr := p.tokens, p.cached, p.done, p.reason, p.err
		p.tokens = nil
		first := p.first && (len(toks) > 0 || cached > 0)
		if first {
			p.first = false
		}
		p.mu.Unlock()
		if len(toks) > 0 || first {
			chunk := &triplanev1.GenerateChunk{Tokens: toks, Worker: w.cfg.ID}
			if first {
				chunk.CachedTokens = uint32(cached)
			}
			b, err := proto.Marshal(chunk)
			if err == nil {
				err = send(b)
			}
			if err != nil {
				w.cancel(req.RequestId)
				w.metrics.requests.WithLabelValues("cancelled").Inc()
				return "", err
			}
		}
		if done {
			if perr != nil || reason == "error" {
				w.metrics.requests.WithLabelValues("error").Inc()
				if perr == nil {
					perr = errors.New("worker: engine error")
				}
				return "", perr
			}
			w.metrics.requests.WithLabelValues("ok").Inc()
			return reason, nil
		}
	}
}

// Codes of a stream's final frame (ErrorCode).
const (
	CodeBadRequest = "bad_request"
	CodeTooLarge   = "too_large"
	CodeOverloaded = "overloaded"
	CodeDraining   = "draining"
)

// ErrorCode classifies a worker's refusal for its client: a bad request is
// not worth another worker; an overloaded or draining worker is healthy.
func ErrorCode(err error) string {
	switch {
	case errors.Is(err, ErrTooLarge):
		return CodeTooLarge
	case errors.Is(err, ErrBadRequest):
		return CodeBadRequest
	case errors.Is(err, ErrOverloaded), errors.Is(err, stream.ErrTooManyStreams):
		return CodeOverloaded
	case errors.Is(err, ErrDraining):
		return CodeDraining
	}
	return ""
}

// errMailboxFull refuses a request the engine goroutine has no room for.
var errMailboxFull = fmt.Errorf("%w: mailbox full", ErrOverloaded)

// register makes a request known to the worker (its outputs are delivered
// to the returned pending); the caller forgets it when done. Refused while
// draining or when the id is already running.
func (w *Worker) register(r engine.Request) (*pending, error) {
	p := &pending{req: r, first: true, notify: make(chan struct{}, 1)}
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.draining:
		return nil, ErrDraining
	case w.reqs[r.ID] != nil:
		return nil, fmt.Errorf("%w: request %q is already running here", ErrBadRequest, r.ID)
	}
	w.reqs[r.ID] = p
	return p, nil
}

// add hands a registered request to the engine and waits for its answer.
func (w *Worker) add(p *pending) error {
	res := make(chan error, 1)
	select {
	case w.inbox <- op{add: p, res: res}:
	default:
		return errMailboxFull
	}
	select {
	case err := <-res:
		return err
	case <-w.done:
		return ErrStopped
	}
}

// cancel stops a request in the engine: it is queued apart from the
// mailbox (which may be full) and the engine goroutine woken. It never
// blocks. Only when cfg.Mailbox cancels are already waiting (the engine
// goroutine is stuck) is it dropped, counted: the engine then finishes the
// request for nobody.
func (w *Worker) cancel(id string) {
	w.mu.Lock()
	if len(w.cancels) >= w.cfg.Mailbox {
		w.mu.Unlock()
		w.metrics.droppedCancels.Inc()
		return
	}
	w.cancels = append(w.cancels, id)
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default: // already woken; it takes every cancel waiting
	}
}

// runCancels cancels, on the engine goroutine, the requests whose clients
// went away, in the order they were asked.
func (w *Worker) runCancels() {
	w.mu.Lock()
	ids := w.cancels
	w.cancels = nil
	w.mu.Unlock()
	for _, id := range ids {
		w.eng.Cancel(id)
	}
	if len(ids) > 0 {
		// An idle engine takes no step after this to refresh them: the
		// load reports would go on counting the cancelled requests.
		w.setLoad()
	}
}

func (w *Worker) check(r *triplanev1.GenerateRequest) error {
	switch {
	case r.RequestId == "":
		return fmt.Errorf("%w: empty request id", ErrBadRequest)
	case len(r.Tokens) == 0:
		return fmt.Errorf("%w: empty prompt", ErrBadRequest)
	case r.MaxTokens == 0:
		return fmt.Errorf("%w: max_tokens must be at least 1", ErrBadRequest)
	case int(r.MaxTokens) > w.cfg.MaxTokens:
		return fmt.Errorf("%w: max_tokens %d is above this worker's limit %d", ErrBadRequest, r.MaxTokens, w.cfg.MaxTokens)
	case r.Model != "" && w.cfg.Model != "" && r.Model != w.cfg.Model:
		return fmt.Errorf("%w: model %q is not served here (this worker serves %q)", ErrBadRequest, r.Model, w.cfg.Model)
	}
	return nil
}

func (w *Worker) forget(id string) {
	w.mu.Lock()
	delete(w.reqs, id)
	if w.draining && len(w.reqs) == 0 && w.idle != nil {
		close(w.idle)
		w.idle = nil
	}
	w.mu.Unlock()
}

// Deregister removes the worker from discovery (routers stop sending to
// it) while it keeps serving what still comes: a node's own frontend
// finishing its requests. Drain follows.
func (w *Worker) Deregister(ctx context.Context) error {
	if w.cfg.Registrar == nil || w.deregistered.Load() {
		return nil
	}
	if err := w.cfg.Registrar.Deregister(ctx, Component, Endpoint, w.cfg.ID); err != nil {
		return fmt.Errorf("worker %s: deregister: %w", w.cfg.ID, err)
	}
	w.deregistered.Store(true) // Drain after it need not ask etcd again
	w.log.Info("worker deregistered")
	return nil
}

// Drain stops taking requests and deregisters the worker, then waits until
// the running requests finished or ctx ends.
func (w *Worker) Drain(ctx context.Context) error {
	w.mu.Lock()
	if !w.draining {
		w.draining = true
		if len(w.reqs) > 0 {
			w.idle = make(chan struct{})
		}
	}
	idle := w.idle
	n := len(w.reqs)
	w.mu.Unlock()
	w.log.Info("worker draining", "running", n)
	err := w.Deregister(ctx)
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			return errors.Join(err, fmt.Errorf("worker %s: drain: %w", w.cfg.ID, context.Cause(ctx)))
		}
	}
	return err
}

// Close stops the worker at once: running requests end with an error
// frame (their frontends may migrate them).
func (w *Worker) Close() {
	if w.srv != nil {
		_ = w.srv.Close()
	}
	if w.prefill != nil {
		_ = w.prefill.Unsubscribe()
	}
	if w.prefillCancels != nil {
		_ = w.prefillCancels.Unsubscribe()
	}
	if w.dataSrv != nil {
		_ = w.dataSrv.Close()
	}
	if w.shmSrv != nil {
		_ = w.shmSrv.Close()
	}
	if w.shmDir != "" {
		_ = os.RemoveAll(w.shmDir)
	}
	w.stop()
	select {
	case <-w.done:
	default:
		if w.pub == nil {
			break // the engine goroutine never started
		}
		<-w.done
	}
	if w.pub != nil {
		w.pub.Close()
	}
	// Last: the servers that write into the staging region and the engine
	// goroutine that reads it (commits) have stopped.
	if w.region != nil {
		_ = w.region.Close()
	}
	// A worker started again with this id on the same registry (a
	// restart in the same process) registers its own series.
	w.metrics.unregister()
}

// Blocks is the engine's cached blocks as the KV events announced them.
func (w *Worker) Blocks() map[uint64]kvevents.Block { return w.pub.Blocks() }
