package actors_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

type env struct {
	j     *journal.Journal
	snaps *journal.Snapshots
	ctx   context.Context
}

func newEnv(t *testing.T) *env {
	t.Helper()
	n := planetest.StartNATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &env{j: j, snaps: s, ctx: ctx}
}

func (e *env) host(t *testing.T, mod ...func(*actors.HostConfig)) *actors.Host {
	t.Helper()
	cfg := actors.HostConfig{Journal: e.j, Snapshots: e.snaps, Registry: actors.NewRegistry(ledger.Machine{}),
		BackoffMin: time.Millisecond, BackoffMax: 10 * time.Millisecond}
	for _, m := range mod {
		m(&cfg)
	}
	h, err := actors.NewHost(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop(context.Background()) })
	return h
}

var acct = actors.Address{Kind: ledger.Kind, ID: "acct-1"}

func ask(t *testing.T, ctx context.Context, h *actors.Host, addr actors.Address, msg proto.Message) *triplanev1.LedgerReply {
	t.Helper()
	r, err := h.Request(ctx, addr, msg)
	if err != nil {
		t.Fatalf("%T: %v", msg, err)
	}
	return r.(*triplanev1.LedgerReply)
}

func TestHostPersistsRepliesAndRecovers(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 100})
	if _, err := h.Request(e.ctx, acct, &triplanev1.LedgerWithdraw{Amount: 500}); !errors.Is(err, ledger.ErrInsufficient) {
		t.Fatalf("overdraft: %v, want ErrInsufficient", err)
	}
	if _, err := h.Request(e.ctx, acct, &triplanev1.LedgerDeposit{Amount: -1}); err == nil {
		t.Fatal("negative deposit accepted")
	}
	r := ask(t, e.ctx, h, acct, &triplanev1.LedgerSplit{Amounts: []int64{1, 2, 3}})
	if r.Balance != 106 || r.Applied != 4 {
		t.Fatalf("after split: %v", r)
	}
	if pos, _ := e.j.Highest(e.ctx, acct.Kind, acct.ID); pos.Seq != 4 {
		t.Fatalf("journal highest = %d, want 4 (rejections write nothing)", pos.Seq)
	}
	if err := h.Stop(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Request(e.ctx, acct, &triplanev1.LedgerGet{}); !errors.Is(err, actors.ErrStopped) {
		t.Fatalf("request to a stopped host: %v", err)
	}

	h2 := e.host(t)
	if r := ask(t, e.ctx, h2, acct, &triplanev1.LedgerGet{}); r.Balance != 106 || r.Applied != 4 {
		t.Fatalf("after restart: %v", r)
	}
}

func TestHostRepliesSurviveConcurrentPersists(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	const n = 200
	var wg sync.WaitGroup
	seen := make([]bool, n+1)
	var mu sync.Mutex
	for i := range n {
		wg.Go(func() {
			addr := acct
			r, err := h.Request(e.ctx, addr, &triplanev1.LedgerDeposit{Amount: int64(i + 1)})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if seen[r.(*triplanev1.LedgerReply).Applied] {
				t.Errorf("two replies with applied=%d", r.(*triplanev1.LedgerReply).Applied)
			}
			seen[r.(*triplanev1.LedgerReply).Applied] = true
		})
	}
	wg.Wait()
	if r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{}); r.Applied != n || r.Balance != n*(n+1)/2 {
		t.Fatalf("state after %d concurrent deposits: %v", n, r)
	}
}

