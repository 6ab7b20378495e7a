package sim_test

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/sim"
)

var ledgerScenario = sim.Scenarios()["ledger"]

func TestSimulatedLedgerInvariantsOverSeeds(t *testing.T) {
	sim.Check(t, ledgerScenario, sim.Options{Faults: sim.DefaultFaults}, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
	r := sim.RunScenario(ledgerScenario, 1, sim.Options{Faults: sim.DefaultFaults})
	if r.Steps == 0 || r.SimTime < 2*time.Second || len(r.Trace) == 0 {
		t.Fatalf("run did not happen: %+v", r)
	}
}

func TestSameSeedSameTrace(t *testing.T) {
	opts := sim.Options{Faults: sim.DefaultFaults}
	a, b := sim.RunScenario(ledgerScenario, 42, opts), sim.RunScenario(ledgerScenario, 42, opts)
	if a.TraceHash != b.TraceHash || a.Steps != b.Steps {
		t.Fatalf("seed 42 gave trace hashes %x and %x", a.TraceHash, b.TraceHash)
	}
	if c := sim.RunScenario(ledgerScenario, 43, opts); c.TraceHash == a.TraceHash {
		t.Fatal("different seeds gave the same trace")
	}
}

// A planted bug is found by a sweep, and its failing seed reproduces.
func TestSweepFindsPlantedBug(t *testing.T) {
	for _, bug := range []string{sim.BugApplyBeforePersist, sim.BugSnapshotBeforePersist} {
		t.Run(bug, func(t *testing.T) { sweepFinds(t, bug) })
	}
}

func sweepFinds(t *testing.T, bug string) {
	sim.CheckFinds(t, ledgerScenario, sim.Options{Faults: sim.DefaultFaults, Bug: bug}, 1, 30, "invariant")
}

// A user's own invariant runs at the end and can fail a run.
func TestCustomInvariant(t *testing.T) {
	opts := sim.Options{Faults: sim.DefaultFaults, Invariants: []sim.Invariant{func(r *sim.Run) error {
		if r.Host.Commands == 0 {
			return errors.New("no commands")
		}
		return errors.New("always fails")
	}}}
	if r := sim.RunScenario(ledgerScenario, 3, opts); r.Err == nil || !strings.Contains(r.Err.Error(), "always fails") {
		t.Fatalf("custom invariant not applied: %v", r.Err)
	}
}

func TestSimJournalSemantics(t *testing.T) {
	w := sim.NewWorld(1)
	j := sim.NewJournal(w)
	a := actors.Address{Kind: "ledger", ID: "x"}
	ev := []proto.Message{&triplanev1.LedgerDeposited{Amount: 1}}
	p1, err := j.Append(a, j.Highest(a), "c1", ev)
	if err != nil || p1.Seq != 1 {
		t.Fatal(p1, err)
	}
	// A retry of the same batch is recognised; another writer's is refused.
	if p, err := j.Append(a, struct{ Seq, Stream uint64 }{}, "c1", ev); err != nil || p != p1 {
		t.Fatalf("retry: %v %v", p, err)
	}
	if _, err := j.Append(a, struct{ Seq, Stream uint64 }{}, "c2", ev); err == nil {
		t.Fatal("stale writer accepted")
	}
}

// The simulated disk: unsynced snapshots are lost in a crash, a torn record
// is skipped, and a snapshot past the journal is never used.
func TestDiskLosesUnsyncedWrites(t *testing.T) {
	w := sim.NewWorld(11) // a seed whose crash leaves a torn record
	d := sim.NewDisk(w)
	a := actors.Address{Kind: "ledger", ID: "x"}
	d.Write(a, journal.Position{Seq: 5}, &triplanev1.LedgerState{Balance: 5})
	w.RunFor(time.Second) // synced
	d.Write(a, journal.Position{Seq: 9}, &triplanev1.LedgerState{Balance: 9})
	d.Crash(a) // before its sync
	w.RunFor(time.Second)
	var st triplanev1.LedgerState
	if pos, ok := d.Newest(a, 100, &st); !ok || pos.Seq != 5 || st.Balance != 5 {
		t.Fatalf("after a crash: %v %v %v, want the synced snapshot at 5", pos, ok, st.Balance)
	}
	if _, ok := d.Newest(a, 4, &st); ok {
		t.Fatal("a snapshot past the journal's highest sequence was used")
	}
	if d.Lost != 1 {
		t.Fatalf("lost %d writes, want 1", d.Lost)
	}
	if d.Torn != 1 {
		t.Fatalf("torn %d records, want 1: the seed no longer exercises the torn path", d.Torn)
	}
}

// A timer past the end of time never fires and the clock never runs
// backwards (it used to wrap around and fire at once).
func TestWorldFarTimerDoesNotWrap(t *testing.T) {
	w := sim.NewWorld(1)
	w.RunFor(time.Second)
	fired := false
	w.After(time.Duration(math.MaxInt64), func() { fired = true })
	w.RunFor(time.Hour)
	if fired || w.Elapsed() != time.Second+time.Hour {
		t.Fatalf("fired %v, clock at %s", fired, w.Elapsed())
	}
}
