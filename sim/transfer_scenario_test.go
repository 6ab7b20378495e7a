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
	sim.CheckFinds(t, transferScenario, opts, 1, 10, "no-corrupt-block")
}

// The sweep goes through the supervisor's paths that matter: attempts that
// failed and were resumed, commands whose journal append failed (or that
// were never applied) asked again, and requesters that went away.
func TestTransferScenarioCoversFailures(t *testing.T) {
	seen := map[string]int{}
	for seed := uint64(1); seed <= 30; seed++ {
		r := sim.RunScenario(transferScenario, seed, sim.Options{Duration: 2 * time.Second, Faults: sim.DefaultFaults})
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		for _, line := range r.Trace {
			for _, what := range []string{"failed (dial:", "failed (connection reset", "failed (checksum mismatch", "*triplanev1.TransferAck: actors: persist failed",
				"run returned TRANSFER_STATUS_COMPLETED", "run returned TRANSFER_STATUS_CANCELLED", "asks again after", "*triplanev1.TransferStart: actors: persist failed", "*triplanev1.TransferAttemptFailed: actors: persist failed"} {
				if strings.Contains(line, what) {
					seen[what]++
				}
			}
		}
	}
	if len(seen) != 9 {
		t.Fatalf("seeds 1..30 went through %v, want all 9", seen)
	}
}
