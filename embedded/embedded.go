// Package embedded starts the NATS (JetStream) and etcd servers inside the
// triplane process, for `triplane up` on one machine and for tests. Past one
// machine nodes join external clusters instead; this package is never the
// distributed engine, only a convenient single-member one.
package embedded

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/triplane-dev/triplane/logging"
)

// PortInUseError says a configured port could not be bound. Callers turn it
// into a message naming the setting to change.
type PortInUseError struct {
	Server string // "nats", "etcd client", "etcd peer", ...
	Addr   string
	Err    error
}

func (e *PortInUseError) Error() string {
	return fmt.Sprintf("%s: cannot listen on %s: %v", e.Server, e.Addr, e.Err)
}

func (e *PortInUseError) Unwrap() error { return e.Err }

// checkPort fails with a PortInUseError when host:port cannot be bound. It is
// a pre-flight check: the servers themselves report a busy port only as a
// start-up timeout or a log line.
func checkPort(server, host string, port int) error {
	if port == 0 {
		return nil
	}
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return &PortInUseError{Server: server, Addr: addr, Err: err}
	}
	return l.Close()
}

// FreePort asks the kernel for a currently free TCP port on host.
func FreePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// NATSConfig configures an embedded NATS server with JetStream.
type NATSConfig struct {
	Host     string // listen host, default 127.0.0.1
	Port     int    // 0 picks a free port
	StoreDir string // JetStream file store directory
	// SyncAlways makes JetStream fsync every write instead of on its
	// periodic sync interval.
	SyncAlways   bool
	MaxPayload   int32 // bytes; 0 keeps the server default (1 MiB)
	StartTimeout time.Duration
	Logger       *slog.Logger
}

// NATS is a running embedded NATS server.
type NATS struct {
	Server *natsserver.Server
}

// URL is the client URL of the server.
func (n *NATS) URL() string { return n.Server.ClientURL() }

// Close shuts the server down and waits for it to stop.
func (n *NATS) Close() {
	n.Server.Shutdown()
	n.Server.WaitForShutdown()
}

// StartNATS starts a NATS server with JetStream and waits until it accepts
// connections.
func StartNATS(ctx context.Context, cfg NATSConfig) (*NATS, error) {
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.StoreDir == "" {
		return nil, errors.New("embedded nats: a JetStream store directory is required")
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	if err := checkPort("nats", cfg.Host, cfg.Port); err != nil {
		return nil, err
	}
	port := cfg.Port
	if port == 0 {
		port = natsserver.RANDOM_PORT
	}
	opts := &natsserver.Options{
		ServerName: "triplane",
		Host:       cfg.Host,
		Port:       port,
		JetStream:  true,
		StoreDir:   filepath.Clean(cfg.StoreDir),
		SyncAlways: cfg.SyncAlways,
		MaxPayload: cfg.MaxPayload,
		NoSigs:     true, // the triplane process owns signal handling
		HTTPPort:   0,
	}
	s, err := natsserver.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if cfg.Logger != nil {
		s.SetLoggerV2(logging.NATSLogger{L: cfg.Logger.With("server", "nats")}, false, false, false)
	}
	s.Start()
	deadline := cfg.StartTimeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < deadline {
		deadline = time.Until(d)
	}
	if !s.ReadyForConnections(deadline) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats on %s:%d: not ready after %s", cfg.Host, cfg.Port, deadline)
	}
	if !s.JetStreamEnabled() {
		s.Shutdown()
		return nil, errors.New("embedded nats: JetStream did not start (see the log above)")
	}
	return &NATS{Server: s}, nil
}

// EtcdConfig configures an embedded single-member etcd server.
type EtcdConfig struct {
	Name         string // member name, default "triplane"
	Dir          string // data directory
	Host         string // listen host, default 127.0.0.1
	ClientPort   int    // 0 picks a free port
	PeerPort     int    // 0 picks a free port
	StartTimeout time.Duration
	Logger       *slog.Logger
	// Fast shortens raft's heartbeat and election timers, for tests.
	Fast bool
}

// Etcd is a running embedded etcd server.
type Etcd struct {
	Etcd      *embed.Etcd
	clientURL string
}

// Endpoints are the client URLs of the server.
func (e *Etcd) Endpoints() []string { return []string{e.clientURL} }

// Close stops the server and waits for it.
func (e *Etcd) Close() { e.Etcd.Close() }

// StartEtcd starts a single-member etcd and waits until it serves clients.
func StartEtcd(ctx context.Context, cfg EtcdConfig) (*Etcd, error) {
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.Name == "" {
		cfg.Name = "triplane"
	}
	if cfg.Dir == "" {
		return nil, errors.New("embedded etcd: a data directory is required")
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if err := checkPort("etcd client", cfg.Host, cfg.ClientPort); err != nil {
		return nil, err
	}
	if err := checkPort("etcd peer", cfg.Host, cfg.PeerPort); err != nil {
		return nil, err
	}
	// Ports picked here are free when picked, not when etcd binds them:
	// another process (or an outgoing connection's ephemeral port) may take
	// one in between. Then new ones are picked, a few times.
	pick := cfg.ClientPort == 0 || cfg.PeerPort == 0
	for attempt := 1; ; attempt++ {
		e, err := startEtcd(ctx, cfg)
		var busy *PortInUseError
		if err == nil || !pick || attempt == 5 || !errors.As(err, &busy) {
			return e, err
		}
	}
}

func startEtcd(ctx context.Context, cfg EtcdConfig) (*Etcd, error) {
	var err error
	if cfg.ClientPort == 0 {
		if cfg.ClientPort, err = FreePort(cfg.Host); err != nil {
			return nil, err
		}
	}
	if cfg.PeerPort == 0 {
		if cfg.PeerPort, err = FreePort(cfg.Host); err != nil {
			return nil, err
		}
	}
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.ClientPort))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.PeerPort))}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	ec.ListenPeerUrls = []url.URL{peerURL}
	ec.AdvertisePeerUrls = []url.URL{peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	// Keep history bounded: compact revisions older than an hour.
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = "1h"
	// A lone loopback member has no peer to wait for: a short election
	// timeout makes a restart ready in a few hundred milliseconds instead of
	// waiting out etcd's 1 s default.
	ec.TickMs = 50
	ec.ElectionMs = 250
	if cfg.Fast {
		ec.TickMs = 10
		ec.ElectionMs = 50
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ec.Logger = "zap"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(logging.Zap(logger.With("server", "etcd")))

	e, err := embed.StartEtcd(ec)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, &PortInUseError{Server: "etcd", Addr: clientURL.Host + " or " + peerURL.Host, Err: err}
		}
		return nil, fmt.Errorf("embedded etcd in %s: %w", cfg.Dir, err)
	}
	timer := time.NewTimer(cfg.StartTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
		return &Etcd{Etcd: e, clientURL: clientURL.String()}, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-timer.C:
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("embedded etcd: not ready after %s", cfg.StartTimeout)
	case <-ctx.Done():
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", ctx.Err())
	}
}
