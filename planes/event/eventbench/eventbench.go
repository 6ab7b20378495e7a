// Package eventbench is `triplane bench event`: the event plane's typed API
// measured against raw nats.go in the same run, on an embedded server.
package eventbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/embedded"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

// Config sizes the benchmark.
type Config struct {
	Messages    int // pub/sub messages per run
	PayloadSize int // bytes of the probe's body
	Requests    int // request-reply round trips per run
	Jobs        int // work-queue jobs per run
	KvEvents    int // KV events per run
	Rounds      int // repetitions; medians are reported
	// Only lists the parts to run: pubsub, request, queue, kv; empty runs
	// all.
	Only   []string
	Dir    string
	Logger *slog.Logger
}

// Latency is one request-reply line.
type Latency struct {
	Name          string
	N             int
	P50, P99, Max time.Duration
}

// Report is everything measured.
type Report struct {
	Rates     []bench.Result
	Latencies []Latency
}

// Print writes the report.
func (r Report) Print(w io.Writer, title string) {
	bench.Print(w, title, r.Rates)
	if len(r.Latencies) == 0 {
		return
	}
	fmt.Fprintf(w, "  %-52s %10s %10s %10s %10s\n", "request-reply round trip", "n", "p50", "p99", "max")
	for _, l := range r.Latencies {
		fmt.Fprintf(w, "  %-52s %10d %10s %10s %10s\n", l.Name, l.N, l.P50, l.P99, l.Max)
	}
}

// Run measures, printing progress to progress.
func Run(ctx context.Context, cfg Config, progress io.Writer) (Report, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rounds <= 0 {
		cfg.Rounds = 1
	}
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "triplane-bench-event-")
		if err != nil {
			return Report{}, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	srv, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: filepath.Join(dir, "nats"), Logger: cfg.Logger})
	if err != nil {
		return Report{}, err
	}
	defer srv.Close()
	conn := func() (*nats.Conn, error) { return nats.Connect(srv.URL()) }
	pubNC, err := conn()
	if err != nil {
		return Report{}, err
	}
	defer pubNC.Close()
	subNC, err := conn()
	if err != nil {
		return Report{}, err
	}
	defer subNC.Close()
	pendingLimit := max(cfg.Messages, cfg.KvEvents) + 1
	pub, err := event.New(pubNC, event.Config{Logger: cfg.Logger, PendingMsgs: pendingLimit, PendingBytes: 1 << 30})
	if err != nil {
		return Report{}, err
	}
	defer pub.Close()
	sub, err := event.New(subNC, event.Config{Logger: cfg.Logger, PendingMsgs: pendingLimit, PendingBytes: 1 << 30})
	if err != nil {
		return Report{}, err
	}
	defer sub.Close()
	step := func(s string) { fmt.Fprintf(progress, "  %s...\n", s) }

	probe := &triplanev1.EventProbe{Seq: 1, Text: "kv-block-stored", Body: make([]byte, cfg.PayloadSize)}
	lines := map[string][]bench.Result{}
	var order []string
	add := func(r bench.Result) {
		if _, ok := lines[r.Name]; !ok {
			order = append(order, r.Name)
		}
		lines[r.Name] = append(lines[r.Name], r)
	}
	var lats []Latency
	run := func(part string) bool { return len(cfg.Only) == 0 || slices.Contains(cfg.Only, part) }
	for round := range cfg.Rounds {
		step(fmt.Sprintf("round %d/%d: pub/sub", round+1, cfg.Rounds))
		for _, f := range alternate(round, []func() (bench.Result, error){
			func() (bench.Result, error) { return rawPubSub(pubNC, subNC, cfg.Messages, probe, false) },
			func() (bench.Result, error) { return rawPubSub(pubNC, subNC, cfg.Messages, probe, true) },
			func() (bench.Result, error) { return typedPubSub(pub, sub, cfg.Messages, probe) },
		}) {
			if !run("pubsub") {
				break
			}
			r, err := f()
			if err != nil {
				return Report{}, err
			}
			add(r)
		}
		step(fmt.Sprintf("round %d/%d: request-reply", round+1, cfg.Rounds))
		if run("request") {
			raw, typed, err := requestReply(ctx, pub, sub, cfg.Requests, probe)
			if err != nil {
				return Report{}, err
			}
			if round == cfg.Rounds-1 {
				lats = append(lats, raw, typed)
			}
		}
		step(fmt.Sprintf("round %d/%d: work queue", round+1, cfg.Rounds))
		for _, f := range alternate(round, []func() (bench.Result, error){
			func() (bench.Result, error) { return rawWorkQueue(ctx, pubNC, cfg.Jobs, probe, round) },
			func() (bench.Result, error) { return typedWorkQueue(ctx, pub, cfg.Jobs, probe, round) },
		}) {
			if !run("queue") {
				break
			}
			r, err := f()
			if err != nil {
				return Report{}, err
			}
			add(r)
		}
		step(fmt.Sprintf("round %d/%d: kv events", round+1, cfg.Rounds))
		for _, f := range alternate(round, []func() (bench.Result, error){
			func() (bench.Result, error) { return kvJetStream(ctx, pubNC, sub, cfg.KvEvents, round) },
			func() (bench.Result, error) { return kvCore(pub, sub, cfg.KvEvents, round, 0) },
			func() (bench.Result, error) { return kvCore(pub, sub, cfg.KvEvents, round, 5) },
		}) {
			if !run("kv") {
				break
			}
			r, err := f()
			if err != nil {
				return Report{}, err
			}
			add(r)
		}
	}
	var out []bench.Result
	for _, name := range order {
		out = append(out, median(lines[name]))
	}
	base := map[string]float64{}
	for _, r := range out {
		base[r.Name] = r.Rate()
	}
	for i, r := range out {
		if r.Baseline != "" && base[r.Baseline] > 0 {
			out[i].Ratio = r.Rate() / base[r.Baseline]
		}
	}
	return Report{Rates: out, Latencies: lats}, nil
}

