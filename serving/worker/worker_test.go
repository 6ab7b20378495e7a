package worker_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/serving/worker"
)

func startWorker(t *testing.T) *worker.Worker {
	t.Helper()
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := worker.Start(context.Background(), worker.Config{ID: "w1", Model: "m", Bus: bus,
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return w
}

// generate runs one request and returns its tokens, final reason and error.
func generate(t *testing.T, w *worker.Worker, payload []byte) (int, string, string) {
	n, reason, msg, _ := generateCode(t, w, payload)
	return n, reason, msg
}

// generateCode is generate that also returns the final frame's code.
func generateCode(t *testing.T, w *worker.Worker, payload []byte) (int, string, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := stream.Open(ctx, w.Addr(), &triplanev1.StreamOpen{RequestId: "r", Payload: payload}, stream.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n := 0
	for {
		fr, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(fr.Data) > 0 {
			c := &triplanev1.GenerateChunk{}
			if err := proto.Unmarshal(fr.Data, c); err != nil {
				t.Fatal(err)
			}
			n += len(c.Tokens)
		}
		if fr.Final {
			return n, fr.Reason, fr.Error, fr.Code
		}
	}
}

func TestWorkerRefusesBadRequestsAndKeepsServing(t *testing.T) {
	w := startWorker(t)
	good := func(r *triplanev1.GenerateRequest) []byte { b, _ := proto.Marshal(r); return b }
	for _, tc := range []struct {
		name    string
		payload []byte
		want    string
	}{
		{"not protobuf", []byte{0xff, 0xff, 0xff}, "not a GenerateRequest"},
		{"empty id", good(&triplanev1.GenerateRequest{Tokens: []uint32{1}, MaxTokens: 1}), "empty request id"},
		{"empty prompt", good(&triplanev1.GenerateRequest{RequestId: "a", MaxTokens: 1}), "empty prompt"},
		{"zero max", good(&triplanev1.GenerateRequest{RequestId: "a", Tokens: []uint32{1}}), "at least 1"},
		{"above limit", good(&triplanev1.GenerateRequest{RequestId: "a", Tokens: []uint32{1}, MaxTokens: 51}), "limit 50"},
		{"wrong model", good(&triplanev1.GenerateRequest{RequestId: "a", Tokens: []uint32{1}, MaxTokens: 1, Model: "x"}), "not served here"},
	} {
		n, _, errMsg := generate(t, w, tc.payload)
		if n != 0 || !strings.Contains(errMsg, tc.want) {
			t.Errorf("%s: %d tokens, error %q; want %q", tc.name, n, errMsg, tc.want)
		}
	}
	n, reason, errMsg := generate(t, w, good(&triplanev1.GenerateRequest{RequestId: "ok", Tokens: []uint32{1, 2, 3, 4, 5}, MaxTokens: 7, Model: "m"}))
	if n != 7 || reason != "length" || errMsg != "" {
		t.Fatalf("good request after bad ones: %d tokens, %q, %q", n, reason, errMsg)
	}
	// Its prompt's full block is announced as a KV event.
	if len(w.Blocks()) == 0 {
		t.Fatal("no KV blocks announced")
	}
}

func TestDrainRefusesNewRequests(t *testing.T) {
	w := startWorker(t)
	if err := w.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "late", Tokens: []uint32{1}, MaxTokens: 1})
	if _, _, errMsg, code := generateCode(t, w, b); !strings.Contains(errMsg, "draining") || code != worker.CodeDraining {
		t.Fatalf("draining worker answered %q (code %q)", errMsg, code)
	}
	if _, _, _, code := generateCode(t, w, []byte{0xff}); code != worker.CodeBadRequest {
		t.Fatalf("bad payload code %q", code)
	}
}

// A worker listening on every interface publishes an address peers can
// dial, not 0.0.0.0.
func TestWorkerAdvertisesADialableAddress(t *testing.T) {
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := worker.Start(context.Background(), worker.Config{ID: "w1", Model: "m", Bus: bus, ListenHost: "0.0.0.0", AdvertiseHost: "127.0.0.1",
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	if !strings.HasPrefix(w.Addr(), "127.0.0.1:") {
		t.Fatalf("advertised %s", w.Addr())
	}
	payload, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: []uint32{1, 2, 3}, MaxTokens: 3})
	if n, reason, msg := generate(t, w, payload); n != 3 || msg != "" {
		t.Fatalf("%d tokens, %q %q", n, reason, msg)
	}
}

// Only workers that take blocks open block receivers; an unknown role is
// refused with the roles it could be.
func TestRolesOpenOnlyWhatTheyUse(t *testing.T) {
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	start := func(role string) (*worker.Worker, error) {
		return worker.Start(context.Background(), worker.Config{ID: "w-" + role, Model: "m", Bus: bus, Role: role,
			Engine: mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}, MaxTokens: 50})
	}
	for role, want := range map[string]int{worker.RoleAggregated: 1, worker.RoleBoth: 2} {
		w, err := start(role)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(w.Close)
		eps := w.Endpoints()
		if len(eps) < want || (role == worker.RoleAggregated && len(eps) != 1) {
			t.Fatalf("%s worker serves %v", role, eps)
		}
		if eps[0].Protocol != triplanev1.Protocol_PROTOCOL_RESPONSE_STREAM {
			t.Fatalf("%s worker's first endpoint is %v", role, eps[0])
		}
		payload, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: []uint32{1, 2, 3}, MaxTokens: 3})
		if n, _, msg := generate(t, w, payload); n != 3 || msg != "" {
			t.Fatalf("%s worker: %d tokens, %q", role, n, msg)
		}
		if role == worker.RoleAggregated {
			// Asked to take a prefill worker's blocks, it has nowhere to
			// put them: it prefills itself and counts the fallback.
			remote, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r2", Tokens: []uint32{1, 2, 3, 4, 5, 6, 7, 8}, MaxTokens: 3, PrefillWorker: "p0"})
			if n, _, msg := generate(t, w, remote); n != 3 || msg != "" {
				t.Fatalf("%s worker, remote prefill asked: %d tokens, %q", role, n, msg)
			}
			if st := w.Stats(); st.Fallbacks != 1 || st.RemotePrefills != 0 {
				t.Fatalf("stats %+v, want one fallback", st)
			}
		}
	}
	if _, err := start("both-ways"); err == nil || !strings.Contains(err.Error(), worker.RoleAggregated) {
		t.Fatalf("unknown role: %v", err)
	}
}

