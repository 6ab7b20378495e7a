package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/admin"
	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/logging"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving"
	"github.com/triplane-dev/triplane/serving/worker"
	"github.com/triplane-dev/triplane/system"
)

// stopTimeout bounds a clean stop after SIGINT/SIGTERM; drainTimeout is
// the part of it running requests get to finish.
const (
	stopTimeout  = 10 * time.Second
	drainTimeout = 6 * time.Second
)

type upFlags struct {
	dataDir       string
	host          string
	advertiseHost string
	natsPort      int
	etcdPort      int
	etcdPeerPort  int
	adminAddr     string
	natsURL       string
	etcd          []string
	jsSync        string
	snapEvery     uint64
	replicas      int
	namespace     string
	leaseTTL      time.Duration
	drainGrace    time.Duration
	configFile    string
	printConfig   bool

	// The serving path.
	workers       int
	httpAddr      string
	model         string
	policy        string
	overlapWeight float64
	temperature   float64
	blockSize     int
	blocks        int
	speedup       float64
	maxInflight   int
	bodyTimeout   time.Duration
	maxMigrations int
	disagg        bool
	prefill       int
	disaggMin     int
	prefillQueue  int
	dataToken     string
}

func defaultDataDir() string {
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".triplane")
	}
	return ".triplane"
}

func newUpCmd(g *globalFlags) *cobra.Command { return newUpCmdFor(g, &upFlags{}) }