// alternate reverses the order of a round's runs every other round, so
// neither a run nor its baseline always goes first.
func alternate[T any](round int, fs []T) []T {
	if round%2 == 1 {
		slices.Reverse(fs)
	}
	return fs
}

func median(rs []bench.Result) bench.Result {
	slices.SortFunc(rs, func(a, b bench.Result) int {
		switch {
		case a.Rate() < b.Rate():
			return -1
		case a.Rate() > b.Rate():
			return 1
		}
		return 0
	})
	return rs[len(rs)/2]
}

const (
	nameRawBytes = "pub/sub raw nats.go, bytes only"
	nameRawProto = "pub/sub raw nats.go + proto by hand"
	nameTyped    = "pub/sub typed event API"
	nameRawWQ    = "work queue raw jetstream, consume+ack"
	nameTypedWQ  = "work queue typed WorkQueue, consume+ack"
	nameKvJS     = "kv events via JetStream stream (ordered consumer)"
	nameKvCore   = "kv events core NATS + gap repair"
	nameKvLossy  = "kv events core NATS + gap repair, 5% dropped"
)

// waitCount waits until *n reaches want, or until nothing arrives for 5 s.
func waitCount(n *atomic.Int64, want int64) error {
	last, since := int64(-1), time.Now()
	for {
		c := n.Load()
		if c >= want {
			return nil
		}
		if c != last {
			last, since = c, time.Now()
		} else if time.Since(since) > 5*time.Second {
			return fmt.Errorf("stalled at %d of %d messages", c, want)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// rawPubSub is the baseline: nats.go publish and subscribe of the same
// probe, marshaled and unmarshaled by hand when withProto, or its bytes
// marshaled once and never decoded otherwise.
func rawPubSub(pubNC, subNC *nats.Conn, n int, probe *triplanev1.EventProbe, withProto bool) (bench.Result, error) {
	subject := "bench.raw.pubsub"
	var got atomic.Int64
	var bad atomic.Int64
	s, err := subNC.Subscribe(subject, func(m *nats.Msg) {
		if withProto {
			var p triplanev1.EventProbe
			if err := proto.Unmarshal(m.Data, &p); err != nil {
				bad.Add(1)
			}
		}
		got.Add(1)
	})
	if err != nil {
		return bench.Result{}, err
	}
	defer s.Unsubscribe()
	if err := s.SetPendingLimits(n+1, 1<<30); err != nil {
		return bench.Result{}, err
	}
	if err := subNC.Flush(); err != nil {
		return bench.Result{}, err
	}
	once, _ := proto.Marshal(probe)
	start := time.Now()
	var buf []byte
	for range n {
		data := once
		if withProto {
			buf, err = proto.MarshalOptions{}.MarshalAppend(buf[:0], probe)
			if err != nil {
				return bench.Result{}, err
			}
			data = buf
		}
		if err := pubNC.Publish(subject, data); err != nil {
			return bench.Result{}, err
		}
	}
	if err := waitCount(&got, int64(n)); err != nil {
		return bench.Result{}, fmt.Errorf("raw pub/sub: %w", err)
	}
	name, baseline := nameRawBytes, ""
	if withProto {
		name, baseline = nameRawProto, nameRawBytes
	}
	return bench.Result{Name: name, Ops: n, Elapsed: time.Since(start), Baseline: baseline}, nil
}

func typedPubSub(pub, sub *event.Bus, n int, probe *triplanev1.EventProbe) (bench.Result, error) {
	subject := pub.MustSubject("bench", "typed", "pubsub")
	var got atomic.Int64
	s, err := event.Subscribe(sub, subject, func(*triplanev1.EventProbe) { got.Add(1) })
	if err != nil {
		return bench.Result{}, err
	}
	defer s.Unsubscribe()
	if err := sub.Conn().Flush(); err != nil {
		return bench.Result{}, err
	}
	start := time.Now()
	for range n {
		if err := event.Publish(pub, subject, probe); err != nil {
			return bench.Result{}, err
		}
	}
	if err := waitCount(&got, int64(n)); err != nil {
		return bench.Result{}, fmt.Errorf("typed pub/sub: %w", err)
	}
	return bench.Result{Name: nameTyped, Ops: n, Elapsed: time.Since(start), Baseline: nameRawProto}, nil
}

func percentiles(name string, ds []time.Duration) Latency {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	at := func(q float64) time.Duration { return ds[min(len(ds)-1, int(q*float64(len(ds))))] }
	return Latency{Name: name, N: len(ds), P50: at(0.50).Round(time.Microsecond), P99: at(0.99).Round(time.Microsecond), Max: ds[len(ds)-1].Round(time.Microsecond)}
}

// requestReply measures sequential round trips, raw nats.go against the
// typed API, interleaved.
func requestReply(ctx context.Context, client, server *event.Bus, n int, probe *triplanev1.EventProbe) (Latency, Latency, error) {
	rawSubject := "bench.raw.echo"
	rs, err := server.Conn().Subscribe(rawSubject, func(m *nats.Msg) {
		var p triplanev1.EventProbe
		if proto.Unmarshal(m.Data, &p) == nil {
			out, _ := proto.Marshal(&p)
			_ = m.Respond(out)
		}
	})
	if err != nil {
		return Latency{}, Latency{}, err
	}
	defer rs.Unsubscribe()
	subject := server.MustSubject("bench", "typed", "echo")
	ts, err := event.Serve(server, subject, "", func(_ context.Context, p *triplanev1.EventProbe) (*triplanev1.EventProbe, error) {
		return p, nil
	})
	if err != nil {
		return Latency{}, Latency{}, err
	}
	defer ts.Unsubscribe()
	if err := server.Conn().Flush(); err != nil {
		return Latency{}, Latency{}, err
	}
	raw := make([]time.Duration, 0, n)
	typed := make([]time.Duration, 0, n)
	for range n {
		t0 := time.Now()
		data, _ := proto.Marshal(probe)
		m, err := client.Conn().Request(rawSubject, data, 5*time.Second)
		if err != nil {
			return Latency{}, Latency{}, fmt.Errorf("raw request: %w", err)
		}
		var p triplanev1.EventProbe
		if err := proto.Unmarshal(m.Data, &p); err != nil {
			return Latency{}, Latency{}, err
		}
		raw = append(raw, time.Since(t0))
		t0 = time.Now()
		if _, err := event.Request[*triplanev1.EventProbe, *triplanev1.EventProbe](ctx, client, subject, probe); err != nil {
			return Latency{}, Latency{}, fmt.Errorf("typed request: %w", err)
		}
		typed = append(typed, time.Since(t0))
	}
	return percentiles("raw nats.go Request + proto by hand", raw), percentiles("typed event.Request", typed), nil
}

// rawWorkQueue: a work-queue stream filled with async publishes, consumed
// by a pull consumer acking every message; only the consuming is timed.
func rawWorkQueue(ctx context.Context, nc *nats.Conn, n int, probe *triplanev1.EventProbe, round int) (bench.Result, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return bench.Result{}, err
	}
	name := fmt.Sprintf("BENCH_RAW_WQ_%d", round)
	subject := fmt.Sprintf("bench.rawwq.%d", round)
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{subject}, Retention: jetstream.WorkQueuePolicy})
	if err != nil {
		return bench.Result{}, err
	}
	defer js.DeleteStream(context.Background(), name)
	data, _ := proto.Marshal(probe)
	for range n {
		if _, err := js.PublishAsync(subject, data); err != nil {
			return bench.Result{}, err
		}
	}
	<-js.PublishAsyncComplete()
	c, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "workers", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 1000})
	if err != nil {
		return bench.Result{}, err
	}
	var got atomic.Int64
	start := time.Now()
	cc, err := c.Consume(func(m jetstream.Msg) {
		var p triplanev1.EventProbe
		_ = proto.Unmarshal(m.Data(), &p)
		if _, err := m.Metadata(); err == nil {
			_ = m.Ack()
		}
		got.Add(1)
	}, jetstream.PullMaxMessages(256))
	if err != nil {
		return bench.Result{}, err
	}
	err = waitCount(&got, int64(n))
	elapsed := time.Since(start)
	cc.Stop()
	if err != nil {
		return bench.Result{}, fmt.Errorf("raw work queue: %w", err)
	}
	return bench.Result{Name: nameRawWQ, Ops: n, Elapsed: elapsed}, nil
}

