// Package system assembles one Triplane node: it locks the data dir, starts
// the embedded NATS and etcd servers (or joins external ones), connects real
// clients to both, and serves the admin endpoints. `triplane up` is a thin
// shell around it, and later issues hang the actors off the System it returns.
package system

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/all"
	"github.com/triplane-dev/triplane/admin"
	"github.com/triplane-dev/triplane/embedded"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/logging"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
)

// Config is everything a node needs to start.
type Config struct {
	DataDir      string
	Host         string // listen host of the embedded servers
	NATSPort     int
	EtcdPort     int
	EtcdPeerPort int
	AdminAddr    string
	// NATSURL, when set, joins an external NATS instead of embedding one.
	NATSURL string
	// EtcdEndpoints, when set, join an external etcd instead of embedding one.
	EtcdEndpoints []string
	// JetStreamSyncAlways makes the embedded JetStream fsync every write
	// before acknowledging it.
	JetStreamSyncAlways bool
	// Journal configures the actor journal stream.
	Journal journal.Config
	// SnapshotEvery is the number of events between an actor's snapshots.
	SnapshotEvery uint64
	// Namespace groups the control-plane keys of one deployment; default
	// "default".
	Namespace string
	// LeaseTTL of the node's etcd lease; default 10 s.
	LeaseTTL time.Duration
	// PlacementGroups the node joins; default "default".
	PlacementGroups []string
	// Want lists singleton actors to ask placement for: "kind/id" in the
	// node's first placement group, or "group:kind/id" (see ParseWant).
	Want []string
	// Checks are more readiness checks for /readyz (for example the
	// serving path, started after the node).
	Checks  map[string]admin.Check
	Version string
	Logger  *slog.Logger
}

// PortError says a listen port is taken, and which setting moves it.
type PortError struct {
	Flag string
	Err  error
}

func (e *PortError) Error() string {
	return fmt.Sprintf("%v; choose another port with --%s", e.Err, e.Flag)
}

func (e *PortError) Unwrap() error { return e.Err }

// System is a running node.
type System struct {
	cfg     Config
	log     *slog.Logger
	NodeID  string
	lock    *dirLock
	natsSrv *embedded.NATS
	etcdSrv *embedded.Etcd
	NATS    *nats.Conn
	JS      jetstream.JetStream
	Etcd    *clientv3.Client
	Admin   *admin.Server
	// Journal, Snapshots and Host run the event-sourced actors.
	Journal   *journal.Journal
	Snapshots *journal.Snapshots
	Host      *actors.Host
	// Control is the node's registration and placement.
	Control  *control.Node
	NATSURL  string
	EtcdURLs []string
	Started  time.Duration // how long Start took

	natsClosed chan struct{}
}

// Start brings a node up. On error everything already started is stopped.
func Start(ctx context.Context, cfg Config) (_ *System, err error) {
	t0 := time.Now()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	s := &System{cfg: cfg, log: cfg.Logger}
	defer func() {
		if err != nil {
			s.Close(context.Background())
		}
	}()

	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("data dir %q: %w", cfg.DataDir, err)
	}
	s.cfg.DataDir = dir
	if s.lock, err = lockDir(dir); err != nil {
		return nil, err
	}
	if s.NodeID, err = nodeID(dir); err != nil {
		return nil, err
	}

	// Bind the admin port first: it is the cheapest to check and the most
	// likely to collide with another tool.
	s.Admin = admin.New(s.log)
	if err := s.Admin.Listen(cfg.AdminAddr); err != nil {
		return nil, &PortError{Flag: "admin-addr", Err: fmt.Errorf("admin: cannot listen on %s: %w", cfg.AdminAddr, err)}
	}

	if err := s.startServers(ctx); err != nil {
		return nil, err
	}
	if err := s.connect(ctx); err != nil {
		return nil, err
	}

	if err := s.startActors(ctx); err != nil {
		return nil, err
	}
	if err := s.startControl(ctx); err != nil {
		return nil, err
	}
	s.Admin.AddCheck("nats", s.checkNATS)
	s.Admin.AddCheck("etcd", s.checkEtcd)
	s.Admin.AddCheck("journal", s.Journal.Check)
	for name, c := range cfg.Checks {
		s.Admin.AddCheck(name, c)
	}
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "triplane_build_info", Help: "Version of the running triplane binary (always 1).",
	}, []string{"version", "node_id"})
	info.WithLabelValues(cfg.Version, s.NodeID).Set(1)
	s.Admin.Registry.MustRegister(info)
	// The embedded etcd registers its metrics with the default registry.
	s.Admin.Serve(prometheus.DefaultGatherer)
	s.Started = time.Since(t0)
	s.log.Info("node started", "node_id", s.NodeID, "data_dir", dir, "took", s.Started.Round(time.Millisecond))
	return s, nil
}

