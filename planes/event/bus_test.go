package event_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

func newBus(t *testing.T, nc *nats.Conn, cfg event.Config) *event.Bus {
	t.Helper()
	b, err := event.New(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

func TestSubjectScheme(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	s, err := b.Subject("prod", "router", "kv", "events")
	if err != nil || s != "triplane.prod.router.kv.events" {
		t.Fatalf("Subject = %q, %v", s, err)
	}
	for _, bad := range [][]string{{"", "x"}, {"a.b", "x"}, {"ns", "*"}, {"ns", "c", ">"}, {"ns", "c d"}} {
		if _, err := b.Subject(bad[0], bad[1], bad[2:]...); !errors.Is(err, event.ErrBadSubject) {
			t.Errorf("Subject(%q) = %v, want ErrBadSubject", bad, err)
		}
	}
	if _, err := event.New(n.Connect(t), event.Config{Prefix: "a.b"}); !errors.Is(err, event.ErrBadSubject) {
		t.Errorf("prefix with a dot: %v", err)
	}
}

func TestPublishSubscribeFanOut(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	subject := b.MustSubject("ns", "worker", "events")
	var got [2]atomic.Int64
	for i := range got {
		if _, err := event.Subscribe(b, subject, func(m *triplanev1.EventProbe) { got[i].Add(int64(m.Seq)) }); err != nil {
			t.Fatal(err)
		}
	}
	// A wildcard subscriber on another connection sees them too.
	other := newBus(t, n.Connect(t), event.Config{})
	var wild atomic.Int64
	if _, err := event.Subscribe(other, "triplane.ns.*.events", func(m *triplanev1.EventProbe) { wild.Add(int64(m.Seq)) }); err != nil {
		t.Fatal(err)
	}
	if err := other.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	const N = 100
	for i := 1; i <= N; i++ {
		if err := event.Publish(b, subject, &triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	const sum = N * (N + 1) / 2
	planetest.Eventually(t, "every subscriber to get every message", func() bool {
		return got[0].Load() == sum && got[1].Load() == sum && wild.Load() == sum
	})
}

func TestQueueGroupDeliversEachMessageOnce(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	subject := b.MustSubject("ns", "prefill", "jobs")
	var mu sync.Mutex
	seen := map[uint64]int{}
	members := map[int]int{}
	for i := range 3 {
		if _, err := event.QueueSubscribe(b, subject, "prefill-workers", func(m *triplanev1.EventProbe) {
			mu.Lock()
			seen[m.Seq]++
			members[i]++
			mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
	}
	const N = 300
	for i := range N {
		if err := event.Publish(b, subject, &triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	planetest.Eventually(t, "all messages", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == N })
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for seq, c := range seen {
		if c != 1 {
			t.Fatalf("message %d delivered %d times in the queue group", seq, c)
		}
	}
	total := 0
	for _, c := range members {
		total += c
	}
	if total != N {
		t.Fatalf("members got %d messages in all, want %d", total, N)
	}
}

func TestRequestReply(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	client := newBus(t, n.Connect(t), event.Config{})
	ctx := context.Background()
	echo := b.MustSubject("ns", "worker", "echo")
	if _, err := event.Serve(b, echo, "echoers", func(_ context.Context, req *triplanev1.EventProbe) (*triplanev1.EventProbe, error) {
		if req.Text == "fail" {
			return nil, errors.New("asked to fail\nwith two lines")
		}
		return &triplanev1.EventProbe{Seq: req.Seq + 1, Text: strings.ToUpper(req.Text)}, nil
	}); err != nil {
		t.Fatal(err)
	}
	// A responder that takes requests and never answers.
	stuck := b.MustSubject("ns", "worker", "stuck")
	arrived := make(chan struct{}, 10)
	if _, err := b.Conn().Subscribe(stuck, func(*nats.Msg) { arrived <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}

	t.Run("sync", func(t *testing.T) {
		got, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, echo, &triplanev1.EventProbe{Seq: 41, Text: "hi"})
		if err != nil || got.Seq != 42 || got.Text != "HI" {
			t.Fatalf("Request = %v, %v", got, err)
		}
	})
	t.Run("remote error", func(t *testing.T) {
		_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, echo, &triplanev1.EventProbe{Text: "fail"})
		var re *event.RemoteError
		if !errors.As(err, &re) || re.Message != "asked to fail with two lines" {
			t.Fatalf("err = %v, want RemoteError", err)
		}
	})
	t.Run("malformed request gets an error reply", func(t *testing.T) {
		reply, err := client.Conn().Request(echo, []byte{0x0a, 0x05}, 10*time.Second)
		if err != nil || !strings.Contains(reply.Header.Get("Triplane-Error"), "malformed") {
			t.Fatalf("reply %v, %v", reply, err)
		}
	})
	t.Run("no responders", func(t *testing.T) {
		_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, b.MustSubject("ns", "nobody", "home"), &triplanev1.EventProbe{})
		if !errors.Is(err, event.ErrNoResponders) {
			t.Fatalf("err = %v, want ErrNoResponders", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](tctx, client, stuck, &triplanev1.EventProbe{})
		if !errors.Is(err, event.ErrTimeout) || errors.Is(err, event.ErrCanceled) {
			t.Fatalf("err = %v, want ErrTimeout", err)
		}
		<-arrived
	})
	t.Run("default timeout", func(t *testing.T) {
		short := newBus(t, n.Connect(t), event.Config{RequestTimeout: 50 * time.Millisecond})
		_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, short, stuck, &triplanev1.EventProbe{})
		if !errors.Is(err, event.ErrTimeout) {
			t.Fatalf("err = %v, want ErrTimeout", err)
		}
		<-arrived
	})
	t.Run("canceled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		f := event.RequestAsync[*triplanev1.EventProbe, *triplanev1.EventProbe](cctx, client, stuck, &triplanev1.EventProbe{})
		<-arrived
		cancel()
		_, err := f.Wait(ctx)
		if !errors.Is(err, event.ErrCanceled) || errors.Is(err, event.ErrTimeout) {
			t.Fatalf("err = %v, want ErrCanceled", err)
		}
	})
	t.Run("async future and callback", func(t *testing.T) {
		f := event.RequestAsync[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, echo, &triplanev1.EventProbe{Seq: 1})
		<-f.Done()
		if got, err := f.Wait(ctx); err != nil || got.Seq != 2 {
			t.Fatalf("future = %v, %v", got, err)
		}
		type res struct {
			m   *triplanev1.EventProbe
			err error
		}
		ch := make(chan res, 1)
		event.RequestFunc(ctx, client, echo, &triplanev1.EventProbe{Seq: 7}, func(m *triplanev1.EventProbe, err error) { ch <- res{m, err} })
		if r := <-ch; r.err != nil || r.m.Seq != 8 {
			t.Fatalf("callback = %v, %v", r.m, r.err)
		}
	})
	if v := planetest.CounterValue(t, client.Metrics().RequestErrors.WithLabelValues("no_responders")); v != 1 {
		t.Errorf("no_responders counted %v times, want 1", v)
	}
}

func TestMaxPayloadRefusedBeforeSending(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	subject := b.MustSubject("ns", "worker", "big")
	var got atomic.Int64
	if _, err := event.Subscribe(b, subject, func(m *triplanev1.EventProbe) { got.Add(1) }); err != nil {
		t.Fatal(err)
	}
	max := int(b.MaxPayload())
	small := &triplanev1.EventProbe{Body: make([]byte, max-16)}
	big := &triplanev1.EventProbe{Body: make([]byte, max)}
	if err := event.Publish(b, subject, small); err != nil {
		t.Fatalf("payload under the limit: %v", err)
	}
	err := event.Publish(b, subject, big)
	if !errors.Is(err, event.ErrTooLarge) || !strings.Contains(err.Error(), "max payload") || !strings.Contains(err.Error(), subject) {
		t.Fatalf("err = %v, want ErrTooLarge naming the max payload and the subject", err)
	}
	_, err = event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](context.Background(), b, subject, big)
	if !errors.Is(err, event.ErrTooLarge) {
		t.Fatalf("request: err = %v, want ErrTooLarge", err)
	}
	planetest.Eventually(t, "the small message", func() bool { return got.Load() == 1 })
	if b.Conn().IsClosed() || planetest.CounterValue(t, b.Metrics().TooLarge) != 2 {
		t.Fatalf("connection closed %v, too large counted %v", b.Conn().IsClosed(), planetest.CounterValue(t, b.Metrics().TooLarge))
	}
}

// countingHandler counts log records.
type countingHandler struct{ n atomic.Int64 }

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(context.Context, slog.Record) error {
	h.n.Add(1)
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

func TestMalformedPayloadsCountedLoggedOnceDropped(t *testing.T) {
	n := planetest.StartNATS(t)
	logs := &countingHandler{}
	b := newBus(t, n.Connect(t), event.Config{Logger: slog.New(logs), MalformedLogInterval: time.Hour})
	subject := b.MustSubject("ns", "worker", "events")
	var good atomic.Int64
	sub, err := event.Subscribe(b, subject, func(m *triplanev1.EventProbe) { good.Add(int64(m.Seq)) })
	if err != nil {
		t.Fatal(err)
	}
	raw := n.Connect(t)
	for _, bad := range [][]byte{{0xff, 0xff}, {0x0a, 0x05}, []byte("not protobuf at all \xff")} {
		if err := raw.Publish(subject, bad); err != nil {
			t.Fatal(err)
		}
	}
	// Two connections are not ordered with each other: the flush makes the
	// server take the bad ones before the good one is sent.
	if err := raw.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := event.Publish(b, subject, &triplanev1.EventProbe{Seq: 5}); err != nil {
		t.Fatal(err)
	}
	planetest.Eventually(t, "the good message after the bad ones", func() bool { return good.Load() == 5 })
	if sub.Malformed() != 3 {
		t.Fatalf("malformed = %d, want 3", sub.Malformed())
	}
	if v := planetest.CounterValue(t, b.Metrics().Malformed.WithLabelValues(subject)); v != 3 {
		t.Fatalf("malformed metric = %v, want 3", v)
	}
	if logs.n.Load() != 1 {
		t.Fatalf("%d log lines about malformed payloads, want 1 per interval", logs.n.Load())
	}
}

func TestSlowConsumerBoundedAndCounted(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{PendingMsgs: 10, PendingBytes: 1 << 20})
	subject := b.MustSubject("ns", "router", "slow")
	release := make(chan struct{})
	var handled atomic.Int64
	sub, err := event.Subscribe(b, subject, func(m *triplanev1.EventProbe) {
		<-release
		handled.Add(1)
	})
	if err != nil {
		t.Fatal(err)
	}
	pub := newBus(t, n.Connect(t), event.Config{})
	const N = 200
	for i := range N {
		if err := event.Publish(pub, subject, &triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := pub.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	// One message in the handler, at most 10 pending: NATS must drop the
	// rest rather than queue them.
	planetest.Eventually(t, "the messages beyond the pending limit to be dropped", func() bool { return sub.Dropped() >= N-11 })
	planetest.Eventually(t, "the slow consumer to be reported", func() bool { return sub.SlowConsumerEvents() > 0 })
	close(release)
	planetest.Eventually(t, "the kept messages to be handled", func() bool {
		return handled.Load()+int64(sub.Dropped()) == N
	})
	if sub.Dropped() == 0 || handled.Load() > 11 {
		t.Fatalf("dropped %d, handled %d: the pending queue was not bounded", sub.Dropped(), handled.Load())
	}
	if planetest.CounterValue(t, b.Metrics().SlowConsumers) < 1 || planetest.CounterValue(t, b.Metrics().Dropped) < 1 {
		t.Fatalf("slow consumers %v, dropped %v not counted", planetest.CounterValue(t, b.Metrics().SlowConsumers), planetest.CounterValue(t, b.Metrics().Dropped))
	}
	// The subscriber keeps running.
	if err := event.Publish(pub, subject, &triplanev1.EventProbe{}); err != nil {
		t.Fatal(err)
	}
	planetest.Eventually(t, "a message after the drops", func() bool { return handled.Load()+int64(sub.Dropped()) == N+1 })
}

func TestConfigBroadcastLateJoiner(t *testing.T) {
	n := planetest.StartNATS(t)
	ctx := context.Background()
	b := newBus(t, n.Connect(t), event.Config{})
	cfg, err := event.OpenConfig[*triplanev1.EventProbe](ctx, b, "")
	if err != nil {
		t.Fatal(err)
	}
	key, err := event.ConfigKey("ns", "router", "weights")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := event.ConfigKey("ns", "a.b", "c"); !errors.Is(err, event.ErrBadSubject) {
		t.Fatalf("bad key: %v", err)
	}
	if _, _, err := cfg.Get(ctx, key); !errors.Is(err, event.ErrNotFound) {
		t.Fatalf("Get before Put: %v", err)
	}
	for _, v := range []string{"v1", "v2"} {
		if _, err := cfg.Put(ctx, key, &triplanev1.EventProbe{Text: v}); err != nil {
			t.Fatal(err)
		}
	}
	// A node that starts now sees v2 first, then every change.
	late := newBus(t, n.Connect(t), event.Config{})
	lcfg, err := event.OpenConfig[*triplanev1.EventProbe](ctx, late, "")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	stop, err := lcfg.Watch(ctx, "ns.router.*", func(k string, v *triplanev1.EventProbe, rev uint64, deleted bool) {
		mu.Lock()
		defer mu.Unlock()
		if deleted {
			seen = append(seen, k+"=deleted")
			return
		}
		seen = append(seen, k+"="+v.Text)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	planetest.Eventually(t, "the last value", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == 1 })
	if _, err := cfg.Put(ctx, key, &triplanev1.EventProbe{Text: "v3"}); err != nil {
		t.Fatal(err)
	}
	planetest.Eventually(t, "the change", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == 2 })
	mu.Lock()
	if seen[0] != key+"=v2" || seen[1] != key+"=v3" {
		t.Fatalf("late joiner saw %v", seen)
	}
	mu.Unlock()
	if v, _, err := lcfg.Get(ctx, key); err != nil || v.Text != "v3" {
		t.Fatalf("Get = %v, %v", v, err)
	}
	big := &triplanev1.EventProbe{Body: bytes.Repeat([]byte{1}, int(b.MaxPayload())+1)}
	if _, err := cfg.Put(ctx, key, big); !errors.Is(err, event.ErrTooLarge) {
		t.Fatalf("big config: %v", err)
	}
}

func TestMetricsSharedRegistry(t *testing.T) {
	n := planetest.StartNATS(t)
	reg := prometheus.NewRegistry()
	b1 := newBus(t, n.Connect(t), event.Config{Registerer: reg})
	b2 := newBus(t, n.Connect(t), event.Config{Registerer: reg})
	for _, b := range []*event.Bus{b1, b2} {
		if err := event.Publish(b, "triplane.ns.c.x", &triplanev1.EventProbe{}); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "triplane_event_published_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 2 {
				t.Fatalf("published = %v, want 2 from both buses", v)
			}
			return
		}
	}
	t.Fatal("triplane_event_published_total not registered")
}

// ServeConcurrent runs handlers side by side up to its limit and refuses
// the one past it at once.
func TestServeConcurrent(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	client := newBus(t, n.Connect(t), event.Config{})
	subj := b.MustSubject("ns", "worker", "slow")
	release := make(chan struct{})
	var running atomic.Int64
	if _, err := event.ServeConcurrent(b, subj, "", 2, func(_ context.Context, req *triplanev1.EventProbe) (*triplanev1.EventProbe, error) {
		running.Add(1)
		<-release
		return &triplanev1.EventProbe{Seq: req.Seq}, nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := event.ServeConcurrent(b, subj, "", 0, func(context.Context, *triplanev1.EventProbe) (*triplanev1.EventProbe, error) { return nil, nil }); err == nil {
		t.Fatal("limit 0 accepted")
	}
	// The server knows of the responder before the client asks.
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	results := make(chan error, 3)
	for i := range 2 {
		go func() {
			_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, subj, &triplanev1.EventProbe{Seq: uint64(i)})
			results <- err
		}()
	}
	planetest.Eventually(t, "two handlers running at once", func() bool { return running.Load() == 2 })
	_, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, subj, &triplanev1.EventProbe{Seq: 9})
	var re *event.RemoteError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), event.ErrBusyText) {
		t.Fatalf("third request: %v, want busy", err)
	}
	close(release)
	for range 2 {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
}