// A worker whose waiting request cannot be admitted while an import holds
// blocks waits for something to change instead of stepping the engine in
// a loop (it ran millions of empty steps a second on one core).
func TestEngineWaitsWhenNothingCanRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	reg := prometheus.NewRegistry()
	w, err := worker.Start(ctx, worker.Config{ID: "w1", Model: "m", Bus: bus, Registerer: reg, Role: worker.RoleBoth,
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 64}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// A prefill worker that answers only at the end: the decode worker
	// holds the prompt's blocks for the import meanwhile.
	release := make(chan struct{})
	defer close(release)
	subj, err := worker.PrefillSubject(bus, "default", "slow")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := event.Serve(bus, subj, "", func(ctx context.Context, r *triplanev1.PrefillRequest) (*triplanev1.PrefillReply, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, errors.New("not now")
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	open := func(id string, n int, prefill string) *stream.Stream {
		toks := make([]uint32, n)
		for i := range toks {
			toks[i] = uint32(len(id)*1000 + i)
		}
		b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: id, Tokens: toks, MaxTokens: 1, PrefillWorker: prefill})
		s, err := stream.Open(ctx, w.Addr(), &triplanev1.StreamOpen{RequestId: id, Payload: b}, stream.ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s1 := open("a", 64, "slow")
	defer s1.Close()
	for w.Load().BlocksUsed == 0 {
		if ctx.Err() != nil {
			t.Fatal("the first request never reserved its import")
		}
		time.Sleep(5 * time.Millisecond)
	}
	s2 := open("bb", 232, "")
	defer s2.Close()
	for w.Load().Waiting == 0 {
		if ctx.Err() != nil {
			t.Fatal("the second request never waited")
		}
		time.Sleep(5 * time.Millisecond)
	}
	steps := func() float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "triplane_worker_engine_steps_total" {
				return mf.GetMetric()[0].GetCounter().GetValue()
			}
		}
		t.Fatal("no steps metric")
		return 0
	}
	before := steps()
	time.Sleep(300 * time.Millisecond) // an absence can only be watched for a while
	if n := steps() - before; n > 1000 {
		t.Fatalf("%.0f engine steps in 300 ms with nothing able to run", n)
	}
}

