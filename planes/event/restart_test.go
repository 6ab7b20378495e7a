package event_test

import (
	"context"
	"errors"
	"net/url"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/triplane-dev/triplane/embedded"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

// TestServerRestart stops the NATS server in the middle of the test and
// starts a new one on the same port and store: JetStream jobs survive, core
// subscribers resume, and a request in flight fails with ErrDisconnected
// instead of waiting for its (long) timeout.
func TestServerRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nats")
	ctx := context.Background()
	var port int
	start := func() *embedded.NATS {
		s, err := embedded.StartNATS(ctx, embedded.NATSConfig{Port: port, StoreDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// The first start lets the server pick its port as it binds it (a
	// port picked beforehand may be taken before it is bound); the
	// restart reuses it.
	srv := start()
	u, err := url.Parse(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	if port, err = strconv.Atoi(u.Port()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	connect := func() *nats.Conn {
		nc, err := nats.Connect(srv.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	b := newBus(t, connect(), event.Config{})
	client := newBus(t, connect(), event.Config{})

	subject := b.MustSubject("ns", "worker", "events")
	var got atomic.Int64
	if _, err := event.Subscribe(b, subject, func(m *triplanev1.EventProbe) { got.Store(int64(m.Seq)) }); err != nil {
		t.Fatal(err)
	}
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if err := event.Publish(client, subject, &triplanev1.EventProbe{Seq: 1}); err != nil {
		t.Fatal(err)
	}
	planetest.Eventually(t, "a message before the restart", func() bool { return got.Load() == 1 })

	q, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, client, event.QueueConfig{Namespace: "ns", Component: "prefill", Name: "jobs"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := q.Enqueue(ctx, &triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}

	// A responder that holds the request until the server goes away.
	slow := b.MustSubject("ns", "worker", "slow")
	arrived := make(chan struct{}, 1)
	if _, err := b.Conn().Subscribe(slow, func(*nats.Msg) { arrived <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	f := event.RequestAsync[*triplanev1.EventProbe, *triplanev1.EventProbe](rctx, client, slow, &triplanev1.EventProbe{})
	<-arrived

	srv.Close()
	if _, err := f.Wait(ctx); !errors.Is(err, event.ErrDisconnected) {
		t.Fatalf("in-flight request: %v, want ErrDisconnected", err)
	}
	if _, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](rctx, client, slow, &triplanev1.EventProbe{}); !errors.Is(err, event.ErrDisconnected) {
		t.Fatalf("request while disconnected: %v, want ErrDisconnected", err)
	}

	srv = start()
	// The core subscriber resumes once both connections are back.
	planetest.Eventually(t, "a message after the restart", func() bool {
		_ = event.Publish(client, subject, &triplanev1.EventProbe{Seq: 2})
		return got.Load() == 2
	})
	// The jobs survived in JetStream.
	cctx, stop := context.WithCancel(ctx)
	var jobs atomic.Int64
	done := make(chan error, 1)
	go func() {
		done <- q.Consume(cctx, func(context.Context, *event.Job[*triplanev1.EventProbe]) error { jobs.Add(1); return nil })
	}()
	planetest.Eventually(t, "the 5 jobs enqueued before the restart", func() bool { return jobs.Load() == 5 })
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