func (s *System) startServers(ctx context.Context) error {
	type result struct {
		name string
		err  error
	}
	results := make(chan result, 2)
	n := 0
	if s.cfg.NATSURL == "" {
		n++
		go func() {
			srv, err := embedded.StartNATS(ctx, embedded.NATSConfig{
				Host: s.cfg.Host, Port: s.cfg.NATSPort,
				StoreDir:   filepath.Join(s.cfg.DataDir, "nats"),
				SyncAlways: s.cfg.JetStreamSyncAlways,
				Logger:     s.log,
			})
			s.natsSrv = srv
			results <- result{"nats", err}
		}()
	} else {
		s.NATSURL = s.cfg.NATSURL
	}
	if len(s.cfg.EtcdEndpoints) == 0 {
		n++
		go func() {
			srv, err := embedded.StartEtcd(ctx, embedded.EtcdConfig{
				Host: s.cfg.Host, ClientPort: s.cfg.EtcdPort, PeerPort: s.cfg.EtcdPeerPort,
				Dir:    filepath.Join(s.cfg.DataDir, "etcd"),
				Logger: s.log,
			})
			s.etcdSrv = srv
			results <- result{"etcd", err}
		}()
	} else {
		s.EtcdURLs = s.cfg.EtcdEndpoints
	}
	var errs []error
	for range n {
		r := <-results
		if r.err != nil {
			errs = append(errs, portFlag(r.err))
		}
	}
	if s.natsSrv != nil {
		s.NATSURL = s.natsSrv.URL()
	}
	if s.etcdSrv != nil {
		s.EtcdURLs = s.etcdSrv.Endpoints()
	}
	return errors.Join(errs...)
}

// portFlag names the flag that moves a busy port.
func portFlag(err error) error {
	var pe *embedded.PortInUseError
	if !errors.As(err, &pe) {
		return err
	}
	switch pe.Server {
	case "nats":
		return &PortError{Flag: "nats-port", Err: err}
	case "etcd client":
		return &PortError{Flag: "etcd-port", Err: err}
	case "etcd peer":
		return &PortError{Flag: "etcd-peer-port", Err: err}
	}
	return &PortError{Flag: "etcd-port or --etcd-peer-port", Err: err}
}

func (s *System) connect(ctx context.Context) error {
	s.natsClosed = make(chan struct{})
	nc, err := nats.Connect(s.NATSURL,
		nats.ClosedHandler(func(*nats.Conn) { close(s.natsClosed) }),
		nats.DrainTimeout(2*time.Second),
		nats.Name("triplane "+s.NodeID),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				s.log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { s.log.Info("nats reconnected", "url", c.ConnectedUrl()) }),
	)
	if err != nil {
		return fmt.Errorf("connect to nats at %s: %w", s.NATSURL, err)
	}
	s.NATS = nc
	if s.JS, err = jetstream.New(nc); err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	if err := s.checkNATS(ctx); err != nil {
		return fmt.Errorf("nats at %s: %w", s.NATSURL, err)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   s.EtcdURLs,
		DialTimeout: 5 * time.Second,
		Logger:      logging.Zap(s.log.With("client", "etcd")),
		Context:     context.Background(),
	})
	if err != nil {
		return fmt.Errorf("connect to etcd at %s: %w", strings.Join(s.EtcdURLs, ","), err)
	}
	s.Etcd = cli
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.checkEtcd(cctx); err != nil {
		return fmt.Errorf("etcd at %s: %w", strings.Join(s.EtcdURLs, ","), err)
	}
	return nil
}

func (s *System) checkNATS(ctx context.Context) error {
	if s.NATS == nil || !s.NATS.IsConnected() {
		return errors.New("not connected")
	}
	if _, err := s.JS.AccountInfo(ctx); err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	return nil
}

func (s *System) checkEtcd(ctx context.Context) error {
	if s.Etcd == nil {
		return errors.New("not connected")
	}
	// A linearizable read needs a leader and a quorum.
	if _, err := s.Etcd.Get(ctx, "/triplane/readyz", clientv3.WithCountOnly()); err != nil {
		return err
	}
	return nil
}

func (s *System) startActors(ctx context.Context) error {
	jctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	j, err := journal.Open(jctx, s.NATS, s.cfg.Journal)
	if err != nil {
		return err
	}
	s.Journal = j
	if s.Snapshots, err = journal.OpenSnapshots(filepath.Join(s.cfg.DataDir, "snapshots"), s.log); err != nil {
		return err
	}
	s.Host, err = actors.NewHost(actors.HostConfig{
		Journal: j, Snapshots: s.Snapshots, Registry: all.Registry(),
		SnapshotEvery: s.cfg.SnapshotEvery, Logger: s.log,
		Metrics: actors.NewMetrics(s.Admin.Registry),
	})
	return err
}