// A router's view of the worker, fed its batches (an engine iteration's
// events in one), ends equal to the worker's blocks.
func TestRouterViewFollowsTheWorkersBatches(t *testing.T) {
	n := planetest.StartNATS(t)
	newBus := func() *event.Bus {
		b, err := event.New(n.Connect(t), event.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		return b
	}
	rb := newBus()
	c, err := kvevents.NewConsumer(rb, kvevents.ConsumerConfig{Namespace: "default"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Batches of several events are what this test is about: count them.
	subj, err := kvevents.EventsSubject(rb, "default", "w1")
	if err != nil {
		t.Fatal(err)
	}
	var several atomic.Int64
	if _, err := event.Subscribe(rb, subj, func(b *triplanev1.KvEventBatch) {
		if len(b.Events) > 1 {
			several.Add(1)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := rb.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	// A small pool: later prompts evict earlier blocks in the iteration
	// that stores theirs.
	w, err := worker.Start(context.Background(), worker.Config{ID: "w1", Model: "m", Bus: newBus(),
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 24, SpeedUp: 100}, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for i := range 12 {
		toks := make([]uint32, 20+4*(i%3))
		for j := range toks {
			toks[j] = uint32(i*1000 + j)
		}
		b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: fmt.Sprint("r", i), Tokens: toks, MaxTokens: 8, Model: "m"})
		if n, _, msg := generate(t, w, b); n != 8 {
			t.Fatalf("request %d: %d tokens, %q", i, n, msg)
		}
	}
	// several comes from its own subscription: waited for too (none would
	// mean the test did not test batching).
	planetest.Eventually(t, "the router's view to equal the worker's blocks, after batches of several events", func() bool {
		got, _ := c.Blocks("w1")
		want := w.Blocks()
		return len(want) > 0 && maps.Equal(got, want) && several.Load() > 0
	})
	t.Logf("%d batches of several events; consumer %v", several.Load(), c.Stats())
}

// A worker started again in the same process with the same registry (a
// restart) registers its metrics afresh: the first one's are taken off at
// Close. Registering them on New and never off panicked here. Two live
// workers with different ids share a registry; a second live one with
// the same id is refused, not a panic.
func TestRestartOnTheSameRegistry(t *testing.T) {
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	reg := prometheus.NewRegistry()
	start := func(id string) (*worker.Worker, error) {
		return worker.Start(context.Background(), worker.Config{ID: id, Model: "m", Bus: bus, Registerer: reg,
			Role: worker.RoleAggregated, Engine: mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}, MaxTokens: 50})
	}
	steps := func(id string) (float64, bool) {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "triplane_worker_engine_steps_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "worker" && l.GetValue() == id {
						return m.GetCounter().GetValue(), true
					}
				}
			}
		}
		return 0, false
	}
	payload, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: []uint32{1, 2, 3}, MaxTokens: 3})
	w1, err := start("w1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := start("w2")
	if err != nil {
		t.Fatalf("a second worker with another id on the same registry: %v", err)
	}
	defer other.Close()
	if _, err := start("w1"); !errors.As(err, &prometheus.AlreadyRegisteredError{}) {
		t.Fatalf("a second live worker w1 on the same registry: %v", err)
	}
	// The refused one took nothing of the live one's off the registry.
	if n, _, msg := generate(t, w1, payload); n != 3 || msg != "" {
		t.Fatalf("first run: %d tokens, %q", n, msg)
	}
	if v, ok := steps("w1"); !ok || v == 0 {
		t.Fatalf("first run's steps: %v (registered %v)", v, ok)
	}
	w1.Close()
	w1.Close() // twice: must not take the successor's series off
	if _, ok := steps("w1"); ok {
		t.Fatal("a closed worker's series are still exported")
	}
	again, err := start("w1")
	if err != nil {
		t.Fatalf("restart on the same registry: %v", err)
	}
	defer again.Close()
	w1.Close()
	if n, _, msg := generate(t, again, payload); n != 3 || msg != "" {
		t.Fatalf("restarted: %d tokens, %q", n, msg)
	}
	if v, ok := steps("w1"); !ok || v == 0 {
		t.Fatalf("restarted worker's steps: %v (registered %v)", v, ok)
	}
	if _, ok := steps("w2"); !ok {
		t.Fatal("the other worker's series went with w1's")
	}
}
