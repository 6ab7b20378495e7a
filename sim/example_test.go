package sim_test

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/sim"
)

// A scenario of your own: the machines it runs (Registry), the load and
// faults it schedules on the run's world (Drive), a violation it watches
// for as the run goes (sim.Problems: traced and timed when it happens) and
// an invariant it checks once the run is quiet (returned by Drive). In a
// test, sim.Check(t, s, opts, seeds...) runs it and prints how to
// reproduce a failing seed.
func Example_scenario() {
	deposits := sim.Scenario{
		Name:     "deposits",
		Registry: func() *actors.Registry { return actors.NewRegistry(ledger.Machine{}) },
		// The host's planted bugs apply to any scenario that sends its
		// commands through r.Host.
		Bugs: []string{"apply-before-persist", "snapshot-before-persist"},
		Drive: func(r *sim.Run) sim.Invariant {
			acct := actors.Address{Kind: ledger.Kind, ID: "alice"}
			problems := sim.NewProblems(r.World)
			var acked, unknown int64
			for i := range 100 {
				at := time.Duration(r.World.Rand().Int64N(int64(r.Opts.Duration)))
				crash := r.World.Chance(r.Opts.Faults.CrashRate)
				r.World.After(at, func() {
					if crash {
						r.Host.Crash(acct) // recovers from its snapshot and journal
					}
					r.Host.Deliver(acct, fmt.Sprintf("d%d", i), &triplanev1.LedgerDeposit{Amount: 1},
						func(_ proto.Message, err error) {
							switch {
							case err == nil:
								acked++
							case errors.Is(err, actors.ErrPersist):
								// The client sees it; the append may have been
								// written all the same.
								unknown++
							default:
								problems.Add(fmt.Errorf("invariant client-errors: deposit %d: %w", i, err))
							}
						})
				})
			}
			return func(r *sim.Run) error {
				if err := problems.Err(); err != nil {
					return err
				}
				// Every acknowledged deposit is in the balance, and
				// nothing but those and the ones of unknown outcome.
				if b := r.Host.State(acct).(*triplanev1.LedgerState).Balance; b < acked || b > acked+unknown {
					return fmt.Errorf("invariant balance: %d deposits acknowledged, %d of unknown outcome, balance %d", acked, unknown, b)
				}
				return nil
			}
		},
	}
	opts := sim.Options{Duration: time.Second, Faults: sim.DefaultFaults}
	a, b := sim.RunScenario(deposits, 7, opts), sim.RunScenario(deposits, 7, opts)
	fmt.Println("passed:", a.Err == nil, "same run again:", a.TraceHash == b.TraceHash)

	// With the planted bug, some seed's replay no longer matches its live
	// state, and the failure says how to run that seed again.
	opts.Bug = "apply-before-persist"
	for _, r := range sim.Sweep(deposits, 1, 20, opts) {
		if r.Err != nil {
			fmt.Println("found by seed", r.Seed)
			fmt.Println("reproduce:", sim.ReproduceCommand(deposits, r.Seed, opts))
			break
		}
	}
	// Output:
	// passed: true same run again: true
	// found by seed 2
	// reproduce: sim.RunScenario(<your scenario "deposits">, 2, sim.Options{Duration: 1 * time.Second, Faults: sim.DefaultFaults, Bug: "apply-before-persist"})
}