func typedWorkQueue(ctx context.Context, b *event.Bus, n int, probe *triplanev1.EventProbe, round int) (bench.Result, error) {
	q, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, event.QueueConfig{Namespace: "bench", Component: "wq", Name: fmt.Sprintf("r%d", round)})
	if err != nil {
		return bench.Result{}, err
	}
	for range n {
		if _, err := q.EnqueueAsync(probe); err != nil {
			return bench.Result{}, err
		}
	}
	<-q.EnqueueComplete()
	var got atomic.Int64
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- q.Consume(cctx, func(context.Context, *event.Job[*triplanev1.EventProbe]) error { got.Add(1); return nil })
	}()
	err = waitCount(&got, int64(n))
	elapsed := time.Since(start)
	cancel()
	if cerr := <-done; err == nil {
		err = cerr
	}
	if err != nil {
		return bench.Result{}, fmt.Errorf("typed work queue: %w", err)
	}
	return bench.Result{Name: nameTypedWQ, Ops: n, Elapsed: elapsed, Baseline: nameRawWQ}, nil
}

// kvOps produces a worker's events: stores of 4-block chains and removals.
func kvOps(n int, emit func(i int) error) error {
	for i := range n {
		if err := emit(i); err != nil {
			return err
		}
	}
	return nil
}

