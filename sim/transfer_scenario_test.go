package sim_test

import (
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

var transferScenario = sim.Scenarios()["transfer"]

func TestTransferScenarioSweep(t *testing.T) {
	sim.Check(t, transferScenario, sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults}, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
}

// A receiver that acknowledges before verifying lets a corrupted block be
// accepted; the sweep finds it and the seed reproduces it.
func TestTransferScenarioFindsAckBeforeVerify(t *testing.T) {
	opts := sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults, Bug: sim.BugAckBeforeVerify}
	for _, r := range sim.Sweep(transferScenario, 1, 10, opts) {
		if r.Err == nil {
			continue
		}
		if !strings.Contains(r.Err.Error(), "no-corrupt-block") {
			t.Fatalf("seed %d failed for another reason: %v", r.Seed, r.Err)
		}
		if again := sim.RunScenario(transferScenario, r.Seed, opts); again.TraceHash != r.TraceHash || again.Err == nil {
			t.Fatalf("seed %d did not reproduce", r.Seed)
		}
		return
	}
	t.Fatal("no seed in 1..10 found the planted bug")
}
