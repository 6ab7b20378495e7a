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
	transferDialFail  = 0.02 // probability a dial is refused
	transferGone      = 0.1  // probability a session's requester goes away mid-run

	transferBackoffMin = time.Millisecond      // the backoff between attempts doubles from here
	transferBackoffMax = 64 * time.Millisecond // up to here
)

// BugAckBeforeVerify makes the simulated receiver acknowledge a range
// before checking its checksums: a corrupted block can then be accepted.
const BugAckBeforeVerify = "ack-before-verify"

// transferScenario runs the real transfer-session machine on the simulated
// host, driven by the supervisor's real decision logic (transfer.Driver):
// sessions move KV blocks of real bytes over a simulated link with latency
// and bandwidth that refuses dials, corrupts ranges and resets connections
// part-way; the receiver verifies each block's checksum before
// acknowledging; the Driver resumes from the last acknowledged block with
// backoff, while journal appends fail and session actors crash. Each
// session is run once, as one requester's Run: it ends completed or with
// an error that requester sees.
var transferScenario = Scenario{
	Name: "transfer",
	Description: fmt.Sprintf("%d transfer sessions of %d blocks driven by the supervisor's core over a lossy link (refused dials, corruption, resets part-way), resumed from the last acknowledged block; append failures and actor crashes",
		transferSessions, transferBlocks),
	Registry: func() *actors.Registry { return actors.NewRegistry(transfer.Machine{}) },
	Drive:    driveTransfers,
	// The session actors journal through the host.
	Bugs:    []string{BugApplyBeforePersist, BugSnapshotBeforePersist, BugAckBeforeVerify},
	Crashes: "any rate above 0 crashes a random session actor 4 times (a fixed number, however high the rate)",
}

type simSession struct {
	addr     actors.Address
	hashes   []uint64
	src      [][]byte
	dst      [][]byte // the receiver's memory
	accepted []bool   // blocks the receiver acknowledged
	drv      *transfer.Driver
	link     bool // dialled, and not reset or hung up since
	asks     int
	ended    int // how many times the run returned
	state    *triplanev1.TransferState
	err      error // what the requester saw
	// goneAt is when the requester goes away (zero: never), as a
	// cancelled context stops the real Run.
	goneAt time.Time
}

// errRequesterGone is the cause of a simulated requester's cancellation.
var errRequesterGone = errors.New("requester went away")

type transferRun struct {
	r        *Run
	sessions []*simSession
	problems *Problems
	ranges   uint64
	corrupt  uint64
	resets   uint64
	dials    uint64
}

