// Package serving assembles the serving path of one node: mock-engine
// workers (serving/worker), the routing shell and its router actor
// (serving/frontend, actors/router) and the OpenAI-compatible HTTP frontend.
// `triplane up` starts one of each kind on the node's planes.
package serving

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/transfer"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planes/data"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving/frontend"
	"github.com/triplane-dev/triplane/serving/worker"
)

// Planes are what the serving path runs on.
type Planes struct {
	NATS      *nats.Conn
	Etcd      *clientv3.Client
	Host      *actors.Host
	Registrar *control.Registrar
	// Snapshots, when set, keeps the router's KV index view across
	// restarts.
	Snapshots *journal.Snapshots
	// NodeID names the workers (<node>-w<i>) and the router actor.
	NodeID     string
	Namespace  string
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Config says what to start.
type Config struct {
	// Workers is the number of mock-engine workers; 0 starts none (a
	// frontend-only node).
	Workers int
	// Frontend starts the HTTP frontend and router on HTTPAddr.
	Frontend bool
	HTTPAddr string
	Model    string
	Engine   mocker.Config
	Policy   router.Policy
	Params   router.Params
	// StreamToken authenticates frontends to workers' response streams.
	StreamToken string
	// MaxInflight, MaxMigrations and BodyTimeout: see frontend.Config.
	MaxInflight, MaxMigrations int
	BodyTimeout                time.Duration
	// PrefillWorkers > 0 runs disaggregated: that many of the Workers are
	// prefill workers, the rest decode; the frontend sends prompts with at
	// least DisaggThreshold uncached tokens to a prefill worker whose queue
	// is below MaxPrefillQueue, and the KV blocks move to the decode worker
	// with a transfer session.
	PrefillWorkers  int
	DisaggThreshold int
	MaxPrefillQueue int
	// DataToken authenticates block transfers between workers.
	DataToken string
	// ListenHost is where workers' stream and block servers listen;
	// default 127.0.0.1. AdvertiseHost is what they publish (default
	// ListenHost, or the machine's first routable address for 0.0.0.0).
	ListenHost, AdvertiseHost string
}

// Stack is a running serving path.
type Stack struct {
	Workers  []*worker.Worker
	Router   *frontend.Router
	Frontend *frontend.Frontend
	disc     *control.Discovery
	bus      *event.Bus
}

// Start starts the workers, then the router and frontend. The frontend
// waits for discovery's first list so its first request sees the workers.
func Start(ctx context.Context, p Planes, cfg Config) (_ *Stack, err error) {
	if p.Logger == nil {
		p.Logger = slog.New(slog.DiscardHandler)
	}
	if p.Namespace == "" {
		p.Namespace = "default"
	}
	if cfg.Model == "" {
		cfg.Model = "triplane-mock"
	}
	cfg.Engine.Defaults()
	if err := cfg.Engine.Validate(); err != nil {
		return nil, fmt.Errorf("serving: engine: %w", err)
	}
	s := &Stack{}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.bus, err = event.New(p.NATS, event.Config{Registerer: p.Registerer, Logger: p.Logger.With("plane", "event")}); err != nil {
		return nil, err
	}
	if cfg.PrefillWorkers < 0 || (cfg.PrefillWorkers > 0 && cfg.PrefillWorkers >= cfg.Workers) {
		return nil, fmt.Errorf("serving: %d prefill workers of %d: disaggregated serving needs at least one decode worker", cfg.PrefillWorkers, cfg.Workers)
	}
	xfer := transfer.NewMetrics(p.Registerer)
	dataMetrics, streamMetrics := data.NewMetrics(p.Registerer), stream.NewMetrics(p.Registerer)
	for i := range cfg.Workers {
		// Without prefill workers nobody moves blocks: the workers open
		// no data-plane servers.
		role, name := worker.RoleAggregated, fmt.Sprintf("%s-w%d", p.NodeID, i)
		if cfg.PrefillWorkers > 0 {
			role = worker.RoleDecode
			if i < cfg.PrefillWorkers {
				role, name = worker.RolePrefill, fmt.Sprintf("%s-p%d", p.NodeID, i)
			} else {
				name = fmt.Sprintf("%s-d%d", p.NodeID, i-cfg.PrefillWorkers)
			}
		}
		w, err := worker.Start(ctx, worker.Config{
			ID: name, Namespace: p.Namespace, Model: cfg.Model, Engine: cfg.Engine, Role: role, Host: p.Host,
			DataToken: cfg.DataToken, TransferMetrics: xfer, DataMetrics: dataMetrics, StreamMetrics: streamMetrics, ListenHost: cfg.ListenHost, AdvertiseHost: cfg.AdvertiseHost,
			Bus: s.bus, Registrar: p.Registrar, Token: cfg.StreamToken, Logger: p.Logger, Registerer: p.Registerer,
		})
		if err != nil {
			return nil, err
		}
		s.Workers = append(s.Workers, w)
	}
	if !cfg.Frontend {
		return s, nil
	}
	dcfg := control.DiscoveryConfig{Namespace: p.Namespace, Component: worker.Component, Endpoint: worker.Endpoint}
	if p.Registrar != nil {
		// Exported with the node's: records ignored, watch resumes, events
		// a slow subscriber dropped.
		dcfg.Cache = control.CacheConfig{Metrics: p.Registrar.Metrics(), Logger: p.Logger.With("plane", "control")}
	}
	if s.disc, err = control.NewDiscovery(p.Etcd, dcfg); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.disc.WaitReady(wctx); err != nil {
		return nil, fmt.Errorf("serving: discovery: %w", err)
	}
	rc := frontend.RouterConfig{Namespace: p.Namespace, Model: cfg.Model,
		Policy: cfg.Policy, Params: cfg.Params, Bus: s.bus, Discovery: s.disc, Host: p.Host,
		RouterID: p.NodeID, Logger: p.Logger.With("component", "router"), Registerer: p.Registerer}
	if p.Snapshots != nil {
		rc.Store = p.Snapshots
	}
	if s.Router, err = frontend.NewRouter(rc); err != nil {
		return nil, err
	}
	var disagg *frontend.Disagg
	if cfg.PrefillWorkers > 0 {
		disagg = &frontend.Disagg{Threshold: cfg.DisaggThreshold, MaxPrefillQueue: cfg.MaxPrefillQueue}
	}
	if s.Frontend, err = frontend.Start(frontend.Config{Addr: cfg.HTTPAddr, Model: cfg.Model, Disagg: disagg,
		BlockSize: cfg.Engine.BlockSize, Vocab: cfg.Engine.Vocab, Router: s.Router, StreamToken: cfg.StreamToken,
		MaxInflight: cfg.MaxInflight, MaxMigrations: cfg.MaxMigrations, BodyTimeout: cfg.BodyTimeout,
		Logger: p.Logger.With("component", "frontend"), Registerer: p.Registerer}); err != nil {
		return nil, err
	}
	return s, nil
}

// Shutdown drains: every worker deregisters at once (so other nodes'
// routers stop sending to it) but goes on serving while the frontend stops
// taking requests and finishes its own; then every worker stops taking
// requests and finishes its running ones, and everything stops. Bounded by
// ctx.
func (s *Stack) Shutdown(ctx context.Context) error {
	// The router stops following and saves its view first: the workers'
	// deregistration would empty it. It goes on routing the frontend's
	// last requests to this node's workers after they left discovery.
	if s.Router != nil {
		own := map[string]bool{}
		for _, w := range s.Workers {
			own[w.ID()] = true
		}
		s.Router.CloseKeeping(own)
	}
	// Deregistration runs beside the frontend's drain, not before it: an
	// unreachable etcd must not eat the drain's time.
	var deregistered []error
	done := make(chan struct{})
	go func() {
		defer close(done)
		deregistered = s.eachWorker(func(w *worker.Worker) error { return w.Deregister(ctx) })
	}()
	var errs []error
	if s.Frontend != nil {
		if err := s.Frontend.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("frontend: %w", err))
		}
	}
	<-done
	errs = append(errs, deregistered...)
	errs = append(errs, s.eachWorker(func(w *worker.Worker) error { return w.Drain(ctx) })...)
	s.Close()
	return errors.Join(errs...)
}

// eachWorker runs fn on every worker at once and returns their errors.
func (s *Stack) eachWorker(fn func(*worker.Worker) error) []error {
	errs := make([]error, len(s.Workers))
	var wg sync.WaitGroup
	for i, w := range s.Workers {
		wg.Go(func() { errs[i] = fn(w) })
	}
	wg.Wait()
	return errs
}

// Close stops everything at once.
func (s *Stack) Close() {
	if s.Frontend != nil {
		_ = s.Frontend.Close()
	}
	if s.Router != nil {
		s.Router.Close()
	}
	if s.disc != nil {
		s.disc.Close()
	}
	for _, w := range s.Workers {
		w.Close()
	}
	// Last: the workers and the router used it. Its subscriptions end and
	// handlers still running see their context cancelled.
	if s.bus != nil {
		s.bus.Close()
	}
}
