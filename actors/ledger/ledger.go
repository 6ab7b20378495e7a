// Package ledger is a small example state machine: an account balance with
// deposits, refused overdrafts, multi-event splits and interest paid by a
// timer. It exercises the whole actor contract and is the fixture of the
// journal tests, the crash test and `triplane bench journal`.
package ledger

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Kind of ledger actors.
const Kind = "ledger"

// ErrInsufficient refuses a withdrawal larger than the balance.
var ErrInsufficient = errors.New("ledger: insufficient balance")

// Machine is the ledger state machine.
type Machine struct{}

var _ actors.Machine = Machine{}

func (Machine) Kind() string          { return Kind }
func (Machine) SchemaVersion() uint32 { return 1 }
func (Machine) Initial(string) proto.Message {
	return &triplanev1.LedgerState{}
}

func (Machine) Decide(state proto.Message, cmd actors.Command) actors.Decision {
	s := state.(*triplanev1.LedgerState)
	reply := func(delta int64, events uint64) *triplanev1.LedgerReply {
		return &triplanev1.LedgerReply{Balance: s.Balance + delta, Applied: s.Applied + events}
	}
	switch c := cmd.Msg.(type) {
	case *triplanev1.LedgerDeposit:
		if c.Amount <= 0 {
			return actors.Decision{Err: fmt.Errorf("ledger: deposit amount must be positive, got %d", c.Amount)}
		}
		return actors.Decision{Events: []proto.Message{&triplanev1.LedgerDeposited{Amount: c.Amount}}, Reply: reply(c.Amount, 1)}
	case *triplanev1.LedgerWithdraw:
		if c.Amount <= 0 {
			return actors.Decision{Err: fmt.Errorf("ledger: withdrawal amount must be positive, got %d", c.Amount)}
		}
		if c.Amount > s.Balance {
			return actors.Decision{Err: fmt.Errorf("%w: have %d, asked %d", ErrInsufficient, s.Balance, c.Amount)}
		}
		return actors.Decision{Events: []proto.Message{&triplanev1.LedgerWithdrawn{Amount: c.Amount}}, Reply: reply(-c.Amount, 1)}
	case *triplanev1.LedgerSplit:
		var evs []proto.Message
		var sum int64
		for _, a := range c.Amounts {
			if a <= 0 {
				return actors.Decision{Err: fmt.Errorf("ledger: split amounts must be positive, got %d", a)}
			}
			evs = append(evs, &triplanev1.LedgerDeposited{Amount: a})
			sum += a
		}
		return actors.Decision{Events: evs, Reply: reply(sum, uint64(len(evs)))}
	case *triplanev1.LedgerScheduleInterest:
		return actors.Decision{
			Effects: []actors.Effect{actors.SetTimer{Name: "interest", After: time.Duration(c.DelayMillis) * time.Millisecond,
				Msg: &triplanev1.LedgerInterestDue{Amount: c.Amount}}},
			Reply: reply(0, 0),
		}
	case *triplanev1.LedgerInterestDue:
		return actors.Decision{Events: []proto.Message{&triplanev1.LedgerInterestPaid{Amount: c.Amount}}}
	case *triplanev1.LedgerGet:
		return actors.Decision{Reply: reply(0, 0)}
	}
	return actors.Decision{Err: fmt.Errorf("ledger: unknown command %T", cmd.Msg)}
}

func (Machine) Apply(state proto.Message, event proto.Message) error {
	s := state.(*triplanev1.LedgerState)
	switch e := event.(type) {
	case *triplanev1.LedgerDeposited:
		s.Balance += e.Amount
	case *triplanev1.LedgerWithdrawn:
		s.Balance -= e.Amount
	case *triplanev1.LedgerInterestPaid:
		s.Balance += e.Amount
		s.InterestPayments++
	default:
		return fmt.Errorf("ledger: unknown event %T", event)
	}
	s.Applied++
	return nil
}