// startControl registers the node in etcd and joins placement.
func (s *System) startControl(ctx context.Context) error {
	ns := s.cfg.Namespace
	if ns == "" {
		ns = "default"
	}
	host, _ := os.Hostname()
	info := &triplanev1.NodeInfo{
		Identity: &triplanev1.NodeIdentity{NodeId: s.NodeID, Namespace: ns, Hostname: host, Version: s.cfg.Version,
			StartedUnixNanos: time.Now().UnixNano()},
		Endpoints: []*triplanev1.Endpoint{
			{Protocol: triplanev1.Protocol_PROTOCOL_NATS, Address: s.NATSURL},
			{Protocol: triplanev1.Protocol_PROTOCOL_ADMIN_HTTP, Address: "http://" + s.Admin.Addr()},
		},
	}
	for _, u := range s.EtcdURLs {
		info.Endpoints = append(info.Endpoints, &triplanev1.Endpoint{Protocol: triplanev1.Protocol_PROTOCOL_ETCD, Address: u})
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	n, err := control.StartNode(cctx, control.NodeConfig{
		Client: s.Etcd, Namespace: ns, Info: info, TTL: s.cfg.LeaseTTL, Groups: s.cfg.PlacementGroups,
		Host: s.Host, Journal: s.Journal, Snapshots: s.Snapshots, Registry: all.Registry(),
		Registerer: s.Admin.Registry, Logger: s.log.With("plane", "control"),
	})
	if err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	s.Control = n
	for _, w := range s.cfg.Want {
		group, kind, id, err := ParseWant(w, s.cfg.PlacementGroups)
		if err != nil {
			return err
		}
		if err := n.Placements[group].Want(cctx, kind, id); err != nil {
			return err
		}
	}
	return nil
}

// ParseWant reads a wanted singleton actor: "kind/id" in the first of the
// node's placement groups (control.DefaultGroup when none are given), or
// "group:kind/id" in one of them. One group only: wanted in two groups, each
// group's leader would place it, and two nodes could host one singleton.
func ParseWant(w string, groups []string) (group, kind, id string, err error) {
	if len(groups) == 0 {
		groups = []string{control.DefaultGroup}
	}
	group, actor := groups[0], w
	if g, a, ok := strings.Cut(w, ":"); ok {
		group, actor = g, a
	}
	kind, id, ok := strings.Cut(actor, "/")
	switch {
	case !ok || control.CheckName("kind", kind) != nil || control.CheckName("id", id) != nil:
		return "", "", "", fmt.Errorf("want %q: expected kind/id or group:kind/id", w)
	case !slices.Contains(groups, group):
		return "", "", "", fmt.Errorf("want %q: this node is not in placement group %q (it is in %s)", w, group, strings.Join(groups, ", "))
	}
	return group, kind, id, nil
}

// Embedded reports which servers run inside this process.
func (s *System) Embedded() (nats, etcd bool) { return s.natsSrv != nil, s.etcdSrv != nil }

// Summary is the one line printed on start: what listens where, how to stop.
func (s *System) Summary() string {
	kind := func(embedded bool) string {
		if embedded {
			return "embedded"
		}
		return "external"
	}
	en, ee := s.Embedded()
	return fmt.Sprintf("triplane is up: nats=%s (%s) etcd=%s (%s) admin=http://%s data-dir=%s; stop with Ctrl-C or SIGTERM",
		s.NATSURL, kind(en), strings.Join(s.EtcdURLs, ","), kind(ee), s.Admin.Addr(), s.cfg.DataDir)
}

// Close stops everything in reverse order of start. It is safe on a
// partially started System.
func (s *System) Close(ctx context.Context) error {
	var errs []error
	if s.Admin != nil {
		if err := s.Admin.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("admin: %w", err))
		}
	}
	if s.Control != nil {
		// Revoking the lease removes the node's registrations and hands
		// its placement leadership over at once.
		if err := s.Control.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("control plane: %w", err))
		}
	}
	if s.Host != nil {
		if err := s.Host.Stop(ctx); err != nil {
			errs = append(errs, fmt.Errorf("actors: %w", err))
		}
	}
	if s.Snapshots != nil {
		if err := s.Snapshots.Close(); err != nil {
			errs = append(errs, fmt.Errorf("snapshots: %w", err))
		}
	}
	if s.NATS != nil {
		// Drain flushes what was published; it closes the connection
		// itself, bounded by DrainTimeout.
		if err := s.NATS.Drain(); err != nil {
			s.NATS.Close()
		}
		select {
		case <-s.natsClosed:
		case <-ctx.Done():
			s.NATS.Close()
		}
	}
	if s.Etcd != nil {
		if err := s.Etcd.Close(); err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, fmt.Errorf("etcd client: %w", err))
		}
	}
	if s.etcdSrv != nil {
		s.etcdSrv.Close()
	}
	if s.natsSrv != nil {
		s.natsSrv.Close()
	}
	s.lock.unlock()
	return errors.Join(errs...)
}

// nodeID reads the node's id from the data dir, creating it on first start,
// so a node keeps its identity across restarts.
func nodeID(dir string) (string, error) {
	path := filepath.Join(dir, "node-id")
	if b, err := os.ReadFile(path); err == nil {
		if id := strings.TrimSpace(string(b)); id != "" {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read node id: %w", err)
	}
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate node id: %w", err)
	}
	id := "node-" + hex.EncodeToString(b[:])
	if err := os.WriteFile(path, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("write node id: %w", err)
	}
	return id, nil
}