func driveTransfers(r *Run) Invariant {
	t := &transferRun{r: r, problems: NewProblems(r.World)}
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
		if w.Chance(transferGone) {
			s.goneAt = Epoch.Add(at + time.Duration(w.Rand().Int64N(int64(200*time.Millisecond))))
		}
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

// start begins a session's run: the supervisor's own Driver, with the
// simulated host as its actor host and the simulated link as its transport.
func (t *transferRun) start(s *simSession) {
	ops := make([]data.Op, transferBlocks)
	for b := range ops {
		ops[b] = data.Op{Src: s.src[b], Dst: data.Descriptor{Region: 9, Offset: uint64(b * transferBlockSize), Length: transferBlockSize}}
	}
	d, err := transfer.NewDriver(transfer.Spec{ID: s.addr.ID, Blocks: ops, BlockSize: transferBlockSize, MaxAttempts: transferAttempts, Peer: "decode"},
		transfer.Pacing{RangeBlocks: transferRange, BackoffMin: transferBackoffMin, BackoffMax: transferBackoffMax})
	if err != nil {
		t.problems.Add(fmt.Errorf("%s: %w", s.addr, err))
		return
	}
	s.drv = d
	t.do(s, d.Action())
}

// next hands the Driver what came of its last action. The jitter is drawn
// from the world, so a seed replays every backoff.
func (t *transferRun) next(s *simSession, o transfer.Outcome) {
	o.Jitter = t.r.World.Rand().Uint64()
	if t.gone(s) {
		o.Stop = errRequesterGone
	}
	t.do(s, s.drv.Next(o))
}

// do carries out one action, as Supervisor.Run does with real I/O.
func (t *transferRun) do(s *simSession, a transfer.Action) {
	w := t.r.World
	if a.Hangup {
		s.link = false
	}
	switch a.Op {
	case transfer.OpAsk:
		s.asks++
		id := fmt.Sprintf("%s.%d", s.addr.ID, s.asks)
		// A failed append (actors.ErrPersist) or a crash reaches the Driver
		// as an error, as the host's would reach the supervisor.
		if _, cancel := a.Msg.(*triplanev1.TransferCancel); t.gone(s) && !cancel {
			// Under a cancelled context the request returns the
			// context's error, sent or not (actors.Host.Request).
			if w.Chance(0.5) {
				t.r.Host.Deliver(s.addr, id, a.Msg, nil)
			}
			w.After(t.linkLatency(), func() { t.next(s, transfer.Outcome{Err: errRequesterGone}) })
			return
		}
		t.r.Host.Deliver(s.addr, id, a.Msg, func(m proto.Message, err error) {
			t.checkReply(s, a.Msg, err)
			t.next(s, transfer.Outcome{Reply: m, Err: err})
		})
	case transfer.OpDial:
		t.dials++
		var err error
		switch {
		case t.gone(s):
			err = errRequesterGone // a dial under a cancelled context fails at once
		case w.Chance(transferDialFail):
			err = errors.New("connection refused")
		}
		w.After(t.linkLatency(), func() {
			s.link = err == nil
			t.next(s, transfer.Outcome{Err: err})
		})
	case transfer.OpWrite:
		t.write(s, a)
	case transfer.OpWait:
		if a.Again != nil {
			w.Tracef("%s asks again after %s: %v", s.addr, a.Wait, a.Again)
		} else {
			w.Tracef("%s attempt %d failed (%s), retrying after %s from block %d", s.addr, a.State.GetAttempts(), a.State.GetError(), a.Wait, a.State.GetAcked())
		}
		wait := a.Wait
		if !s.goneAt.IsZero() && s.goneAt.Before(w.Now().Add(wait)) {
			wait = max(s.goneAt.Sub(w.Now()), 0) // the real Run's select wakes at the cancellation
		}
		w.After(wait, func() { t.next(s, transfer.Outcome{}) })
	case transfer.OpDone:
		s.ended++
		s.state, s.err = a.State, a.Err
		w.Tracef("%s run returned %s, %v", s.addr, a.State.GetStatus(), a.Err)
	}
}

// checkReply records a command the actor refused for a reason other than
// an injected fault: the Driver would take it for a failed attempt and
// carry on, hiding a disagreement between it and the machine.
func (t *transferRun) checkReply(s *simSession, cmd proto.Message, err error) {
	if err == nil || errors.Is(err, actors.ErrPersist) || errors.Is(err, ErrCrashed) {
		return
	}
	if _, ok := cmd.(*triplanev1.TransferAttemptFailed); ok && errors.Is(err, transfer.ErrNotRunning) {
		return // the session ended meanwhile; the Driver reads how
	}
	t.problems.Add(fmt.Errorf("invariant commands-accepted: %s refused %T: %w", s.addr, cmd, err))
}

func (t *transferRun) linkLatency() time.Duration {
	return time.Duration(100+t.r.World.Rand().IntN(900)) * time.Microsecond
}

// write sends a range over the simulated link to the simulated receiver.
func (t *transferRun) write(s *simSession, a transfer.Action) {
	w := t.r.World
	if !s.link {
		t.problems.Add(fmt.Errorf("invariant dial-before-write: %s wrote [%d, %d) with no connection", s.addr, a.From, a.To))
		t.next(s, transfer.Outcome{Err: errors.New("not connected")})
		return
	}
	if t.gone(s) {
		// A write under a cancelled context is broken off.
		w.After(t.linkLatency(), func() { t.next(s, transfer.Outcome{Err: errRequesterGone}) })
		return
	}
	from, to := int(a.From), int(a.To)
	t.ranges++
	bytes := (to - from) * transferBlockSize
	delay := t.linkLatency() + time.Duration(float64(bytes)/transferBandwidth*float64(time.Second))
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
			s.link = false
			t.next(s, transfer.Outcome{Err: errors.New("connection reset by peer")})
			return
		}
		// The receiver: each block lands with the sender's checksum and is
		// verified before the range is acknowledged.
		ok := true
		for i, op := range a.Blocks {
			b := from + i
			copy(s.dst[b], op.Src)
			if b == corruptAt {
				t.corrupt++
				s.dst[b][w.Rand().IntN(transferBlockSize)] ^= 1
			}
			if data.Checksum(s.dst[b]) != data.Checksum(op.Src) && t.r.Opts.Bug != BugAckBeforeVerify {
				ok = false
			}
		}
		if !ok {
			t.next(s, transfer.Outcome{Err: errors.New("checksum mismatch")})
			return
		}
		for b := from; b < to; b++ {
			s.accepted[b] = true
		}
		t.next(s, transfer.Outcome{})
	})
}

