package worker

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

// These tests hold the engine goroutine with ops of their own to order
// what reaches it; they read the mailbox's length, which only they and
// the worker under test write to.

// block queues an op that occupies the engine goroutine until release is
// called (at the latest when the test ends, so a failing test does not
// hang in Close); running is closed once the engine goroutine runs it.
func block(t *testing.T, w *Worker) (running <-chan struct{}, release func()) {
	t.Helper()
	ch, started := make(chan struct{}), make(chan struct{})
	select {
	case w.inbox <- op{fn: func() { close(started); <-ch }}:
	case <-w.done:
		t.Fatal("worker stopped")
	}
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	return started, release
}

func testBus(t *testing.T) *event.Bus {
	t.Helper()
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bus.Close)
	return bus
}

// A request whose frontend goes away while its prefix is being imported
// from a prefill worker is dropped once the import settled: it is never
// handed to the engine, which would prefill and decode it for nobody, and
// the abandoned import is not counted as a fallback. Before, the request
// was added to the engine after the import whatever its context.
func TestCancelledDuringImportIsNotAdded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bus := testBus(t)
	w, err := Start(ctx, Config{ID: "d1", Model: "m", Bus: bus, Role: RoleBoth,
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close) // after the holds' releases (cleanups run last first)
	// A prefill worker that never answers while the request waits.
	asked := make(chan struct{}, 1)
	subj, err := PrefillSubject(bus, "default", "slow")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := event.Serve(bus, subj, "", func(ctx context.Context, r *triplanev1.PrefillRequest) (*triplanev1.PrefillReply, error) {
		asked <- struct{}{}
		<-ctx.Done()
		return nil, errors.New("too late")
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	toks := make([]uint32, 32)
	for i := range toks {
		toks[i] = uint32(i + 1)
	}
	b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: toks, MaxTokens: 50, PrefillWorker: "slow"})
	s, err := stream.Open(ctx, w.Addr(), &triplanev1.StreamOpen{RequestId: "r", Payload: b}, stream.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-asked: // the blocks are reserved, the import waits for the prefill worker
	case <-ctx.Done():
		t.Fatal("the prefill worker was never asked")
	}
	// Hold the engine, then let the client go: the import gives up and
	// queues its abort behind the hold.
	running1, release1 := block(t, w)
	<-running1
	s.Close()
	planetest.Eventually(t, "the import's abort", func() bool { return len(w.inbox) == 1 })
	// A second hold behind the abort: once the abort ran, whatever the
	// handler queues next stays in the mailbox where the test sees it.
	running2, release2 := block(t, w)
	release1()
	<-running2
	gone := func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.reqs["r"] == nil
	}
	planetest.Eventually(t, "the handler to end or queue the request", func() bool { return gone() || len(w.inbox) > 0 })
	if !gone() || len(w.inbox) > 0 {
		t.Fatal("the request was handed to the engine after its frontend went away")
	}
	release2()
	if st := w.Stats(); st.Fallbacks != 0 || st.RemotePrefills != 0 {
		t.Fatalf("stats %+v: an abandoned import is neither a fallback nor a remote prefill", st)
	}
	// The reservation was given up: no block is held.
	planetest.Eventually(t, "the engine to hold no block", func() bool {
		var used int
		if err := w.onEngine(func() { used = w.eng.Load().BlocksUsed }); err != nil {
			t.Fatal(err)
		}
		return used == 0
	})
	w.mu.Lock()
	free := len(w.slots)
	w.mu.Unlock()
	if free != w.cfg.StagingBlocks {
		t.Fatalf("%d of %d staging slots free", free, w.cfg.StagingBlocks)
	}
}

// A cancel that finds the mailbox full is not lost: the engine cancels the
// request before it runs anything else. Before, the cancel was dropped
// (counted) and the engine generated for a client that had left.
func TestCancelSurvivesAFullMailbox(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A mailbox of one op, and a request that would run for a minute.
	w, err := Start(ctx, Config{ID: "w1", Model: "m", Bus: testBus(t), Mailbox: 1, Role: RoleAggregated,
		Engine: mocker.Config{BlockSize: 16, NumBlocks: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close) // after the holds' releases (cleanups run last first)
	b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: []uint32{1, 2, 3}, MaxTokens: 10000})
	s, err := stream.Open(ctx, w.Addr(), &triplanev1.StreamOpen{RequestId: "r", Payload: b}, stream.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil { // the first token: the request runs
		t.Fatal(err)
	}
	// Hold the engine goroutine and fill the mailbox behind it; the second
	// hold reports whether the engine still has the request when it runs.
	running1, release1 := block(t, w)
	<-running1
	idle := make(chan bool, 1)
	ch := make(chan struct{})
	w.inbox <- op{fn: func() { idle <- w.eng.Idle(); <-ch }}
	t.Cleanup(func() { close(ch) })
	if len(w.inbox) != cap(w.inbox) {
		t.Fatalf("mailbox holds %d of %d", len(w.inbox), cap(w.inbox))
	}
	s.Close() // the client goes away: the handler cancels and ends
	planetest.Eventually(t, "the handler to end", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.reqs["r"] == nil
	})
	release1()
	if !<-idle {
		t.Fatal("the engine still runs the request after its client went away and the mailbox was full")
	}
	if v := planetest.CounterValue(t, w.metrics.droppedCancels); v != 0 {
		t.Fatalf("%v cancels dropped", v)
	}
	// The load the worker reports follows (no step comes to refresh it).
	planetest.Eventually(t, "the reported load to drop the cancelled request", func() bool { return w.Load().Active == 0 })
}