func TestHostSnapshotsEveryNAndOnStop(t *testing.T) {
	e := newEnv(t)
	h := e.host(t, func(c *actors.HostConfig) { c.SnapshotEvery = 5 })
	for range 12 {
		ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 1})
	}
	if err := h.Stop(e.ctx); err != nil {
		t.Fatal(err)
	}
	s, err := e.snaps.Load(acct.Kind, acct.ID, ledger.Machine{}.SchemaVersion())
	if err != nil || s.Seq != 12 {
		t.Fatalf("snapshot after clean stop: %v %v, want seq 12", s, err)
	}
	r, err := actors.Recover(e.ctx, e.j, e.snaps, ledger.Machine{}, acct.ID, nil)
	if err != nil || r.FromSnapshot != 12 || r.Replayed != 0 {
		t.Fatalf("recover: %+v %v, want from snapshot 12 with nothing replayed", r, err)
	}
	// With the newest snapshot corrupt, recovery uses the older one (10)
	// and replays the rest; the state is the same.
	if err := e.snaps.Corrupt(acct.Kind, acct.ID); err != nil {
		t.Fatal(err)
	}
	r2, err := actors.Recover(e.ctx, e.j, e.snaps, ledger.Machine{}, acct.ID, nil)
	if err != nil || r2.FromSnapshot != 10 || r2.Replayed != 2 || !proto.Equal(r.State, r2.State) {
		t.Fatalf("recover with a corrupt newest snapshot: %+v %v", r2, err)
	}
	full, err := actors.Recover(e.ctx, e.j, nil, ledger.Machine{}, acct.ID, nil)
	if err != nil || full.Replayed != 12 || !proto.Equal(full.State, r.State) {
		t.Fatalf("recover from the journal alone: %+v %v", full, err)
	}
}

func TestHostPersistConflictRestartsAndRecovers(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 10})
	// Another process writes to the same actor behind the host's back.
	pos, err := e.j.Highest(e.ctx, acct.Kind, acct.ID)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := actors.NewBatch("foreign", time.Now(), []proto.Message{&triplanev1.LedgerDeposited{Amount: 1000}})
	if _, err := e.j.Append(e.ctx, acct.Kind, acct.ID, pos, b); err != nil {
		t.Fatal(err)
	}
	_, err = h.Request(e.ctx, acct, &triplanev1.LedgerDeposit{Amount: 5})
	if !errors.Is(err, actors.ErrPersist) || !errors.Is(err, journal.ErrConflict) {
		t.Fatalf("write after a foreign write: %v, want ErrPersist wrapping ErrConflict", err)
	}
	// The actor restarts and recovers, now including the foreign event.
	r := ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 5})
	if r.Balance != 1015 || r.Applied != 3 {
		t.Fatalf("after restart: %v, want balance 1015 applied 3", r)
	}
}

func TestHostTimers(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	ask(t, e.ctx, h, acct, &triplanev1.LedgerScheduleInterest{Amount: 7, DelayMillis: 1})
	for {
		r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{})
		if r.Balance == 7 {
			break
		}
		select {
		case <-e.ctx.Done():
			t.Fatal("interest timer never fired")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func TestHostRejectsUnknownKindAndBadID(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	if _, err := h.Request(e.ctx, actors.Address{Kind: "nope", ID: "x"}, &triplanev1.LedgerGet{}); err == nil {
		t.Error("unknown kind accepted")
	}
	if _, err := h.Request(e.ctx, actors.Address{Kind: ledger.Kind, ID: "a.b"}, &triplanev1.LedgerGet{}); !errors.Is(err, journal.ErrBadName) {
		t.Errorf("bad id: %v", err)
	}
}

// Stopping the host with commands queued and persists in flight answers
// every request (none is left to time out) and stops cleanly.
func TestHostStopAnswersEveryQueuedCommand(t *testing.T) {
	e := newEnv(t)
	h := e.host(t, func(c *actors.HostConfig) { c.RequestTimeout = time.Minute })
	ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{}) // spawn and recover first
	const n = 400
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := h.Request(e.ctx, acct, &triplanev1.LedgerDeposit{Amount: int64(i + 1)})
			errs <- err
		}()
	}
	if err := h.Stop(e.ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	var ok, stopped int
	for range n {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, actors.ErrStopped):
			stopped++
		default:
			t.Errorf("request ended with %v; want a reply or ErrStopped", err)
		}
	}
	pos, _ := e.j.Highest(e.ctx, acct.Kind, acct.ID)
	if uint64(ok) != pos.Seq {
		t.Errorf("%d requests acknowledged, journal holds %d events", ok, pos.Seq)
	}
	t.Logf("%d acknowledged, %d refused as stopped", ok, stopped)
}

