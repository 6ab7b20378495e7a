package sim

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/transfer"
	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
)

// The transfer scenario's shape.
const (
	transferSessions  = 12
	transferBlocks    = 64   // blocks per session
	transferBlockSize = 256  // bytes per block
	transferRange     = 8    // blocks sent and acknowledged together
	transferBandwidth = 2e9  // bytes per second on the simulated link
	transferAttempts  = 30   // attempts per session before it gives up
	transferCorrupt   = 0.03 // probability a range arrives with a flipped bit
	transferReset     = 0.05 // probability the connection resets during a range
)

// BugAckBeforeVerify makes the simulated receiver acknowledge a range
// before checking its checksums: a corrupted block can then be accepted.
const BugAckBeforeVerify = "ack-before-verify"

// transferScenario runs the real transfer-session machine on the simulated
// host: sessions move KV blocks of real bytes over a simulated link with
// latency and bandwidth that corrupts ranges and resets connections part-way;
// the receiver verifies each block's checksum before acknowledging; the
// driver (the supervisor's part) resumes from the last acknowledged block
// with backoff, while journal appends fail and session actors crash.
var transferScenario = Scenario{
	Name: "transfer",
	Description: fmt.Sprintf("%d transfer sessions of %d blocks over a lossy link (corruption, resets part-way), resumed from the last acknowledged block; append failures and actor crashes",
		transferSessions, transferBlocks),
	Registry: func() *actors.Registry { return actors.NewRegistry(transfer.Machine{}) },
	Drive:    driveTransfers,
}

type simSession struct {
	addr     actors.Address
	hashes   []uint64
	src      [][]byte
	dst      [][]byte // the receiver's memory
	accepted []bool   // blocks the receiver acknowledged
	ended    int      // how many times the requester heard the end
	outcome  string
	attempts int
}

type transferRun struct {
	r        *Run
	sessions []*simSession
	problems []error
	ranges   uint64
	corrupt  uint64
	resets   uint64
}

func driveTransfers(r *Run) Invariant {
	t := &transferRun{r: r}
	w := r.World
	for i := range transferSessions {
		s := &simSession{addr: actors.Address{Kind: transfer.Kind, ID: fmt.Sprintf("kv-%d", i)}}
		for b := range transferBlocks {
			h := uint64(i)<<32 | uint64(b) + 1
			buf := make([]byte, transferBlockSize)
			mocker.Fill(buf, h)
			s.hashes = append(s.hashes, h)
			s.src = append(s.src, buf)
			s.dst = append(s.dst, make([]byte, transferBlockSize))
			s.accepted = append(s.accepted, false)
		}
		t.sessions = append(t.sessions, s)
		at := time.Duration(w.Rand().Int64N(int64(r.Opts.Duration)))
		w.After(at, func() { t.start(s) })
	}
	if r.Opts.Faults.CrashRate > 0 {
		for range 4 {
			s := t.sessions[w.Rand().IntN(len(t.sessions))]
			w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() { r.Host.Crash(s.addr) })
		}
	}
	return t.check
}

// ask delivers a command to a session, retrying after a pause when the
// journal append failed or the actor crashed (the supervisor's loop does).
func (t *transferRun) ask(s *simSession, msg proto.Message, then func(*triplanev1.TransferState, error)) {
	s.attempts++
	id := fmt.Sprintf("%s.%d", s.addr.ID, s.attempts)
	t.r.Host.Deliver(s.addr, id, msg, func(m proto.Message, err error) {
		if errors.Is(err, actors.ErrPersist) || errors.Is(err, ErrCrashed) {
			t.r.World.After(5*time.Millisecond, func() { t.ask(s, msg, then) })
			return
		}
		st, _ := m.(*triplanev1.TransferState)
		then(st, err)
	})
}

func (t *transferRun) start(s *simSession) {
	t.ask(s, &triplanev1.TransferStart{Blocks: transferBlocks, BlockSize: transferBlockSize,
		MaxAttempts: transferAttempts, Peer: "decode"}, func(st *triplanev1.TransferState, err error) {
		if err != nil {
			t.problems = append(t.problems, fmt.Errorf("%s: start: %w", s.addr, err))
			return
		}
		t.next(s, st)
	})
}