func kvEvent(i int) *triplanev1.KvEvent {
	id := uint64(i + 1)
	if i%4 == 3 {
		return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: []uint64{id * 4}}}}
	}
	return &triplanev1.KvEvent{EventId: id, Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{
		BlockHashes: []uint64{id * 4, id*4 + 1, id*4 + 2, id*4 + 3}, ParentHash: proto.Uint64(id*4 - 1)}}}
}

// kvCore: a worker publishes n events over core NATS; a consumer applies
// them with gap repair; timed until the consumer has applied them all.
// With dropPercent > 0 the worker's publish path skips that share of the
// events (the ring still has them), so the consumer repairs the gaps.
func kvCore(pub, sub *event.Bus, n, round, dropPercent int) (bench.Result, error) {
	worker := fmt.Sprintf("w%d-%d", round, dropPercent)
	c, err := kvevents.NewConsumer(sub, kvevents.ConsumerConfig{Namespace: "bench", RepairBackoff: time.Millisecond})
	if err != nil {
		return bench.Result{}, err
	}
	defer c.Close()
	subject := ""
	if dropPercent > 0 {
		// The worker publishes to a side subject; a relay forwards all but
		// dropPercent of the batches.
		subject = "bench.kv.lossy." + worker
		to, _ := kvevents.EventsSubject(pub, "bench", worker)
		var k int
		rs, err := event.Subscribe(sub, subject, func(b *triplanev1.KvEventBatch) {
			k++
			if len(b.Events) > 0 && k%100 < dropPercent {
				return
			}
			_ = event.Publish(sub, to, b)
		})
		if err != nil {
			return bench.Result{}, err
		}
		defer rs.Unsubscribe()
	}
	if err := sub.Conn().Flush(); err != nil {
		return bench.Result{}, err
	}
	p, err := kvevents.NewPublisher(pub, kvevents.PublisherConfig{WorkerID: worker, Namespace: "bench", Epoch: 1,
		RingSize: n + 1, HeartbeatInterval: 10 * time.Millisecond, Subject: subject})
	if err != nil {
		return bench.Result{}, err
	}
	defer p.Close()
	start := time.Now()
	err = kvOps(n, func(i int) error {
		e := kvEvent(i)
		switch k := e.Kind.(type) {
		case *triplanev1.KvEvent_Stored:
			return p.Stored(k.Stored.BlockHashes, k.Stored.ParentHash)
		case *triplanev1.KvEvent_Removed:
			return p.Removed(k.Removed.BlockHashes)
		}
		return nil
	})
	if err != nil {
		return bench.Result{}, err
	}
	last, since := uint64(0), time.Now()
	for {
		at := c.LastEventID(worker)
		if at == uint64(n) {
			break
		}
		if at != last {
			last, since = at, time.Now()
		} else if time.Since(since) > 10*time.Second {
			return bench.Result{}, fmt.Errorf("kv events core: consumer stalled at %d of %d (%v)", at, n, c.Stats())
		}
		time.Sleep(200 * time.Microsecond)
	}
	name := nameKvCore
	if dropPercent > 0 {
		name = nameKvLossy
	}
	return bench.Result{Name: name, Ops: n, Elapsed: time.Since(start), Baseline: nameKvJS}, nil
}