// A snapshot from another journal (its position lies past this journal's
// end) is ignored.
func TestRecoverIgnoresSnapshotPastTheJournal(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	for range 3 {
		ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 1})
	}
	if err := h.Stop(e.ctx); err != nil {
		t.Fatal(err)
	}
	m := ledger.Machine{}
	foreign, err := actors.NewSnapshot(m, acct.ID, &triplanev1.LedgerState{Balance: 999, Applied: 3},
		journal.Position{Seq: 3, Stream: 5000}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.snaps.Save(foreign); err != nil {
		t.Fatal(err)
	}
	r, err := actors.Recover(e.ctx, e.j, e.snaps, m, acct.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.State.(*triplanev1.LedgerState); got.Balance != 3 || r.SnapshotSkipped != "past_journal_end" {
		t.Fatalf("recovered %v from a foreign snapshot (skipped: %q)", got, r.SnapshotSkipped)
	}
	// A host counts the skipped snapshot.
	met := actors.NewMetrics(nil)
	h2 := e.host(t, func(c *actors.HostConfig) { c.Metrics = met })
	ask(t, e.ctx, h2, acct, &triplanev1.LedgerGet{})
	if n := planetest.CounterValue(t, met.SnapshotsSkipped("past_journal_end")); n != 1 {
		t.Fatalf("snapshots skipped: %v, want 1", n)
	}
}

// A full mailbox refuses commands with ErrOverloaded instead of blocking
// the sender; every request ends with a reply or that error.
func TestHostMailboxBoundRefusesInsteadOfBlocking(t *testing.T) {
	e := newEnv(t)
	h := e.host(t, func(c *actors.HostConfig) { c.MailboxSize = 1 })
	ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{})
	const n = 300
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := h.Request(e.ctx, acct, &triplanev1.LedgerDeposit{Amount: int64(i + 1)})
			errs <- err
		}()
	}
	var ok, overloaded int
	for range n {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, actors.ErrOverloaded):
			overloaded++
		default:
			t.Errorf("request ended with %v", err)
		}
	}
	r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{})
	if r.Applied != uint64(ok) {
		t.Fatalf("%d acknowledged but %d applied", ok, r.Applied)
	}
	t.Logf("%d applied, %d refused as overloaded", ok, overloaded)
}

// A released actor is stopped (its memory freed) and comes back with its
// state on the next command.
func TestHostReleaseAndRecover(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 70})
	if err := h.Release(e.ctx, acct); err != nil {
		t.Fatal(err)
	}
	if err := h.Release(e.ctx, acct); err != nil { // not running: nothing to do
		t.Fatal(err)
	}
	if r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{}); r.Balance != 70 {
		t.Fatalf("balance after release %d, want 70", r.Balance)
	}
}

// Commands sent while an actor is being released are answered: they wait
// for the release and reach the actor recovered afresh.
func TestHostReleaseUnderConcurrentCommands(t *testing.T) {
	e := newEnv(t)
	h := e.host(t)
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 3})
	for round := range 20 {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
				defer cancel()
				if _, err := h.Request(ctx, acct, &triplanev1.LedgerGet{}); err != nil {
					errs <- err
				}
			}()
		}
		if err := h.Release(e.ctx, acct); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	if r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{}); r.Balance != 3 {
		t.Fatalf("balance %d after releases, want 3", r.Balance)
	}
}

// panicky is the ledger with bugs: Decide panics on a deposit of 13, Apply
// on a deposit of 666.
type panicky struct{ ledger.Machine }

func (m panicky) Decide(state proto.Message, cmd actors.Command) actors.Decision {
	if d, ok := cmd.Msg.(*triplanev1.LedgerDeposit); ok && d.Amount == 13 {
		panic("unlucky")
	}
	return m.Machine.Decide(state, cmd)
}

func (m panicky) Apply(state, ev proto.Message) error {
	if d, ok := ev.(*triplanev1.LedgerDeposited); ok && d.Amount == 666 {
		var nilMap map[string]int
		nilMap["boom"]++
	}
	return m.Machine.Apply(state, ev)
}