// newUpCmdFor is newUpCmd binding its flags to f (a test reads them).
func newUpCmdFor(g *globalFlags, f *upFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run the whole system on this machine (embedded NATS and etcd)",
		Long: `Run the whole Triplane system in this process: an embedded NATS server with
JetStream and an embedded etcd, both on loopback with their data under
--data-dir, and the admin endpoints /healthz, /readyz and /metrics on
--admin-addr. With --nats or --etcd it joins external servers instead of
embedding them.

Settings come from flags, then TRIPLANE_<FLAG> environment variables (for
example TRIPLANE_NATS_PORT), then the YAML file given by --config, whose keys
are the flag names. --print-config shows the result and exits.

Stop with Ctrl-C or SIGTERM: everything stops cleanly within 10 seconds, and a
restart on the same data dir finds its streams and keys again.`,
		Example: `  triplane up
  triplane up --data-dir /tmp/tp --admin-addr 127.0.0.1:0
  triplane up --nats nats://10.0.0.5:4222 --etcd http://10.0.0.6:2379,http://10.0.0.7:2379
  TRIPLANE_LOG_FORMAT=json triplane up --config triplane.yaml --print-config`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := resolve(cmd, "print-config")
			if err != nil {
				return err
			}
			if err := f.validate(); err != nil {
				return usageError{err}
			}
			if f.printConfig {
				fmt.Fprint(cmd.OutOrStdout(), r.YAML())
				return nil
			}
			return runUp(cmd, g, f)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.dataDir, "data-dir", defaultDataDir(), "directory for the node's data: JetStream store, etcd data, snapshots, lock file")
	fs.StringVar(&f.host, "host", "127.0.0.1", "host the embedded NATS and etcd, and the workers' stream and block servers, listen on")
	fs.StringVar(&f.advertiseHost, "advertise-host", "", "address the workers publish for their servers, what frontends and peers on other machines dial (default --host; with --host 0.0.0.0, this machine's first routable address)")
	fs.IntVar(&f.natsPort, "nats-port", 4222, "port of the embedded NATS server (0: any free port)")
	fs.IntVar(&f.etcdPort, "etcd-port", 2379, "client port of the embedded etcd (0: any free port)")
	fs.IntVar(&f.etcdPeerPort, "etcd-peer-port", 2380, "peer port of the embedded etcd (0: any free port)")
	fs.StringVar(&f.adminAddr, "admin-addr", admin.DefaultAddr, "address of the admin HTTP server: /healthz, /readyz, /metrics (port 0: any free port)")
	fs.StringVar(&f.natsURL, "nats", "", "URL of an external NATS server with JetStream; when set, NATS is not embedded")
	fs.StringSliceVar(&f.etcd, "etcd", nil, "comma-separated URLs of an external etcd cluster; when set, etcd is not embedded")
	config.EnumVar(fs, &f.jsSync, "jetstream-sync", "always", []string{"always", "interval"},
		"when the embedded JetStream fsyncs: always = before acknowledging each write (no acknowledged event lost even if the machine dies), interval = every 2 minutes (faster; a machine crash can lose the last ones)")
	fs.Uint64Var(&f.snapEvery, "snapshot-every", 1000, "events between an actor's snapshots (Pebble, under --data-dir)")
	fs.StringVar(&f.namespace, "namespace", "default", "namespace of the deployment's control-plane keys in etcd")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", control.DefaultTTL, "TTL of the node's etcd lease (whole seconds, at least 1s); keepalive every TTL/3")
	fs.DurationVar(&f.drainGrace, "drain-grace", 0, "on stop, how long /readyz reports not ready while everything still serves, before the drain (for load balancers to stop sending; added to the 10 s stop)")
	fs.IntVar(&f.replicas, "journal-replicas", 1, "replicas of the journal stream (for a clustered external NATS)")
	fs.StringVar(&f.configFile, "config", "", "YAML file of settings, keyed by flag name (env TRIPLANE_CONFIG)")
	fs.BoolVar(&f.printConfig, "print-config", false, "print the effective configuration as YAML and exit")

	fs.IntVar(&f.workers, "workers", 2, "mock-engine workers to run in this node (0: none)")
	fs.StringVar(&f.httpAddr, "http-addr", "127.0.0.1:8000", "address of the OpenAI-compatible HTTP frontend (empty: no frontend; port 0: any free port)")
	fs.StringVar(&f.model, "model", "triplane-mock", "model name the workers and the frontend serve")
	config.EnumVar(fs, &f.policy, "policy", string(router.PolicyKV), policyNames(), "how the router chooses a worker")
	fs.Float64Var(&f.overlapWeight, "overlap-weight", router.DefaultOverlapWeight, "kv policy: weight of blocks to prefill against blocks in use")
	fs.Float64Var(&f.temperature, "temperature", 0, "kv policy: 0 picks the cheapest worker, above 0 samples by cost")
	fs.IntVar(&f.blockSize, "block-size", 16, "KV block size in tokens")
	fs.IntVar(&f.blocks, "blocks-per-worker", 4096, "KV blocks in each worker's pool")
	fs.Float64Var(&f.speedup, "speedup", 1, "divides the mock engine's modelled prefill and decode times")
	fs.IntVar(&f.maxInflight, "max-inflight", 1024, "requests the frontend serves at once; more get 429")
	fs.DurationVar(&f.bodyTimeout, "body-timeout", 10*time.Second, "how long the frontend waits for a request's body; a slower one gets 408 (it holds one of --max-inflight meanwhile)")
	fs.IntVar(&f.maxMigrations, "max-migrations", 3, "times one request may move to another worker after its worker failed (0: never)")
	fs.BoolVar(&f.disagg, "disagg", false, "disaggregated serving: prefill and decode worker pools; KV blocks move prefill → decode with transfer sessions")
	fs.IntVar(&f.prefill, "prefill-workers", 0, "with --disagg: how many of --workers prefill (default: half, at least 1)")
	fs.IntVar(&f.disaggMin, "disagg-threshold", 512, "with --disagg: least uncached prompt tokens worth a remote prefill")
	fs.StringVar(&f.dataToken, "data-token", "", "shared secret workers and frontends present on the data plane (response streams, block transfers); default: a random one per process, so set the same value on every node of a multi-node deployment")
	fs.IntVar(&f.prefillQueue, "max-prefill-queue", 8, "with --disagg: prefill workers with this many waiting requests are skipped (the decode worker prefills)")
	return cmd
}

func policyNames() []string {
	var out []string
	for _, p := range router.Policies {
		out = append(out, string(p))
	}
	return out
}

