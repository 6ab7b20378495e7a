package sim_test

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

// Options a run cannot take are a failed result naming the option, with
// no run (a negative duration used to panic inside the scenario), beside
// the nearest options that run.
func TestRunScenarioRefusesBadOptions(t *testing.T) {
	d := sim.DefaultFaults
	for _, tc := range []struct {
		name      string
		bad, good sim.Options
		field     string
	}{
		{"negative duration", sim.Options{Duration: -time.Second}, sim.Options{Duration: 0}, "Duration"},
		{"duration over the limit", sim.Options{Duration: sim.MaxDuration + 1}, sim.Options{Duration: time.Second}, "Duration"},
		{"crash rate above 1", sim.Options{Faults: sim.Faults{CrashRate: 1.5}}, sim.Options{Faults: sim.Faults{CrashRate: 1}}, "Faults.CrashRate"},
		{"crash rate below 0", sim.Options{Faults: sim.Faults{CrashRate: -0.1}}, sim.Options{Faults: sim.Faults{CrashRate: 0}}, "Faults.CrashRate"},
		{"append failure NaN", sim.Options{Faults: sim.Faults{AppendFailure: math.NaN()}}, sim.Options{Faults: d}, "Faults.AppendFailure"},
		{"written on failure 2", sim.Options{Faults: sim.Faults{WrittenOnFailure: 2}}, sim.Options{Faults: sim.Faults{WrittenOnFailure: 1}}, "Faults.WrittenOnFailure"},
		{"unknown bug", sim.Options{Faults: d, Bug: "nope"}, sim.Options{Faults: d, Bug: sim.BugApplyBeforePersist}, "Bug"},
		{"another scenario's bug", sim.Options{Faults: d, Bug: sim.BugRouterIgnoresGap}, sim.Options{Faults: d, Bug: sim.BugSnapshotBeforePersist}, "Bug"},
		{"message loss above 1", sim.Options{Faults: sim.Faults{MessageLoss: 1.5}}, sim.Options{Faults: sim.Faults{MessageLoss: 1}}, "Faults.MessageLoss"},
		{"message duplicate NaN", sim.Options{Faults: sim.Faults{MessageDuplicate: math.NaN()}}, sim.Options{Faults: sim.Faults{MessageDuplicate: 0.5}}, "Faults.MessageDuplicate"},
		{"negative partitions", sim.Options{Faults: sim.Faults{Partitions: -1}}, sim.Options{Faults: sim.Faults{Partitions: 0}}, "Faults.Partitions"},
		{"leader changes over the limit", sim.Options{Faults: sim.Faults{LeaderChanges: sim.MaxFaultEvents + 1}}, sim.Options{Faults: sim.Faults{LeaderChanges: sim.MaxFaultEvents}}, "Faults.LeaderChanges"},
		{"negative trace lines", sim.Options{TraceLines: -1}, sim.Options{TraceLines: 1}, "TraceLines"},
		{"trace lines over the limit", sim.Options{TraceLines: sim.MaxTraceLines + 1}, sim.Options{TraceLines: sim.MaxTraceLines}, "TraceLines"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := sim.RunScenario(ledgerScenario, 1, tc.bad)
			var oe *sim.OptionError
			if !errors.As(r.Err, &oe) || oe.Field != tc.field || !strings.Contains(r.Err.Error(), "Options."+tc.field) {
				t.Fatalf("bad options %+v: %v, want an OptionError for %s", tc.bad, r.Err, tc.field)
			}
			if r.Steps != 0 || r.Trace != nil || r.Seed != 1 || r.Scenario != "ledger" {
				t.Fatalf("refused options still ran, or the result lost its name: %+v", r)
			}
			if err := tc.good.Validate(ledgerScenario); err != nil {
				t.Fatalf("good options %+v refused: %v", tc.good, err)
			}
		})
	}
	// The good side runs (short ones only: the limits are checked above).
	if r := sim.RunScenario(ledgerScenario, 1, sim.Options{Duration: 0, TraceLines: 1}); r.Err != nil || r.SimTime < sim.DefaultDuration {
		t.Fatalf("default duration: %v after %s", r.Err, r.SimTime)
	}
}

// A bug is planted only by the scenarios that list it: another's is
// refused, naming where it belongs and what the scenario plants, rather
// than run clean as if the simulator had missed it.
func TestBugBelongsToItsScenarios(t *testing.T) {
	opts := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults, Bug: sim.BugRouterIgnoresGap}
	bad := sim.RunScenario(ledgerScenario, 2, opts)
	for _, want := range []string{`"router-ignores-gap" is planted by scenario serving, not ledger`, "apply-before-persist, snapshot-before-persist"} {
		if bad.Err == nil || !strings.Contains(bad.Err.Error(), want) {
			t.Fatalf("ledger with %s: %v, want it refused saying %q", opts.Bug, bad.Err, want)
		}
	}
	if good := sim.RunScenario(servingScenario, 2, opts); good.Steps == 0 {
		t.Fatalf("serving with %s did not run: %v", opts.Bug, good.Err)
	}
	// Every built-in bug is some scenario's, and only built-in ones are.
	var union []string
	for _, s := range sim.Scenarios() {
		union = append(union, s.Bugs...)
	}
	slices.Sort(union)
	if got, want := slices.Compact(union), slices.Sorted(slices.Values(sim.Bugs)); !slices.Equal(got, want) {
		t.Fatalf("the scenarios plant %v, sim.Bugs lists %v", got, want)
	}
	// The host's bugs are listed by exactly the scenarios that send
	// commands through the host.
	for name, s := range sim.Scenarios() {
		var commands uint64
		o := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults, Invariants: []sim.Invariant{func(r *sim.Run) error {
			commands = r.Host.Commands
			return nil
		}}}
		if r := sim.RunScenario(s, 1, o); r.Err != nil {
			t.Fatal(r.Err)
		}
		lists := slices.Contains(s.Bugs, sim.BugApplyBeforePersist) && slices.Contains(s.Bugs, sim.BugSnapshotBeforePersist)
		if lists != (commands > 0) {
			t.Errorf("%s: lists the host's bugs %v, sends %d commands through the host", name, lists, commands)
		}
	}
}