// A machine that panics does not take the process down or leave its
// callers waiting: a panicking Decide refuses that command, a panicking
// Apply fails the batch (the actor restarts); either way the caller gets
// an error that names the panic, and the actor serves the next command.
func TestHostMachinePanicsAreErrors(t *testing.T) {
	e := newEnv(t)
	h := e.host(t, func(c *actors.HostConfig) { c.Registry = actors.NewRegistry(panicky{}) })
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 100})
	for _, amount := range []int64{13, 666} {
		ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
		_, err := h.Request(ctx, acct, &triplanev1.LedgerDeposit{Amount: amount})
		cancel()
		if !errors.Is(err, actors.ErrMachinePanic) || errors.Is(err, actors.ErrPersist) {
			t.Fatalf("deposit of %d: %v, want the panic as a definite error (not 'outcome unknown')", amount, err)
		}
		if !bytes.Contains(actors.PanicStack(err), []byte("panicky")) {
			t.Fatalf("deposit of %d: the panic's stack does not show the machine:\n%s", amount, actors.PanicStack(err))
		}
	}
	if r := ask(t, e.ctx, h, acct, &triplanev1.LedgerGet{}); r.Balance != 100 {
		t.Fatalf("after the panics: %v", r)
	}
	// Folding events (replay) reports the panic too.
	if _, err := actors.Fold(panicky{}, "x", &triplanev1.LedgerDeposited{Amount: 666}); !errors.Is(err, actors.ErrMachinePanic) {
		t.Fatalf("fold: %v", err)
	}
}

// slowStart is the ledger machine whose actor "slow" does not finish
// recovering until release is closed.
type slowStart struct {
	ledger.Machine
	started chan struct{}
	release chan struct{}
}

func (m slowStart) Initial(id string) proto.Message {
	if id == "slow" {
		close(m.started)
		<-m.release
	}
	return m.Machine.Initial(id)
}

// slowHost is a host of the slowStart machine, with requests that wait
// as long as their contexts let them.
func (e *env) slowHost(t *testing.T) (slowStart, *actors.Host) {
	m := slowStart{started: make(chan struct{}), release: make(chan struct{})}
	return m, e.host(t, func(c *actors.HostConfig) {
		c.Registry = actors.NewRegistry(m)
		c.RequestTimeout = time.Hour
	})
}

// Actors are spawned one at a time, recovery included: a request that
// waits behind a long recovery ends with its context, not after a fixed
// spawn timeout of its own, and the actor still comes up afterwards.
func TestRequestWaitingForASpawnEndsWithItsContext(t *testing.T) {
	e := newEnv(t)
	m, h := e.slowHost(t)
	slow := actors.Address{Kind: ledger.Kind, ID: "slow"}
	done := make(chan error, 1)
	go func() {
		_, err := h.Request(e.ctx, slow, &triplanev1.LedgerDeposit{Amount: 1})
		done <- err
	}()
	<-m.started
	ctx, cancel := context.WithTimeout(e.ctx, 50*time.Millisecond)
	defer cancel()
	_, err := h.Request(ctx, acct, &triplanev1.LedgerDeposit{Amount: 1})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "spawn") {
		t.Fatalf("a request behind a recovery: %v, want its context's deadline while spawning", err)
	}
	close(m.release)
	if err := <-done; err != nil {
		t.Fatalf("the slow actor: %v", err)
	}
	ask(t, e.ctx, h, acct, &triplanev1.LedgerDeposit{Amount: 1})
}

// A request waiting for its actor's spawn when the host stops gets
// ErrStopped at once (a stopping shepherd drops queued spawn requests
// without a dead letter).
func TestRequestWaitingForASpawnWhenTheHostStops(t *testing.T) {
	e := newEnv(t)
	m, h := e.slowHost(t)
	go h.Request(e.ctx, actors.Address{Kind: ledger.Kind, ID: "slow"}, &triplanev1.LedgerDeposit{Amount: 1})
	<-m.started
	waiting := make(chan error, 1)
	go func() {
		_, err := h.Request(e.ctx, acct, &triplanev1.LedgerDeposit{Amount: 1})
		waiting <- err
	}()
	stopped := make(chan error, 1)
	go func() { stopped <- h.Stop(e.ctx) }()
	if err := <-waiting; !errors.Is(err, actors.ErrStopped) {
		t.Fatalf("a request waiting for a spawn while the host stops: %v, want ErrStopped", err)
	}
	close(m.release)
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}
