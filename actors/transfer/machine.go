// Package transfer holds the transfer-session actor and its supervisor.
//
// A transfer session moves a list of KV blocks into blocks a peer
// allocated. The session is an event-sourced state machine (Machine): it
// journals that it started, each range of blocks the receiver acknowledged
// (landed and checksum verified), each failed attempt, and how it ended
// (completed, gave up, cancelled). The Supervisor drives it over a
// data-plane transport: it resumes from the last acknowledged block,
// retries with backoff after a failure, and gives up after the session's
// bounded number of attempts with an error the requester sees. What it
// does when is decided by the Driver, which has no I/O of its own so that
// the simulator's transfer scenario runs it too.
package transfer

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Kind of transfer-session actors.
const Kind = "transfer"

// MaxAttemptsLimit bounds the attempts a session may ask for; 0 asks for
// DefaultMaxAttempts.
const (
	MaxAttemptsLimit   = 100
	DefaultMaxAttempts = 5
)

// ErrNotRunning refuses progress reports to a session that ended or never
// started.
var ErrNotRunning = errors.New("transfer: session not running")

// Machine is the transfer-session state machine. It is pure: time comes
// with the command.
type Machine struct{}

var _ actors.Machine = Machine{}

func (Machine) Kind() string          { return Kind }
func (Machine) SchemaVersion() uint32 { return 1 }
func (Machine) Initial(id string) proto.Message {
	return &triplanev1.TransferState{Id: id}
}

func running(s *triplanev1.TransferState) bool {
	return s.Status == triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING
}

func (Machine) Decide(state proto.Message, cmd actors.Command) actors.Decision {
	s := state.(*triplanev1.TransferState)
	now := cmd.Now.UnixNano()
	ok := func(evs ...proto.Message) actors.Decision {
		next := proto.Clone(s).(*triplanev1.TransferState)
		for _, e := range evs {
			if err := (Machine{}).Apply(next, e); err != nil {
				return actors.Decision{Err: err}
			}
		}
		return actors.Decision{Events: evs, Reply: next}
	}
	switch c := cmd.Msg.(type) {
	case *triplanev1.TransferStart:
		max := c.MaxAttempts
		if max == 0 {
			max = DefaultMaxAttempts
		}
		if c.Blocks == 0 || c.BlockSize == 0 || max > MaxAttemptsLimit {
			return actors.Decision{Err: fmt.Errorf("transfer %s: start needs blocks and block size > 0 and at most %d attempts, got %d blocks of %d bytes, %d attempts",
				s.Id, MaxAttemptsLimit, c.Blocks, c.BlockSize, c.MaxAttempts)}
		}
		if s.Status != triplanev1.TransferStatus_TRANSFER_STATUS_UNSPECIFIED {
			// A restarted supervisor starts again: same session, resume.
			if s.Blocks != c.Blocks || s.BlockSize != c.BlockSize {
				return actors.Decision{Err: fmt.Errorf("transfer %s: already started with %d blocks of %d bytes, asked %d of %d",
					s.Id, s.Blocks, s.BlockSize, c.Blocks, c.BlockSize)}
			}
			return ok()
		}
		return ok(&triplanev1.TransferStarted{Blocks: c.Blocks, BlockSize: c.BlockSize, MaxAttempts: max, Peer: c.Peer, AtUnixNano: now})
	case *triplanev1.TransferAck:
		if s.Status == triplanev1.TransferStatus_TRANSFER_STATUS_UNSPECIFIED {
			return actors.Decision{Err: fmt.Errorf("%w: %s has not started", ErrNotRunning, s.Id)}
		}
		if c.To > s.Blocks || c.From > c.To {
			return actors.Decision{Err: fmt.Errorf("transfer %s: ack [%d, %d) outside the %d blocks", s.Id, c.From, c.To, s.Blocks)}
		}
		if c.To <= s.Acked {
			// A repeated ack, also after completion: a retry of an append
			// that failed yet was written must not fail the transfer. (The
			// simulator's transfer scenario found this.)
			return ok()
		}
		if !running(s) {
			return actors.Decision{Err: fmt.Errorf("%w: %s is %s", ErrNotRunning, s.Id, s.Status)}
		}
		if c.From > s.Acked {
			return actors.Decision{Err: fmt.Errorf("transfer %s: ack [%d, %d) leaves a gap after block %d", s.Id, c.From, c.To, s.Acked)}
		}
		evs := []proto.Message{&triplanev1.TransferRangeAcked{From: s.Acked, To: c.To}}
		if c.To == s.Blocks {
			evs = append(evs, &triplanev1.TransferCompleted{AtUnixNano: now})
		}
		return ok(evs...)
	case *triplanev1.TransferAttemptFailed:
		if !running(s) {
			return actors.Decision{Err: fmt.Errorf("%w: %s is %s", ErrNotRunning, s.Id, s.Status)}
		}
		if s.Attempts+1 >= s.MaxAttempts {
			return ok(&triplanev1.TransferGaveUp{Attempts: s.Attempts + 1, Error: c.Error, AtUnixNano: now})
		}
		return ok(&triplanev1.TransferRetrying{Attempt: s.Attempts + 1, Error: c.Error})
	case *triplanev1.TransferCancel:
		if !running(s) {
			return ok()
		}
		return ok(&triplanev1.TransferCancelled{Reason: c.Reason, AtUnixNano: now})
	case *triplanev1.TransferGet:
		return ok()
	}
	return actors.Decision{Err: fmt.Errorf("transfer: unknown command %T", cmd.Msg)}
}

func (Machine) Apply(state proto.Message, event proto.Message) error {
	s := state.(*triplanev1.TransferState)
	switch e := event.(type) {
	case *triplanev1.TransferStarted:
		s.Status = triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING
		s.Blocks, s.BlockSize, s.MaxAttempts, s.Peer, s.StartedUnixNano = e.Blocks, e.BlockSize, e.MaxAttempts, e.Peer, e.AtUnixNano
	case *triplanev1.TransferRangeAcked:
		s.Acked = e.To
		s.Bytes = e.To * s.BlockSize
	case *triplanev1.TransferRetrying:
		s.Attempts = e.Attempt
		s.Error = e.Error
	case *triplanev1.TransferCompleted:
		s.Status = triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED
		s.EndedUnixNano = e.AtUnixNano
		s.Error = ""
	case *triplanev1.TransferGaveUp:
		s.Status = triplanev1.TransferStatus_TRANSFER_STATUS_FAILED
		s.Attempts, s.Error, s.EndedUnixNano = e.Attempts, e.Error, e.AtUnixNano
	case *triplanev1.TransferCancelled:
		s.Status = triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED
		s.Error, s.EndedUnixNano = "cancelled: "+e.Reason, e.AtUnixNano
	default:
		return fmt.Errorf("transfer: unknown event %T", event)
	}
	return nil
}
