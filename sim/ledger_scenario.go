package sim

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// ledgerScenario: five ledger accounts take deposits, withdrawals and
// interest timers at 200 commands per virtual second while appends fail and
// actors crash. Invariants: replay rebuilds every live state; every
// acknowledged deposit is journaled exactly once; a command fails only with
// an error its client sees.
var ledgerScenario = Scenario{
	Name:        "ledger",
	Description: "5 ledger accounts, 200 commands/s, append failures and crashes",
	Registry:    func() *actors.Registry { return actors.NewRegistry(ledger.Machine{}) },
	Bugs:        []string{BugApplyBeforePersist, BugSnapshotBeforePersist},
	Crashes:     "the probability that a command's account crashes just before the command arrives",
	Drive: func(r *Run) Invariant {
		w, h := r.World, r.Host
		accounts := make([]actors.Address, 5)
		for i := range accounts {
			accounts[i] = actors.Address{Kind: ledger.Kind, ID: fmt.Sprintf("acct-%d", i)}
		}
		acked := map[int64]actors.Address{}
		var unexpected []error
		n := int(r.Opts.Duration.Seconds() * 200)
		for i := range n {
			at := time.Duration(w.Rand().Int64N(int64(r.Opts.Duration)))
			a := accounts[w.Rand().IntN(len(accounts))]
			amount := int64(i + 1)
			var msg proto.Message = &triplanev1.LedgerDeposit{Amount: amount}
			switch w.Rand().IntN(10) {
			case 0:
				msg = &triplanev1.LedgerWithdraw{Amount: amount/2 + 1}
			case 1:
				msg = &triplanev1.LedgerScheduleInterest{Amount: 1, DelayMillis: 100}
			}
			crash := w.Chance(r.Opts.Faults.CrashRate)
			w.After(at, func() {
				if crash {
					h.Crash(a)
				}
				h.Deliver(a, fmt.Sprintf("c%d", i), msg, func(_ proto.Message, err error) {
					switch {
					case err == nil:
						if d, ok := msg.(*triplanev1.LedgerDeposit); ok {
							acked[d.Amount] = a
						}
					case errors.Is(err, actors.ErrPersist), errors.Is(err, ledger.ErrInsufficient):
					default:
						unexpected = append(unexpected, err)
					}
				})
			})
		}
		return func(r *Run) error {
			if len(unexpected) > 0 {
				return fmt.Errorf("invariant client-errors: %d unexpected errors, first: %w", len(unexpected), unexpected[0])
			}
			// Each account's journal read once (once per deposit was
			// quadratic and most of the scenario's time).
			journaled := map[actors.Address]map[int64]int{}
			for amount, a := range acked {
				if journaled[a] == nil {
					journaled[a] = map[int64]int{}
					for _, e := range r.Journal.Events(a, 0) {
						if d, ok := e.(*triplanev1.LedgerDeposited); ok {
							journaled[a][d.Amount]++
						}
					}
				}
				if count := journaled[a][amount]; count != 1 {
					return fmt.Errorf("invariant exactly-once: acknowledged deposit %d of %s is journaled %d times", amount, a, count)
				}
			}
			return nil
		}
	},
}