func (f *upFlags) validate() error {
	var errs []error
	for _, p := range []struct {
		name string
		v    int
	}{{"nats-port", f.natsPort}, {"etcd-port", f.etcdPort}, {"etcd-peer-port", f.etcdPeerPort}} {
		if p.v < 0 || p.v > 65535 {
			errs = append(errs, &config.Error{Key: p.name, Err: fmt.Errorf("port %d is outside 0-65535", p.v)})
		}
	}
	// Two of this node's servers on one port fail only once the first is
	// up, with a hint about another process: say so before starting.
	// Ports of servers not embedded (external NATS or etcd) are not used.
	type bound struct{ host, name string }
	claimed := map[int][]bound{}
	claim := func(name, host string, port int) {
		if port == 0 {
			return
		}
		for _, b := range claimed[port] {
			if b.host == host || wildcard(b.host) || wildcard(host) {
				errs = append(errs, &config.Error{Key: name, Err: fmt.Errorf("port %d is also %s's", port, b.name)})
				return
			}
		}
		claimed[port] = append(claimed[port], bound{host, name})
	}
	if f.natsURL == "" {
		claim("nats-port", f.host, f.natsPort)
	}
	if len(f.etcd) == 0 {
		claim("etcd-port", f.host, f.etcdPort)
		claim("etcd-peer-port", f.host, f.etcdPeerPort)
	}
	for _, a := range []struct{ name, addr string }{{"admin-addr", f.adminAddr}, {"http-addr", f.httpAddr}} {
		if a.addr == "" && a.name == "http-addr" {
			continue // no frontend
		}
		host, port, err := net.SplitHostPort(a.addr)
		if err != nil {
			errs = append(errs, &config.Error{Key: a.name, Err: fmt.Errorf("want host:port: %w", err)})
			continue
		}
		n := 0 // an empty port is any free one
		if port != "" {
			if n, err = net.LookupPort("tcp", port); err != nil {
				errs = append(errs, &config.Error{Key: a.name, Err: fmt.Errorf("port %q: %w", port, err)})
				continue
			}
		}
		claim(a.name, host, n)
	}
	if f.leaseTTL < time.Second {
		errs = append(errs, &config.Error{Key: "lease-ttl", Err: fmt.Errorf("%s is below etcd's 1s granularity", f.leaseTTL)})
	}
	if f.drainGrace < 0 || f.drainGrace > time.Minute {
		errs = append(errs, &config.Error{Key: "drain-grace", Err: fmt.Errorf("%s is outside 0-1m", f.drainGrace)})
	}
	if err := control.CheckName("namespace", f.namespace); err != nil {
		errs = append(errs, &config.Error{Key: "namespace", Err: err})
	}
	if f.snapEvery == 0 {
		errs = append(errs, &config.Error{Key: "snapshot-every", Err: errors.New("must be at least 1")})
	}
	if f.replicas < 1 || f.replicas > 5 {
		errs = append(errs, &config.Error{Key: "journal-replicas", Err: fmt.Errorf("%d is outside 1-5", f.replicas)})
	}
	if f.advertiseHost != "" {
		if err := worker.CheckHost(f.advertiseHost); err != nil {
			errs = append(errs, &config.Error{Key: "advertise-host", Err: err})
		}
	}
	if f.workers < 0 || f.workers > 256 {
		errs = append(errs, &config.Error{Key: "workers", Err: fmt.Errorf("%d is outside 0-256", f.workers)})
	}
	if err := control.CheckName("model", f.model); err != nil {
		errs = append(errs, &config.Error{Key: "model", Err: err})
	}
	if f.overlapWeight <= 0 {
		errs = append(errs, &config.Error{Key: "overlap-weight", Err: fmt.Errorf("%v must be above 0", f.overlapWeight)})
	}
	if f.temperature < 0 {
		errs = append(errs, &config.Error{Key: "temperature", Err: fmt.Errorf("%v must not be negative", f.temperature)})
	}
	if f.disagg && f.workers < 2 {
		errs = append(errs, &config.Error{Key: "disagg", Err: fmt.Errorf("needs at least 2 workers (one prefill, one decode), have %d", f.workers)})
	}
	if f.disagg && (f.prefill < 0 || (f.prefill > 0 && f.prefill >= f.workers)) {
		errs = append(errs, &config.Error{Key: "prefill-workers", Err: fmt.Errorf("%d of %d workers: leave at least one decode worker", f.prefill, f.workers)})
	}
	if f.disaggMin < 1 || f.prefillQueue < 1 {
		errs = append(errs, &config.Error{Key: "disagg-threshold", Err: errors.New("disagg-threshold and max-prefill-queue must be at least 1")})
	}
	if f.maxInflight < 1 {
		errs = append(errs, &config.Error{Key: "max-inflight", Err: errors.New("must be at least 1")})
	}
	if f.bodyTimeout < 10*time.Millisecond || f.bodyTimeout > 10*time.Minute {
		errs = append(errs, &config.Error{Key: "body-timeout", Err: fmt.Errorf("%s is outside 10ms-10m", f.bodyTimeout)})
	}
	if f.maxMigrations < 0 {
		errs = append(errs, &config.Error{Key: "max-migrations", Err: errors.New("must not be negative")})
	}
	if !(f.speedup > 0) || math.IsInf(f.speedup, 0) {
		errs = append(errs, &config.Error{Key: "speedup", Err: fmt.Errorf("%v must be a positive number", f.speedup)})
	} else if ec := f.engine(); ec.Validate() != nil {
		err := ec.Validate()
		errs = append(errs, &config.Error{Key: "block-size", Err: fmt.Errorf("engine settings (block-size, blocks-per-worker): %w", err)})
	}
	if strings.TrimSpace(f.dataDir) == "" {
		errs = append(errs, &config.Error{Key: "data-dir", Err: errors.New("must not be empty")})
	}
	if f.natsURL != "" {
		if err := checkURL(f.natsURL, "nats", "tls", "ws", "wss"); err != nil {
			errs = append(errs, &config.Error{Key: "nats", Err: err})
		}
	}
	for _, e := range f.etcd {
		if err := checkURL(e, "http", "https"); err != nil {
			errs = append(errs, &config.Error{Key: "etcd", Err: err})
		}
	}
	return errors.Join(errs...)
}

