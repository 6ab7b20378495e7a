// Package planetest starts real embedded NATS (JetStream) and etcd servers on
// free loopback ports in a test's temporary directory, and stops them when the
// test ends. Every test outside sim/ that needs the event or control plane
// uses it: no hand-written mocks of the planes.
package planetest

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/triplane-dev/triplane/embedded"
)

// NATS is an embedded NATS server with JetStream, owned by one test.
type NATS struct {
	*embedded.NATS
	Dir string
}

// Etcd is an embedded single-member etcd, owned by one test.
type Etcd struct {
	*embedded.Etcd
	Dir string
}

func logger() *slog.Logger {
	if os.Getenv("TRIPLANE_TEST_SERVER_LOGS") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// StartNATS starts a NATS server with JetStream for t.
func StartNATS(t testing.TB) *NATS {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "nats")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: dir, Logger: logger()})
	if err != nil {
		t.Fatalf("planetest: start nats: %v", err)
	}
	t.Cleanup(n.Close)
	return &NATS{NATS: n, Dir: dir}
}

// Connect opens a client connection to the server, closed when t ends.
func (n *NATS) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(n.URL(), opts...)
	if err != nil {
		t.Fatalf("planetest: connect to nats %s: %v", n.URL(), err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// StartEtcd starts a single-member etcd for t, with fast raft timers.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "etcd")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := embedded.StartEtcd(ctx, embedded.EtcdConfig{Dir: dir, Logger: logger(), Fast: true})
	if err != nil {
		t.Fatalf("planetest: start etcd: %v", err)
	}
	t.Cleanup(e.Close)
	return &Etcd{Etcd: e, Dir: dir}
}

// Client opens an etcd client, closed when t ends.
func (e *Etcd) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   e.Endpoints(),
		DialTimeout: 5 * time.Second,
		Logger:      nil,
	})
	if err != nil {
		t.Fatalf("planetest: etcd client for %v: %v", e.Endpoints(), err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Planes is both servers together.
type Planes struct {
	NATS *NATS
	Etcd *Etcd
}

// Start starts NATS and etcd for t, concurrently.
func Start(t testing.TB) *Planes {
	t.Helper()
	p := &Planes{}
	done := make(chan struct{})
	var etcdErr any
	go func() {
		defer close(done)
		defer func() { etcdErr = recover() }()
		p.Etcd = StartEtcd(t)
	}()
	p.NATS = StartNATS(t)
	<-done
	if etcdErr != nil {
		panic(etcdErr)
	}
	if p.Etcd == nil {
		// StartEtcd failed the test from its goroutine, which only ended
		// that goroutine; stop the test here.
		t.FailNow()
	}
	return p
}