// next sends the range after the acknowledged prefix, or ends.
func (t *transferRun) next(s *simSession, st *triplanev1.TransferState) {
	switch st.GetStatus() {
	case triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED:
		t.end(s, "completed")
		return
	case triplanev1.TransferStatus_TRANSFER_STATUS_FAILED:
		t.end(s, "gave up: "+st.GetError())
		return
	}
	w := t.r.World
	from := int(st.GetAcked())
	to := min(from+transferRange, transferBlocks)
	t.ranges++
	bytes := (to - from) * transferBlockSize
	delay := time.Duration(100+w.Rand().IntN(900))*time.Microsecond + time.Duration(float64(bytes)/transferBandwidth*float64(time.Second))
	reset := w.Chance(transferReset)
	corruptAt := -1
	if w.Chance(transferCorrupt) {
		corruptAt = from + w.Rand().IntN(to-from)
	}
	w.After(delay, func() {
		if reset {
			// The connection dropped part-way: some blocks of the range may
			// have landed, none is acknowledged.
			t.resets++
			t.retry(s, "connection reset by peer")
			return
		}
		// The receiver: each block lands with the sender's checksum and is
		// verified before the range is acknowledged.
		ok := true
		for b := from; b < to; b++ {
			copy(s.dst[b], s.src[b])
			if b == corruptAt {
				t.corrupt++
				s.dst[b][w.Rand().IntN(transferBlockSize)] ^= 1
			}
			if data.Checksum(s.dst[b]) != data.Checksum(s.src[b]) && t.r.Opts.Bug != BugAckBeforeVerify {
				ok = false
			}
		}
		if !ok {
			t.retry(s, "checksum mismatch")
			return
		}
		for b := from; b < to; b++ {
			s.accepted[b] = true
		}
		t.ask(s, &triplanev1.TransferAck{From: uint64(from), To: uint64(to)}, func(st *triplanev1.TransferState, err error) {
			if err != nil {
				t.problems = append(t.problems, fmt.Errorf("%s: ack [%d, %d): %w", s.addr, from, to, err))
				return
			}
			t.next(s, st)
		})
	})
}

func (t *transferRun) retry(s *simSession, why string) {
	t.ask(s, &triplanev1.TransferAttemptFailed{Error: why}, func(st *triplanev1.TransferState, err error) {
		if errors.Is(err, transfer.ErrNotRunning) {
			// A retried report whose first try was written and ended the
			// session: read where it is.
			t.ask(s, &triplanev1.TransferGet{}, func(st *triplanev1.TransferState, err error) {
				if err != nil {
					t.problems = append(t.problems, fmt.Errorf("%s: get: %w", s.addr, err))
					return
				}
				t.next(s, st)
			})
			return
		}
		if err != nil {
			t.problems = append(t.problems, fmt.Errorf("%s: attempt failed: %w", s.addr, err))
			return
		}
		// Doubling backoff from 1 ms, capped: resume from the last
		// acknowledged block.
		back := time.Millisecond << min(st.GetAttempts(), 6)
		t.r.World.After(back, func() { t.next(s, st) })
	})
}

func (t *transferRun) end(s *simSession, outcome string) {
	s.ended++
	s.outcome = outcome
}

func (t *transferRun) check(r *Run) error {
	if len(t.problems) > 0 {
		return fmt.Errorf("%w (and %d more)", t.problems[0], len(t.problems)-1)
	}
	for _, s := range t.sessions {
		if s.ended != 1 {
			return fmt.Errorf("invariant exactly-once: session %s ended %d times (outcome %q)", s.addr, s.ended, s.outcome)
		}
		st, ok := r.Host.State(s.addr).(*triplanev1.TransferState)
		if !ok {
			continue // down at the end: replay is checked separately
		}
		for b := range int(st.Acked) {
			if !s.accepted[b] {
				return fmt.Errorf("invariant acked-landed: %s journaled block %d acknowledged, the receiver never accepted it", s.addr, b)
			}
			if !mocker.Verify(s.dst[b], s.hashes[b]) {
				return fmt.Errorf("invariant no-corrupt-block: %s block %d was acknowledged with wrong bytes", s.addr, b)
			}
		}
		if s.outcome == "completed" && st.Acked != transferBlocks {
			return fmt.Errorf("invariant complete: %s completed with %d of %d blocks acknowledged", s.addr, st.Acked, transferBlocks)
		}
	}
	r.World.Tracef("transfer: %d sessions, %d ranges sent, %d corrupted, %d resets", len(t.sessions), t.ranges, t.corrupt, t.resets)
	return nil
}