// kvJetStream is the alternative design: the worker publishes each event
// batch into a JetStream stream (async, acknowledged by the server) and the
// router reads it back with an ordered consumer into the same consumer
// logic; timed until the consumer has applied all of them.
func kvJetStream(ctx context.Context, pubNC *nats.Conn, sub *event.Bus, n, round int) (bench.Result, error) {
	pjs, err := jetstream.New(pubNC)
	if err != nil {
		return bench.Result{}, err
	}
	sjs, err := jetstream.New(sub.Conn())
	if err != nil {
		return bench.Result{}, err
	}
	name := fmt.Sprintf("BENCH_KV_%d", round)
	subject := fmt.Sprintf("bench.kvjs.%d", round)
	if _, err := pjs.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{subject}, MaxMsgs: int64(n) * 2}); err != nil {
		return bench.Result{}, err
	}
	defer pjs.DeleteStream(context.Background(), name)
	oc, err := sjs.OrderedConsumer(ctx, name, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return bench.Result{}, err
	}
	// The same consumer as the core path applies the events, fed by the
	// ordered consumer instead of a subscription: only the transport
	// differs.
	kc, err := kvevents.NewConsumer(sub, kvevents.ConsumerConfig{Namespace: "bench", Subject: subject + ".unused"})
	if err != nil {
		return bench.Result{}, err
	}
	defer kc.Close()
	cc, err := oc.Consume(func(m jetstream.Msg) {
		b, err := event.Decode[*triplanev1.KvEventBatch](m.Data())
		if err != nil {
			return
		}
		kc.Ingest(b)
	})
	if err != nil {
		return bench.Result{}, err
	}
	defer cc.Stop()
	start := time.Now()
	err = kvOps(n, func(i int) error {
		data, err := proto.Marshal(&triplanev1.KvEventBatch{WorkerId: "w", Epoch: 1, HeadEventId: uint64(i + 1), Events: []*triplanev1.KvEvent{kvEvent(i)}})
		if err != nil {
			return err
		}
		_, err = pjs.PublishAsync(subject, data)
		return err
	})
	if err != nil {
		return bench.Result{}, err
	}
	select {
	case <-pjs.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		return bench.Result{}, errors.New("kv events jetstream: publishes not acknowledged")
	}
	last, since := uint64(0), time.Now()
	for at := kc.LastEventID("w"); at < uint64(n); at = kc.LastEventID("w") {
		if at != last {
			last, since = at, time.Now()
		} else if time.Since(since) > 10*time.Second {
			return bench.Result{}, fmt.Errorf("kv events jetstream: consumer stalled at %d of %d", at, n)
		}
		time.Sleep(200 * time.Microsecond)
	}
	return bench.Result{Name: nameKvJS, Ops: n, Elapsed: time.Since(start)}, nil
}
