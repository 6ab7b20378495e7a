package sim_test

import (
	"errors"
	"fmt"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

var servingScenario = sim.Scenarios()["serving"]

// A parallel sweep gives exactly the runs of a serial one, in seed order
// (under -race this also shows the built-in scenarios share no state
// between runs), and stops starting seeds once its callback fails.
func TestParallelSweepMatchesSerial(t *testing.T) {
	opts := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults}
	for _, s := range []sim.Scenario{servingScenario, transferScenario} {
		// The baseline runs each seed on its own, not through a sweep.
		var serial []sim.Result
		for seed := uint64(1); seed <= 6; seed++ {
			serial = append(serial, sim.RunScenario(s, seed, opts))
		}
		var got []sim.Result
		if err := sim.SweepEach(s, 1, 6, opts, 3, func(r sim.Result) error { got = append(got, r); return nil }); err != nil {
			t.Fatal(err)
		}
		if len(got) != len(serial) {
			t.Fatalf("%s: %d results, want %d", s.Name, len(got), len(serial))
		}
		for i := range got {
			if got[i].Seed != serial[i].Seed || got[i].TraceHash != serial[i].TraceHash || (got[i].Err == nil) != (serial[i].Err == nil) {
				t.Fatalf("%s: parallel result %d (seed %d, trace %016x) differs from serial (seed %d, trace %016x)",
					s.Name, i, got[i].Seed, got[i].TraceHash, serial[i].Seed, serial[i].TraceHash)
			}
		}
	}
	// A run that panics fails its seed, named, instead of the process, and
	// keeps its trace up to the panic.
	boom := sim.Scenario{Name: "boom", Registry: transferScenario.Registry, Drive: func(r *sim.Run) sim.Invariant {
		r.World.Tracef("about to fail")
		panic("boom")
	}}
	var errs []error
	if err := sim.SweepEach(boom, 1, 3, opts, 2, func(r sim.Result) error {
		errs = append(errs, r.Err)
		if tr := strings.Join(r.Trace, "\n"); !strings.Contains(tr, "about to fail") || !strings.Contains(tr, "PANIC: boom") {
			t.Errorf("seed %d: the trace lost what led to the panic:\n%s", r.Seed, r.Trace)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for i, err := range errs {
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("seed %d panicked: boom", i+1)) {
			t.Fatalf("results %v, want every seed failed with its panic", errs)
		}
	}
	if len(errs) != 3 {
		t.Fatalf("%d results, want 3", len(errs))
	}
	stop := errors.New("enough")
	var seen []uint64
	err := sim.SweepEach(transferScenario, 1, 100, opts, 2, func(r sim.Result) error {
		seen = append(seen, r.Seed)
		if r.Seed == 3 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || !slices.Equal(seen, []uint64{1, 2, 3}) {
		t.Fatalf("err %v after seeds %v, want the callback's error after 1, 2, 3", err, seen)
	}
}

// A bounded sweep of the serving scenario with faults on holds every
// invariant.
func TestServingScenarioSweep(t *testing.T) {
	opts := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults}
	// The sweep exercises the dump path too: partitions outlast the
	// workers' resend rings.
	dumps := 0
	for _, r := range sim.Sweep(servingScenario, 1, 6, opts) {
		if r.Err != nil {
			t.Fatalf("seed %d failed: %v\nreproduce: %s", r.Seed, r.Err, sim.ReproduceCommand(servingScenario, r.Seed, opts))
		}
		last := r.Trace[len(r.Trace)-1]
		var n int
		if i := strings.Index(last, " dumps "); i >= 0 {
			fmt.Sscanf(last[i+len(" dumps "):], "%d", &n)
		}
		dumps += n
	}
	if dumps == 0 {
		t.Fatal("no run needed a dump: the partition and ring sizes no longer exercise it")
	}
}

func TestServingScenarioReproducible(t *testing.T) {
	opts := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults}
	a := sim.RunScenario(servingScenario, 42, opts)
	b := sim.RunScenario(servingScenario, 42, opts)
	if a.Err != nil || a.TraceHash != b.TraceHash || a.Steps != b.Steps {
		t.Fatalf("same seed, different runs: %v %x/%x %d/%d", a.Err, a.TraceHash, b.TraceHash, a.Steps, b.Steps)
	}
	if c := sim.RunScenario(servingScenario, 43, opts); c.TraceHash == a.TraceHash {
		t.Fatal("another seed gave the same trace")
	}
}

// The sweep finds each planted serving bug, and the failing seed fails
// again when rerun.
func TestServingScenarioFindsPlantedBugs(t *testing.T) {
	for bug, want := range map[string]string{sim.BugRouterIgnoresGap: "invariant index", sim.BugStaleRoute: "dead-routing"} {
		opts := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Bug: bug}
		r := sim.CheckFinds(t, servingScenario, opts, 1, 12, want)
		if bug != sim.BugStaleRoute {
			continue // the index is compared at the end: that is when it breaks
		}
		// A request routed to a dead worker is seen when it happens: the
		// failure names that moment, and the trace has a line for it there.
		m := regexp.MustCompile(`dead-routing: .* \(at ([0-9.]+m?s)\)`).FindStringSubmatch(r.Err.Error())
		if m == nil {
			t.Fatalf("the violation does not say when it happened: %v", r.Err)
		}
		at, err := time.ParseDuration(m[1])
		if err != nil || at <= 0 || at >= r.SimTime {
			t.Fatalf("violation at %q (%v), the run ended at %s", m[1], err, r.SimTime)
		}
		if !strings.Contains(strings.Join(r.Trace, "\n"), "VIOLATION: invariant dead-routing") {
			t.Fatal("no trace line at the violation")
		}
	}
}

// BenchmarkServingScenario reports simulated seconds per wall second for 8
// workers, the router and 100 requests/s with faults, beside the ledger
// scenario (one small machine, no engine) run in the same benchmark as the
// baseline, and the ratio of the two.
func BenchmarkServingScenario(b *testing.B) {
	speed := func(s sim.Scenario, seed uint64) (simTime, wall time.Duration) {
		r := sim.RunScenario(s, seed, sim.Options{Duration: 10 * time.Second, Faults: sim.DefaultFaults})
		if r.Err != nil {
			b.Fatal(r.Err)
		}
		return r.SimTime, r.Wall
	}
	var st, wt, lst, lwt time.Duration
	for i := 0; i < b.N; i++ {
		s, w := speed(servingScenario, uint64(i+1))
		st, wt = st+s, wt+w
		s, w = speed(ledgerScenario, uint64(i+1))
		lst, lwt = lst+s, lwt+w
	}
	serving, ledger := st.Seconds()/wt.Seconds(), lst.Seconds()/lwt.Seconds()
	b.ReportMetric(serving, "sim-s/wall-s")
	b.ReportMetric(ledger, "ledger-sim-s/wall-s")
	b.ReportMetric(serving/ledger, "x-of-ledger")
}

// With the fault points inside the real code switched on (the engine's
// slow steps, deferred admissions, evictions of every unused block; the KV
// event sequencer's and log's rare paths), a sweep holds every invariant,
// every point fires somewhere in it, and a buggified seed reproduces.
func TestServingScenarioBuggifySweep(t *testing.T) {
	opts := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Buggify: true}
	fired := map[string]uint64{}
	err := sim.SweepEach(servingScenario, 1, 24, opts, runtime.GOMAXPROCS(0), func(r sim.Result) error {
		if r.Err != nil {
			return fmt.Errorf("seed %d failed: %w\nreproduce: %s", r.Seed, r.Err, sim.ReproduceCommand(servingScenario, r.Seed, opts))
		}
		for p, n := range r.Fired {
			fired[p] += n
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range servingScenario.FaultPoints {
		if fired[p] == 0 {
			t.Errorf("fault point %s never fired in 24 seeds (fired: %v)", p, fired)
		}
	}
	a, b := sim.RunScenario(servingScenario, 5, opts), sim.RunScenario(servingScenario, 5, opts)
	if a.TraceHash != b.TraceHash || fmt.Sprint(a.Fired) != fmt.Sprint(b.Fired) {
		t.Fatalf("a buggified seed does not reproduce: %x %v / %x %v", a.TraceHash, a.Fired, b.TraceHash, b.Fired)
	}
}

// Detail adds lines about each request and repair to the trace without
// changing the run: same hash, same steps, and every line of the plain
// trace is in the detailed one, in order.
func TestServingDetailKeepsTheRun(t *testing.T) {
	// Every detail point is reached in some run: without a bug (routing
	// again when the chosen worker left) and with stale-route.
	for _, bug := range []string{"", sim.BugStaleRoute} {
		for seed := uint64(1); seed <= 4; seed++ {
			o := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Bug: bug}
			plain := sim.RunScenario(servingScenario, seed, o)
			o.Detail = true
			detailed := sim.RunScenario(servingScenario, seed, o)
			if plain.TraceHash != detailed.TraceHash || plain.Steps != detailed.Steps {
				t.Fatalf("bug %q seed %d: detail changed the run: %x/%x, %d/%d steps", bug, seed,
					plain.TraceHash, detailed.TraceHash, plain.Steps, detailed.Steps)
			}
		}
	}
	opts := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Bug: sim.BugStaleRoute, TraceLines: sim.MaxTraceLines}
	plain := sim.RunScenario(servingScenario, 1, opts)
	opts.Detail = true
	detailed := sim.RunScenario(servingScenario, 1, opts)
	if plain.TraceHash != detailed.TraceHash || plain.Steps != detailed.Steps || fmt.Sprint(plain.Err) != fmt.Sprint(detailed.Err) {
		t.Fatalf("detail changed the run: %x/%x, %d/%d steps, %v / %v", plain.TraceHash, detailed.TraceHash,
			plain.Steps, detailed.Steps, plain.Err, detailed.Err)
	}
	i := 0
	var details []string
	for _, l := range detailed.Trace {
		if i < len(plain.Trace) && l == plain.Trace[i] {
			i++
			continue
		}
		if !strings.Contains(l, " · ") {
			t.Fatalf("a line of the detailed trace is neither in the plain one nor a detail: %q", l)
		}
		details = append(details, l)
	}
	if i != len(plain.Trace) {
		t.Fatalf("%d of %d plain lines found in order in the detailed trace", i, len(plain.Trace))
	}
	all := strings.Join(details, "\n")
	for _, want := range []string{" routed to ", " started on ", " finished on ", " migrates from ", "kv: a gap in ", "kv: asking "} {
		if !strings.Contains(all, want) {
			t.Errorf("no detail line with %q in %d detail lines", want, len(details))
		}
	}
}

// The event plane's and etcd's faults follow their knobs: none asked, none
// happen; more asked, more happen.
func TestServingFaultKnobs(t *testing.T) {
	summary := regexp.MustCompile(`bus \d+ published, \d+ delivered, (\d+) lost, (\d+) duplicated, .* etcd (\d+) leader changes`)
	count := func(f sim.Faults) (lost, dup, changes string) {
		t.Helper()
		r := sim.RunScenario(servingScenario, 4, sim.Options{Duration: 2 * time.Second, Faults: f})
		if r.Err != nil {
			t.Fatalf("faults %+v: %v", f, r.Err)
		}
		m := summary.FindStringSubmatch(strings.Join(r.Trace, "\n"))
		if m == nil {
			t.Fatal("no summary line in the trace")
		}
		return m[1], m[2], m[3]
	}
	if lost, dup, changes := count(sim.Faults{}); lost != "0" || dup != "0" || changes != "0" {
		t.Fatalf("no faults asked: %s lost, %s duplicated, %s leader changes", lost, dup, changes)
	}
	// Partitions alone lose what the cut-off worker sends and is sent.
	if lost, dup, _ := count(sim.Faults{Partitions: 5}); lost == "0" || dup != "0" {
		t.Fatalf("5 partitions: %s lost, %s duplicated", lost, dup)
	}
	for _, tc := range []struct {
		f                  sim.Faults
		lost, dup, changes bool
	}{
		{sim.Faults{MessageLoss: 0.05}, true, false, false},
		{sim.Faults{MessageDuplicate: 0.05}, false, true, false},
		{sim.Faults{LeaderChanges: 3}, false, false, true},
	} {
		lost, dup, changes := count(tc.f)
		if (lost != "0") != tc.lost || (dup != "0") != tc.dup || (changes == "3") != tc.changes || (changes != "0" && !tc.changes) {
			t.Fatalf("faults %+v: %s lost, %s duplicated, %s leader changes", tc.f, lost, dup, changes)
		}
	}
}
