package sim_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

// A trace cut at its limit ends with a line saying so (it used to end as
// if the run had stopped there); a larger limit keeps the lines, and
// neither changes the trace hash, which covers every line.
func TestTraceCutIsMarked(t *testing.T) {
	// 60 s of ledger load traces about 15,000 lines: past the default.
	opts := sim.Options{Duration: time.Minute, Faults: sim.DefaultFaults}
	for seed := uint64(1); seed <= 3; seed++ {
		cut := sim.RunScenario(ledgerScenario, seed, opts)
		more := opts
		more.TraceLines = sim.MaxTraceLines
		whole := sim.RunScenario(ledgerScenario, seed, more)
		if cut.Err != nil || whole.Err != nil {
			t.Fatal(cut.Err, whole.Err)
		}
		if cut.TraceHash != whole.TraceHash {
			t.Fatalf("seed %d: trace hash %016x at the default limit, %016x keeping every line", seed, cut.TraceHash, whole.TraceHash)
		}
		total := len(whole.Trace)
		if whole.TraceDropped != 0 || total <= sim.DefaultTraceLines || strings.Contains(whole.Trace[total-1], "trace cut") {
			t.Fatalf("seed %d: the whole trace has %d lines, %d dropped, ending %q", seed, total, whole.TraceDropped, whole.Trace[total-1])
		}
		if len(cut.Trace) != sim.DefaultTraceLines+1 || cut.TraceDropped != total-sim.DefaultTraceLines ||
			!slices.Equal(cut.Trace[:sim.DefaultTraceLines], whole.Trace[:sim.DefaultTraceLines]) {
			t.Fatalf("seed %d: the cut trace has %d lines (%d dropped), the whole %d", seed, len(cut.Trace), cut.TraceDropped, total)
		}
		want := fmt.Sprintf("... trace cut after %d lines: %d more were not kept (the trace hash covers them); triplane sim --trace-lines %d (Options.TraceLines) keeps them all",
			sim.DefaultTraceLines, total-sim.DefaultTraceLines, total)
		if last := cut.Trace[len(cut.Trace)-1]; last != want {
			t.Fatalf("seed %d: the cut trace ends %q, want %q", seed, last, want)
		}
	}
	// A trace within its limit has no such line, whatever the limit.
	short := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults}
	a := sim.RunScenario(ledgerScenario, 1, short)
	short.TraceLines = 20
	b := sim.RunScenario(ledgerScenario, 1, short)
	if a.TraceDropped != 0 || strings.Contains(a.Trace[len(a.Trace)-1], "trace cut") || a.TraceHash != b.TraceHash ||
		b.TraceDropped != len(a.Trace)-20 || len(b.Trace) != 21 {
		t.Fatalf("1 s: %d lines (%d dropped), with 20 kept %d (%d dropped); hashes %016x %016x", len(a.Trace), a.TraceDropped, len(b.Trace), b.TraceDropped, a.TraceHash, b.TraceHash)
	}
}

// Detail lines are kept like the others and count against the limit, but
// are not in the hash: the cut line says how many of the dropped were.
func TestTraceCutCountsDetailLines(t *testing.T) {
	plain, detailed := sim.NewWorld(1), sim.NewWorld(1)
	detailed.Detail = true
	for _, w := range []*sim.World{plain, detailed} {
		w.TraceLimit = 2
		w.Tracef("one")
		w.Detailf("a detail")
		w.Tracef("two")
		w.Detailf("another")
	}
	if plain.TraceHash() != detailed.TraceHash() {
		t.Fatal("detail lines changed the hash")
	}
	tr := detailed.Trace()
	if len(tr) != 3 || !strings.Contains(tr[1], "· a detail") || detailed.TraceDropped() != 2 {
		t.Fatalf("trace %q, %d dropped", tr, detailed.TraceDropped())
	}
	if last := tr[2]; !strings.Contains(last, "2 more were not kept (the trace hash covers them but the 1 detail lines)") {
		t.Fatalf("cut line %q", last)
	}
	if tr := plain.Trace(); len(tr) != 2 || plain.TraceDropped() != 0 {
		t.Fatalf("without detail: %q, %d dropped", tr, plain.TraceDropped())
	}
}