func (f *upFlags) engine() mocker.Config {
	c := mocker.Config{BlockSize: f.blockSize, NumBlocks: f.blocks, SpeedUp: f.speedup}
	// 0 would silently mean the engine's default.
	if c.BlockSize == 0 {
		c.BlockSize = -1
	}
	if c.NumBlocks == 0 {
		c.NumBlocks = -1
	}
	c.Defaults()
	return c
}

func (f *upFlags) prefillWorkers() int {
	switch {
	case !f.disagg:
		return 0
	case f.prefill > 0:
		return f.prefill
	default:
		return max(1, f.workers/2)
	}
}

// migrations maps the flag (0: never) onto frontend.Config (0: default).
func migrations(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

func checkURL(s string, schemes ...string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("bad URL %q: %w", s, err)
	}
	for _, sc := range schemes {
		if u.Scheme == sc && u.Host != "" {
			return nil
		}
	}
	return fmt.Errorf("bad URL %q: want %s://host:port (schemes: %s)", s, schemes[0], strings.Join(schemes, ", "))
}

func runUp(cmd *cobra.Command, g *globalFlags, f *upFlags) error {
	log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// /readyz waits for the serving path too: it starts after the node.
	var servingUp atomic.Bool
	servingCheck := func(context.Context) error {
		if !servingUp.Load() {
			return errors.New("serving path starting")
		}
		return nil
	}
	sys, err := system.Start(ctx, system.Config{
		Checks:  map[string]admin.Check{"serving": servingCheck},
		DataDir: f.dataDir, Host: f.host,
		NATSPort: f.natsPort, EtcdPort: f.etcdPort, EtcdPeerPort: f.etcdPeerPort,
		AdminAddr: f.adminAddr, NATSURL: f.natsURL, EtcdEndpoints: f.etcd,
		JetStreamSyncAlways: f.jsSync == "always",
		Journal:             journal.Config{Replicas: f.replicas},
		SnapshotEvery:       f.snapEvery,
		Namespace:           f.namespace,
		LeaseTTL:            f.leaseTTL,
		Version:             buildVersion(), Logger: log,
	})
	if err != nil {
		return err
	}
	token := f.dataToken
	if token == "" {
		var b [16]byte
		_, _ = rand.Read(b[:])
		token = hex.EncodeToString(b[:])
	}
	stack, err := serving.Start(ctx, serving.Planes{NATS: sys.NATS, Etcd: sys.Etcd, Host: sys.Host,
		Registrar: sys.Control.Registrar, Snapshots: sys.Snapshots, NodeID: sys.NodeID, Namespace: f.namespace,
		Registerer: sys.Admin.Registry, Logger: log}, serving.Config{
		Workers: f.workers, Frontend: f.httpAddr != "", HTTPAddr: f.httpAddr, Model: f.model, Engine: f.engine(),
		Policy: router.Policy(f.policy), Params: router.Params{OverlapWeight: f.overlapWeight, Temperature: f.temperature},
		MaxInflight: f.maxInflight, MaxMigrations: migrations(f.maxMigrations), BodyTimeout: f.bodyTimeout,
		PrefillWorkers: f.prefillWorkers(), DisaggThreshold: f.disaggMin, MaxPrefillQueue: f.prefillQueue,
		StreamToken: token, DataToken: token, ListenHost: f.host, AdvertiseHost: f.advertiseHost,
	})
	if err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		_ = sys.Close(sctx)
		if ctx.Err() != nil {
			// Stopped while starting: a clean stop, not a failure.
			log.Info("stopped while starting the serving path", "reason", context.Cause(ctx))
			return nil
		}
		var le *net.OpError
		if errors.As(err, &le) && le.Op == "listen" {
			return &system.PortError{Flag: "http-addr", Err: err}
		}
		return fmt.Errorf("serving: %w", err)
	}
	servingUp.Store(true)
	fmt.Fprintln(cmd.OutOrStdout(), sys.Summary())
	if stack.Frontend != nil {
		mode := "aggregated"
		if p := f.prefillWorkers(); p > 0 {
			mode = fmt.Sprintf("disaggregated: %d prefill, %d decode", p, f.workers-p)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "serving %s with %d mock workers (%s, policy %s); try:\n  curl -s http://%s/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":16}'\n",
			f.model, f.workers, mode, f.policy, stack.Frontend.Addr(), f.model)
	}

	<-ctx.Done()
	// With a grace, a second signal ends the grace (caught before the
	// first handler goes, so none slips through); after it, or without a
	// grace, a second signal kills the process the default way.
	grace, endGrace := context.Background(), func() {}
	if f.drainGrace > 0 {
		grace, endGrace = signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	}
	stop()
	servingUp.Store(false) // /readyz: not ready while draining
	if f.drainGrace > 0 {
		// Everything still serves while load balancers see not ready.
		log.Info("not ready; draining after the grace", "grace", f.drainGrace)
		select {
		case <-time.After(f.drainGrace):
		case <-grace.Done():
		}
	}
	endGrace()
	log.Info("stopping", "reason", context.Cause(ctx), "timeout", stopTimeout)
	t0 := time.Now()
	// Draining gets most of the budget; what is still running then is cut
	// off, and the node's own stop (lease revoke, final snapshots) gets a
	// fresh share.
	dctx, dcancel := context.WithTimeout(context.Background(), drainTimeout)
	if err := stack.Shutdown(dctx); err != nil {
		log.Warn("serving path did not drain in time; remaining requests cut off", "err", err)
	}
	dcancel()
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout-drainTimeout)
	defer cancel()
	if err := sys.Close(sctx); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	log.Info("stopped", "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// wildcard reports whether host binds every address.
func wildcard(host string) bool { return host == "" || host == "0.0.0.0" || host == "::" }