func (t *transferRun) check(r *Run) error {
	if err := t.problems.Err(); err != nil {
		return err
	}
	failed, orphans, cancelled := 0, 0, 0
	for _, s := range t.sessions {
		if s.ended != 1 {
			return fmt.Errorf("invariant exactly-once: session %s's run returned %d times (state %v, err %v)", s.addr, s.ended, s.state, s.err)
		}
		switch {
		case s.err == nil:
			if s.state.GetStatus() != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || s.state.GetAcked() != transferBlocks {
				return fmt.Errorf("invariant complete: %s returned no error with state %v", s.addr, s.state)
			}
		case errors.Is(s.err, transfer.ErrGaveUp):
		case errors.Is(s.err, transfer.ErrCancelled) && !s.goneAt.IsZero():
			cancelled++
		case errors.Is(s.err, actors.ErrPersist), errors.Is(s.err, ErrCrashed):
			// A command failed transiently more times in a row than the
			// Driver asks again (the journal looks down, not flaky); Run
			// returns that error. This simulator found that the Driver used
			// to end the run at the first failed append of the start or of
			// a report, leaving the session running with nothing driving
			// it (counted in the trace as left running).
			failed++
		default:
			return fmt.Errorf("invariant errors-explained: %s's run ended with %v, neither giving up nor an injected fault", s.addr, s.err)
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
		if s.err == nil && (st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || st.Acked != transferBlocks) {
			return fmt.Errorf("invariant complete: %s completed with %d of %d blocks acknowledged (%s)", s.addr, st.Acked, transferBlocks, st.Status)
		}
		if errors.Is(s.err, transfer.ErrGaveUp) && st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_FAILED {
			return fmt.Errorf("invariant gave-up-journaled: %s gave up, the journal says %s", s.addr, st.Status)
		}
		if errors.Is(s.err, transfer.ErrCancelled) && st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED &&
			st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_UNSPECIFIED {
			return fmt.Errorf("invariant cancel-journaled: %s's run returned cancelled, the journal says %s", s.addr, st.Status)
		}
		if s.err != nil && st.Status == triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING {
			orphans++
		}
	}
	r.World.Tracef("transfer: %d sessions (%d cancelled by their requester, %d ended on a journal failure, %d of them left running), %d dials, %d ranges sent, %d corrupted, %d resets",
		len(t.sessions), cancelled, failed, orphans, t.dials, t.ranges, t.corrupt, t.resets)
	return nil
}

// gone reports whether s's requester went away (its context is done).
func (t *transferRun) gone(s *simSession) bool {
	return !s.goneAt.IsZero() && !t.r.World.Now().Before(s.goneAt)
}
