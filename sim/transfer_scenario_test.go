package sim_test

import (
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
	sim.CheckFinds(t, transferScenario, opts, 1, 10, "no-corrupt-block")
}
