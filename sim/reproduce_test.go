package sim_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

// The reproduce command carries every option that changes the run (it
// used to drop the faults), as the CLI's flags spell them: a fault the CLI
// defaults to is left out, one it does not is written, 0 too.
func TestReproduceCommandCarriesTheRun(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts sim.Options
		want string
	}{
		{"the reviewer's run", sim.Options{Duration: 2 * time.Second, Faults: sim.Faults{AppendFailure: 0.3, WrittenOnFailure: 0.5, CrashRate: 0.5}, Bug: sim.BugApplyBeforePersist},
			"triplane sim --scenario ledger --seed 13 --duration 2s --bug apply-before-persist --append-failure 0.3 --crash-rate 0.5"},
		{"the CLI's defaults", sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults},
			"triplane sim --scenario ledger --seed 13 --duration 2s"},
		{"Go's defaults: no faults, default duration", sim.Options{},
			"triplane sim --scenario ledger --seed 13 --duration 2s --append-failure 0 --written-on-failure 0 --crash-rate 0"},
		{"faults ledger does not read are left out", sim.Options{Duration: 2 * time.Second, Faults: sim.Faults{AppendFailure: 0.03, WrittenOnFailure: 0.5, CrashRate: 0.1}},
			"triplane sim --scenario ledger --seed 13 --duration 2s"},
		{"buggify, odd duration, trace lines", sim.Options{Duration: 1500*time.Millisecond + 1, Faults: sim.DefaultFaults, Buggify: true, TraceLines: 50},
			"triplane sim --scenario ledger --seed 13 --duration 1.500000001s --buggify --trace-lines 50"},
	} {
		if got := sim.ReproduceCommand(ledgerScenario, 13, tc.opts); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

// The CLI runs only the built-in scenarios and none of a test's own
// invariants: anything else is reproduced in Go, with the duration it ran
// for (never 0s).
// A scenario's own fault knobs are carried when they differ from the
// CLI's defaults.
func TestReproduceCommandCarriesTheScenariosFaults(t *testing.T) {
	f := sim.DefaultFaults
	f.MessageLoss, f.Partitions = 0.1, 0
	if got, want := sim.ReproduceCommand(servingScenario, 3, sim.Options{Duration: time.Second, Faults: f}),
		"triplane sim --scenario serving --seed 3 --duration 1s --message-loss 0.1 --partitions 0"; got != want {
		t.Fatalf("\n got %s\nwant %s", got, want)
	}
}

func TestReproduceCommandInGoWhereTheCLICannot(t *testing.T) {
	mine := ledgerScenario
	mine.Name = "my-ledger"
	// Named like a built-in one, but its own code.
	impostor := ledgerScenario
	impostor.Drive = func(r *sim.Run) sim.Invariant { return ledgerScenario.Drive(r) }
	custom := []sim.Invariant{func(*sim.Run) error { return nil }}
	for _, tc := range []struct {
		name string
		s    sim.Scenario
		opts sim.Options
		want string
	}{
		{"a user's scenario", mine, sim.Options{},
			`sim.RunScenario(<your scenario "my-ledger">, 1, sim.Options{Duration: 2 * time.Second})`},
		{"a user's scenario, all options", mine, sim.Options{Duration: 90 * time.Second, Faults: sim.Faults{AppendFailure: 0.25, CrashRate: 1}, Bug: "apply-before-persist", Buggify: true, Invariants: custom, TraceLines: 20_000},
			`sim.RunScenario(<your scenario "my-ledger">, 1, sim.Options{Duration: 90 * time.Second, Faults: sim.Faults{AppendFailure: 0.25, CrashRate: 1}, Bug: "apply-before-persist", Buggify: true, Invariants: <your 1>, TraceLines: 20000})`},
		{"a built-in scenario with the test's invariants", ledgerScenario, sim.Options{Duration: 1500 * time.Millisecond, Faults: sim.DefaultFaults, Invariants: custom},
			`sim.RunScenario(sim.Scenarios()["ledger"], 1, sim.Options{Duration: 1500 * time.Millisecond, Faults: sim.DefaultFaults, Invariants: <your 1>})`},
		{"a built-in name on other code", impostor, sim.Options{Faults: sim.DefaultFaults},
			`sim.RunScenario(<your scenario "ledger">, 1, sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults})`},
		{"the built-in scenario itself", sim.Scenarios()["ledger"], sim.Options{Faults: sim.DefaultFaults},
			"triplane sim --scenario ledger --seed 1 --duration 2s"},
	} {
		if got := sim.ReproduceCommand(tc.s, 1, tc.opts); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

// fatals records what Check and CheckFinds report instead of failing.
type fatals struct {
	testing.TB
	msgs []string
}

func (f *fatals) Helper()                        {}
func (f *fatals) Fatalf(format string, a ...any) { f.msgs = append(f.msgs, fmt.Sprintf(format, a...)) }
func (f *fatals) Logf(format string, a ...any)   { f.msgs = append(f.msgs, fmt.Sprintf(format, a...)) }

// Check's failure says how to reproduce it with ReproduceCommand: in Go
// for a user's scenario (the CLI used to be named, with --duration 0s),
// as a command line for a built-in one; refused options have nothing to
// reproduce.
func TestCheckPrintsAReproductionThatWorks(t *testing.T) {
	mine := ledgerScenario
	mine.Name = "my-ledger"
	opts := sim.Options{Faults: sim.DefaultFaults, Bug: sim.BugApplyBeforePersist}
	for _, tc := range []struct {
		s    sim.Scenario
		opts sim.Options
		want string
	}{
		{mine, opts, "\nreproduce: " + `sim.RunScenario(<your scenario "my-ledger">, 1, sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Bug: "apply-before-persist"})`},
		{ledgerScenario, opts, "\nreproduce: triplane sim --scenario ledger --seed 1 --duration 2s --bug apply-before-persist"},
	} {
		f := &fatals{TB: t}
		sim.Check(f, tc.s, tc.opts, 1)
		if len(f.msgs) != 1 || !strings.HasSuffix(f.msgs[0], tc.want) || strings.Contains(f.msgs[0], " 0s") {
			t.Errorf("Check on %s: %q, want it to end %q", tc.s.Name, f.msgs, tc.want)
		}
		f = &fatals{TB: t}
		sim.CheckFinds(f, tc.s, tc.opts, 1, 1, "invariant")
		if len(f.msgs) != 1 || !strings.HasSuffix(f.msgs[0], tc.want) {
			t.Errorf("CheckFinds on %s: %q, want it to end %q", tc.s.Name, f.msgs, tc.want)
		}
	}
	f := &fatals{TB: t}
	sim.Check(f, ledgerScenario, sim.Options{Duration: -time.Second}, 1)
	if len(f.msgs) != 1 || !strings.Contains(f.msgs[0], "Options.Duration") || strings.Contains(f.msgs[0], "reproduce") {
		t.Errorf("Check with refused options: %q", f.msgs)
	}
}
