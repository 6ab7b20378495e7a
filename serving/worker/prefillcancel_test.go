package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/all"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

// A client that leaves while its prompt waits for a prefill worker: the
// decode worker tells the prefill worker, which stops the prefill and
// frees its engine, and refuses the session when it is asked again (a
// request that arrives after its cancel). Before, the prefill worker went
// on until the prefill's deadline, a minute, and then sent the blocks.
func TestAbandonedPrefillStopsOnThePrefillWorker(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc := planetest.StartNATS(t).Connect(t)
	bus, err := event.New(nc, event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bus.Close)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	host, err := actors.NewHost(actors.HostConfig{Journal: j, Registry: all.Registry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Stop(context.Background()) })
	eng := mocker.Config{BlockSize: 4, NumBlocks: 64, SpeedUp: 100}
	pre, err := Start(ctx, Config{ID: "p1", Model: "m", Bus: bus, Role: RolePrefill, Host: host, Engine: eng, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pre.Close)
	dec, err := Start(ctx, Config{ID: "d1", Model: "m", Bus: bus, Role: RoleDecode, Host: host, Engine: eng, MaxTokens: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dec.Close)

	// Bad cancels first, then one of a session nobody runs: the bus
	// delivers them in order, so once the last is remembered the others
	// were handled (and must have changed nothing).
	csubj, err := PrefillCancelSubject(bus, "default", "p1")
	if err != nil {
		t.Fatal(err)
	}
	if err := event.Publish(bus, csubj, &triplanev1.PrefillCancel{}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish(csubj, []byte("not a protobuf message \xff\xff")); err != nil {
		t.Fatal(err)
	}
	if err := event.Publish(bus, csubj, &triplanev1.PrefillCancel{SessionId: "kv-nobody"}); err != nil {
		t.Fatal(err)
	}
	remembered := func(session string) bool {
		pre.runs.mu.Lock()
		defer pre.runs.mu.Unlock()
		_, ok := pre.runs.recent[session]
		return ok
	}
	planetest.Eventually(t, "the cancel of a session nobody runs remembered", func() bool { return remembered("kv-nobody") })
	if remembered("") || pre.Stats().PrefillsCancelled != 0 {
		t.Fatalf("a cancel without a session was taken: stats %+v", pre.Stats())
	}

	// Hold the prefill worker's engine: the prefill waits for it.
	running, release := block(t, pre)
	<-running
	toks := make([]uint32, 32)
	for i := range toks {
		toks[i] = uint32(i + 1)
	}
	b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: "r", Tokens: toks, MaxTokens: 5, PrefillWorker: "p1"})
	s, err := stream.Open(ctx, dec.Addr(), &triplanev1.StreamOpen{RequestId: "r", Payload: b}, stream.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	planetest.Eventually(t, "the prefill waiting on the prefill worker", func() bool {
		pre.mu.Lock()
		defer pre.mu.Unlock()
		return pre.reqs["prefill-r"] != nil
	})
	s.Close()
	// The prefill waits for the engine to take it; the cancel reaches it
	// there, and it ends once the engine answers.
	planetest.Eventually(t, "the cancel at the prefill worker", func() bool { return remembered("kv-d1-r") })
	// Counted once published: the prefill worker may see it first.
	planetest.Eventually(t, "the cancel counted as sent", func() bool { return dec.Stats().PrefillCancelsSent > 0 })
	if st := dec.Stats(); st.PrefillCancelsSent != 1 || st.Fallbacks != 0 || st.RemotePrefills != 0 {
		t.Fatalf("decode worker stats %+v: want one cancel sent, no fallback", st)
	}
	release()
	planetest.Eventually(t, "the prefill cancelled", func() bool { return pre.Stats().PrefillsCancelled == 1 })
	planetest.Eventually(t, "the prefill worker's engine idle", func() bool {
		l := pre.Load()
		return l.Active == 0 && l.Waiting == 0 && l.BlocksUsed == 0
	})
	if st := pre.Stats(); st.Exported != 0 {
		t.Fatalf("prefill worker stats %+v: blocks sent for a cancelled prefill", st)
	}

	// The same session asked again is refused before any work; another
	// session is served as before (its transfer fails: nobody listens at
	// the address, which is not what is checked here).
	ask := func(session string) error {
		psubj, err := PrefillSubject(bus, "default", "p1")
		if err != nil {
			t.Fatal(err)
		}
		hashes := mocker.BlockHashes(toks, 4)[:2]
		d := &triplanev1.DataDescriptor{Region: 1, Offset: 0, Length: 16}
		_, err = event.Request[*triplanev1.PrefillRequest, *triplanev1.PrefillReply](ctx, bus, psubj,
			&triplanev1.PrefillRequest{RequestId: "r", Tokens: toks, BlockHashes: hashes, SessionId: session,
				Destinations: []*triplanev1.DataDescriptor{d, d}, Peer: &triplanev1.DataPeer{TcpAddr: "127.0.0.1:1"},
				DeadlineUnixNanos: time.Now().Add(time.Second).UnixNano()})
		return err
	}
	// The handler's error comes back as text.
	if err := ask("kv-d1-r"); err == nil || !strings.Contains(err.Error(), "cancelled by the decode worker") {
		t.Fatalf("a cancelled session asked again: %v", err)
	}
	if n := pre.Stats().PrefillsCancelled; n != 2 {
		t.Fatalf("%d prefills cancelled, want 2", n)
	}
	if err := ask("kv-d1-other"); err != nil && strings.Contains(err.Error(), "cancelled") {
		t.Fatalf("another session refused: %v", err)
	}
}

// The cancels remembered for sessions not running are bounded: the oldest
// goes first.
func TestPrefillCancelsRememberedAreBounded(t *testing.T) {
	var p prefillRuns
	ctx, stop, err := p.start(context.Background(), "running")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if n := p.cancel("running"); n != 1 || !errors.Is(context.Cause(ctx), ErrPrefillCancelled) {
		t.Fatalf("cancel stopped %d, cause %v", n, context.Cause(ctx))
	}
	for i := range recentCancels + 10 {
		p.cancel(fmt.Sprintf("s%d", i))
	}
	if len(p.recent) != recentCancels || len(p.order) != recentCancels {
		t.Fatalf("%d cancels remembered (%d in order), at most %d", len(p.recent), len(p.order), recentCancels)
	}
	if _, _, err := p.start(context.Background(), "running"); err != nil {
		t.Fatalf("the oldest cancel was not the one forgotten: %v", err)
	}
	last := fmt.Sprintf("s%d", recentCancels+9)
	if _, _, err := p.start(context.Background(), last); !errors.Is(err, ErrPrefillCancelled) {
		t.Fatalf("a cancelled session started: %v", err)
	}
	// Two runs of one session: a cancel stops both, and each run's end
	// removes only itself.
	var q prefillRuns
	c1, stop1, _ := q.start(context.Background(), "twice")
	c2, stop2, _ := q.start(context.Background(), "twice")
	stop1()
	if c2.Err() != nil || len(q.running["twice"]) != 1 {
		t.Fatalf("the end of one run touched the other: %v, %d running", c2.Err(), len(q.running["twice"]))
	}
	if n := q.cancel("twice"); n != 1 || !errors.Is(context.Cause(c2), ErrPrefillCancelled) || errors.Is(context.Cause(c1), ErrPrefillCancelled) {
		t.Fatalf("cancel stopped %d", n)
	}
	stop2()
	if len(q.running) != 0 {
		t.Fatalf("%d sessions still running", len(q.running))
	}
}