// Scenarios() hands out copies: changing one does not change what the
// next caller, or RunScenario's checks, see.
func TestScenariosAreCopies(t *testing.T) {
	s := sim.Scenarios()["serving"]
	s.Bugs[0], s.FaultPoints[0] = "changed", "changed"
	again := sim.Scenarios()["serving"]
	if again.Bugs[0] == "changed" || again.FaultPoints[0] == "changed" {
		t.Fatal("a caller changed the built-in scenario")
	}
}

// A scenario lists the fault points its code reaches: a buggified run
// switches on none but those, and none at all where it lists none (there
// --buggify has nothing to do, and the CLI says so).
func TestScenarioFaultPointsAreTheOnesReached(t *testing.T) {
	for _, name := range sim.ScenarioNames() {
		s := sim.Scenarios()[name]
		on := map[string]bool{}
		opts := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults, Buggify: true, Invariants: []sim.Invariant{func(r *sim.Run) error {
			for _, p := range r.Points.On() {
				on[p] = true
			}
			return nil
		}}}
		for seed := uint64(1); seed <= 4; seed++ {
			if r := sim.RunScenario(s, seed, opts); r.Err != nil {
				t.Fatalf("%s seed %d: %v", name, seed, r.Err)
			}
		}
		for p := range on {
			if !slices.Contains(s.FaultPoints, p) {
				t.Errorf("%s: point %s was switched on but the scenario does not list it (lists %v)", name, p, s.FaultPoints)
			}
		}
		if len(s.FaultPoints) > 0 && len(on) == 0 {
			t.Errorf("%s lists fault points %v but 4 buggified seeds switched none on", name, s.FaultPoints)
		}
	}
}

// Every scenario finds each host bug it lists: a listed bug a scenario
// cannot show would let a sweep pass for the wrong reason. Placement shows
// snapshot-before-persist only when its view changes between a failed
// reconcile and the next: rarely, so with more append failures and from
// a seed known to.
func TestHostBugsFoundWhereListed(t *testing.T) {
	type sweep struct {
		faults   sim.Faults
		from, to uint64
	}
	more := sim.DefaultFaults
	more.AppendFailure = 0.2
	sweeps := map[string]sweep{"serving/" + sim.BugSnapshotBeforePersist: {sim.DefaultFaults, 1, 12},
		"transfer/" + sim.BugSnapshotBeforePersist:  {sim.DefaultFaults, 1, 15},
		"placement/" + sim.BugApplyBeforePersist:    {sim.DefaultFaults, 1, 20},
		"placement/" + sim.BugSnapshotBeforePersist: {more, 2640, 2660}}
	for _, name := range sim.ScenarioNames() {
		s := sim.Scenarios()[name]
		for _, bug := range s.Bugs {
			if bug != sim.BugApplyBeforePersist && bug != sim.BugSnapshotBeforePersist {
				continue // the scenario's own bugs have their own tests
			}
			sw, ok := sweeps[name+"/"+bug]
			if !ok {
				sw = sweep{sim.DefaultFaults, 1, 5}
			}
			sim.CheckFinds(t, s, sim.Options{Faults: sw.faults, Bug: bug}, sw.from, sw.to, "invariant")
		}
	}
}

// Each scenario reads exactly the fault knobs it lists in ReadsFaults: one
// it lists changes its run, one it does not changes neither the run nor
// the trace (so a reproduction may leave it out).
func TestScenariosReadTheKnobsTheyList(t *testing.T) {
	knobs := map[string]func(*sim.Faults){
		"MessageLoss":      func(f *sim.Faults) { f.MessageLoss = 0.3 },
		"MessageDuplicate": func(f *sim.Faults) { f.MessageDuplicate = 0.3 },
		"Partitions":       func(f *sim.Faults) { f.Partitions = 6 },
		"LeaderChanges":    func(f *sim.Faults) { f.LeaderChanges = 4 },
	}
	for _, name := range sim.ScenarioNames() {
		s := sim.Scenarios()[name]
		base := sim.RunScenario(s, 3, sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults})
		for knob, set := range knobs {
			f := sim.DefaultFaults
			set(&f)
			r := sim.RunScenario(s, 3, sim.Options{Duration: 2 * time.Second, Faults: f})
			same := r.TraceHash == base.TraceHash && r.Steps == base.Steps
			if lists := slices.Contains(s.ReadsFaults, knob); lists == same {
				t.Errorf("%s lists %s: %v, but changing it changed the run: %v", name, knob, lists, !same)
			}
		}
	}
}
