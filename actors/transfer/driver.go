package transfer

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
)

// Pacing is how a Driver paces a session; a zero field takes its default.
type Pacing struct {
	// RangeBlocks is the number of blocks written and acknowledged
	// together (default 16): the granularity of resumption.
	RangeBlocks int
	// Backoff between attempts doubles from BackoffMin (default 50 ms) up
	// to BackoffMax (default 5 s), with jitter.
	BackoffMin, BackoffMax time.Duration
}

func (p Pacing) withDefaults() Pacing {
	if p.RangeBlocks <= 0 {
		p.RangeBlocks = 16
	}
	if p.BackoffMin <= 0 {
		p.BackoffMin = 50 * time.Millisecond
	}
	if p.BackoffMax < p.BackoffMin {
		p.BackoffMax = max(5*time.Second, p.BackoffMin)
	}
	return p
}

// Op is the kind of an Action.
type Op uint8

const (
	// OpAsk: send Action.Msg to the session's actor; the outcome is its
	// reply or error.
	OpAsk Op = iota + 1
	// OpDial: connect to the receiving peer.
	OpDial
	// OpWrite: write Action.Blocks (blocks [From, To)) over the connection.
	OpWrite
	// OpWait: let Action.Wait pass (or the run be stopped).
	OpWait
	// OpDone: the run is over; it returns Action.State and Action.Err.
	OpDone
)

func (o Op) String() string {
	switch o {
	case OpAsk:
		return "ask"
	case OpDial:
		return "dial"
	case OpWrite:
		return "write"
	case OpWait:
		return "wait"
	case OpDone:
		return "done"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// End says which of the supervisor's end counters a finished run counts in.
type End uint8

const (
	EndUncounted End = iota
	EndCompleted
	EndGaveUp
	// EndCancelled: this run cancelled a session it saw running.
	EndCancelled
)

// Action is what a Driver asks its shell to do next.
type Action struct {
	Op Op
	// Msg is the command to ask (OpAsk). A TransferCancel is only asked
	// once the run was stopped, so the shell must not ask it under the
	// run's own (done) context.
	Msg proto.Message
	// From, To and Blocks, the spec's Blocks[From:To], are the range to
	// write (OpWrite).
	From, To uint64
	Blocks   []data.Op
	// Wait is the backoff before the next attempt (OpWait).
	Wait time.Duration
	// Again, for OpWait, is the transient failure of the command asked
	// just now, which is asked again after the wait (a pause within the
	// attempt, not a new attempt); nil for a backoff between attempts.
	Again error
	// State is the session after the failed attempt (OpWait, for the log)
	// or the state the run returns (OpDone).
	State *triplanev1.TransferState
	// Err is the error the run returns (OpDone).
	Err error
	// Hangup: close the connection before doing the rest, the attempt
	// that used it failed and the next one dials afresh (the peer may have
	// moved).
	Hangup bool
	// AckedBytes are the block bytes the ack that led here journaled.
	AckedBytes uint64
	// Ended and Moved, for OpDone: which end counter the run counts in,
	// and the bytes acknowledged since the run began (0 unless it
	// completed), for the throughput of the session.
	Ended End
	Moved uint64
}

// Outcome is what came of the Action a Driver asked for.
type Outcome struct {
	// Reply and Err: the actor's reply to OpAsk, or Err if asking failed;
	// Err alone for OpDial and OpWrite. Nil for OpWait.
	Reply proto.Message
	Err   error
	// Stop, when set, says the run was stopped (cancelled, or its requester
	// went away) and why. It is heeded where a run has always looked at its
	// context: after a failed step of an attempt, after a failed report of
	// one, and during a wait. A step that succeeded goes on, since its
	// result may already be journaled; under a done context the next step
	// fails and the run stops there.
	Stop error
	// Jitter is a uniform random draw. The Driver turns it into the wait
	// when this outcome leads to a backoff, so that it has no random source
	// of its own and a simulator can replay the choice from its seed.
	Jitter uint64
}

type phase uint8

const (
	starting phase = iota
	dialling
	writing
	acking
	reporting // a failed attempt
	reading   // after reporting found the session ended
	checking  // after a report whose append's outcome is unknown
	pausing   // before asking again a command that failed transiently
	waiting
	cancelling
	finished
)

// Driver is the decision logic of Supervisor.Run for one session, without
// its goroutines, timers, transport or actor host, so that the simulator
// runs the very code production runs. Fed the outcome of each Action, it
// says what to do next: ask the session's actor, dial, write a range, back
// off, or return. Everything it does follows from its inputs; it is not
// safe for concurrent use.
type Driver struct {
	spec Spec
	pace Pacing

	phase    phase
	act      Action
	st       *triplanev1.TransferState
	startAck uint64
	from, to uint64
	dialled  bool
	backoff  time.Duration
	reason   string // of the cancellation being journaled
	// tries counts transient failures in a row of the command being asked
	// (its append failed, or it was never applied); resume and resumeMsg
	// are what to ask after the pause.
	tries     int
	resume    phase
	resumeMsg proto.Message
	reportMsg proto.Message // the failed attempt's report, to send again
	lastErr   error         // why the report is being checked
	// Notes for the next Action, set by the step that leads to it.
	hangup bool
	acked  uint64
}

// NewDriver checks spec and returns a Driver whose first Action asks the
// session to start (or, if it ran before, to say where it stands).
func NewDriver(spec Spec, p Pacing) (*Driver, error) {
	for i, op := range spec.Blocks {
		if len(op.Src) != spec.BlockSize || op.Dst.Length != uint64(spec.BlockSize) {
			return nil, fmt.Errorf("transfer %s: block %d is %d bytes into %s, want %d", spec.ID, i, len(op.Src), op.Dst, spec.BlockSize)
		}
	}
	p = p.withDefaults()
	d := &Driver{spec: spec, pace: p, backoff: p.BackoffMin}
	d.ask(starting, &triplanev1.TransferStart{Blocks: uint64(len(spec.Blocks)), BlockSize: uint64(spec.BlockSize),
		MaxAttempts: spec.MaxAttempts, Peer: spec.Peer})
	return d, nil
}

// Action is what to do now: the first step, or the answer of the last Next.
func (d *Driver) Action() Action { return d.act }

// Next takes the outcome of the current Action and returns the next one.
// After OpDone it keeps returning that.
func (d *Driver) Next(o Outcome) Action {
	switch d.phase {
	case starting:
		st, err := d.reply(o)
		if o.Stop == nil && d.transient(err) {
			// Starting is idempotent: a session that did start answers
			// where it stands.
			return d.pause(starting, d.act.Msg, err, o)
		}
		if err != nil && o.Stop != nil {
			// Stopped while asking: the start may have been applied, and
			// a session left running would be driven by nobody. Cancelling
			// one that never started changes nothing.
			return d.cancel(o.Stop)
		}
		if err != nil {
			return d.finish(nil, err, EndUncounted)
		}
		d.st, d.startAck = st, st.Acked
		return d.proceed()
	case dialling:
		if o.Err != nil {
			return d.attemptFailed(fmt.Errorf("dial: %w", o.Err), o.Stop)
		}
		d.dialled = true
		return d.proceed()
	case writing:
		if o.Err != nil {
			return d.attemptFailed(o.Err, o.Stop)
		}
		return d.ask(acking, &triplanev1.TransferAck{From: d.from, To: d.to})
	case acking:
		st, err := d.reply(o)
		if o.Stop == nil && d.transient(err) {
			// The blocks landed and were verified; only journaling the ack
			// failed, or it was written after all: asking again is safe
			// (a repeated ack is a no-op) and spares an attempt.
			return d.pause(acking, d.act.Msg, err, o)
		}
		if err != nil {
			// The ack is not repeated: the report of the failure answers
			// with the session as journaled, and the next attempt resumes
			// from there.
			return d.attemptFailed(fmt.Errorf("journal ack: %w", err), o.Stop)
		}
		d.acked = (d.to - d.from) * uint64(d.spec.BlockSize)
		d.st = st
		return d.proceed()
	case reporting:
		st, err := d.reply(o)
		if o.Stop == nil && d.transient(err) {
			// Written or not? Reporting again would count the attempt
			// twice if it was: read the session first.
			d.lastErr = err
			return d.ask(checking, &triplanev1.TransferGet{})
		}
		if errors.Is(err, ErrNotRunning) {
			// It ended meanwhile (cancelled elsewhere, or the ack that
			// failed had been written and completed it): report how.
			return d.ask(reading, &triplanev1.TransferGet{})
		}
		return d.reported(st, err, o)
	case reading:
		st, err := d.reply(o)
		return d.reported(st, err, o)
	case checking:
		st, err := d.reply(o)
		switch {
		case o.Stop == nil && d.transient(err):
			return d.pause(checking, d.act.Msg, err, o)
		case err != nil:
			return d.reported(nil, err, o)
		case !running(st) || st.Attempts > d.st.Attempts:
			d.tries = 0                   // the report went through: the next command counts afresh
			return d.reported(st, nil, o) // the report was journaled
		}
		return d.pause(reporting, d.reportMsg, d.lastErr, o)
	case pausing:
		if o.Stop != nil {
			return d.cancel(o.Stop)
		}
		return d.ask(d.resume, d.resumeMsg)
	case waiting:
		if o.Stop != nil {
			return d.cancel(o.Stop)
		}
		d.backoff = min(d.backoff*2, d.pace.BackoffMax)
		return d.proceed()
	case cancelling:
		st, err := d.reply(o)
		if d.transient(err) {
			// Asked again at once: the run is stopped, there is no waiting
			// for it, and a session left running would be driven by nobody.
			d.tries++
			return d.ask(cancelling, d.act.Msg)
		}
		if err != nil {
			return d.finish(nil, fmt.Errorf("%w: transfer %s (journaling the cancellation failed: %v)", ErrCancelled, d.spec.ID, err), EndUncounted)
		}
		switch st.Status {
		case triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED, triplanev1.TransferStatus_TRANSFER_STATUS_FAILED:
			// It ended before the cancellation (an ack or a report that
			// failed yet was written): the requester learns how, and a
			// completed transfer is not reported cancelled.
			d.st = st
			return d.end()
		}
		end := EndUncounted
		if st.Status == triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED && d.st != nil && running(d.st) {
			// Counted when this run saw the session running: one that
			// never started (the stop came during its start) is not.
			end = EndCancelled
		}
		return d.finish(st, fmt.Errorf("%w: transfer %s: %s", ErrCancelled, d.spec.ID, d.reason), end)
	}
	return d.act
}

// proceed writes the range after the acknowledged prefix, dialling first,
// or ends the run once the session is no longer running.
func (d *Driver) proceed() Action {
	if !running(d.st) {
		return d.end()
	}
	if !d.dialled {
		return d.set(dialling, Action{Op: OpDial})
	}
	from := d.st.Acked
	to := min(from+uint64(d.pace.RangeBlocks), d.st.Blocks)
	if from >= to || to > uint64(len(d.spec.Blocks)) {
		// Only a state that contradicts the spec gets here; writing
		// nothing would be acknowledged as nothing, for ever.
		return d.finish(nil, fmt.Errorf("transfer %s: running with %d of %d blocks acknowledged, the spec has %d: nothing to write",
			d.spec.ID, d.st.Acked, d.st.Blocks, len(d.spec.Blocks)), EndUncounted)
	}
	d.from, d.to = from, to
	return d.set(writing, Action{Op: OpWrite, From: from, To: to, Blocks: d.spec.Blocks[from:to]})
}

func (d *Driver) attemptFailed(err, stop error) Action {
	d.hangup, d.dialled = d.dialled, false
	d.tries = 0 // the report (or cancellation) is a new command
	if stop != nil {
		// The failure is likely the stop itself: not an attempt to count.
		return d.cancel(stop)
	}
	d.reportMsg = &triplanev1.TransferAttemptFailed{Error: err.Error()}
	return d.ask(reporting, d.reportMsg)
}

// maxTransientTries bounds the transient failures in a row of one command
// (an append that failed, a command never applied) before the run ends
// with the error: the journal is then likely down, not flaky.
const maxTransientTries = 5

// transient reports whether asking failed in a way a retry may cure, with
// tries left: the append's outcome is unknown (actors.ErrPersist) or the
// command was never applied (actors.ErrNotApplied, ErrOverloaded).
func (d *Driver) transient(err error) bool {
	if err == nil || d.tries >= maxTransientTries {
		return false
	}
	return errors.Is(err, actors.ErrPersist) || errors.Is(err, actors.ErrNotApplied) || errors.Is(err, actors.ErrOverloaded)
}

// pause waits a jittered backoff that doubles with each try (a journal
// that fails again and again is given time), then asks msg in phase p again.
func (d *Driver) pause(p phase, msg proto.Message, err error, o Outcome) Action {
	d.tries++
	d.resume, d.resumeMsg = p, msg
	wait := jittered(min(d.pace.BackoffMin<<(d.tries-1), d.pace.BackoffMax), o.Jitter)
	return d.set(pausing, Action{Op: OpWait, Wait: wait, State: d.st, Again: err})
}

// reported goes on from the answer to a failed attempt's report: back off
// and try again if the session still runs.
func (d *Driver) reported(st *triplanev1.TransferState, err error, o Outcome) Action {
	if err != nil {
		if o.Stop != nil {
			return d.cancel(o.Stop)
		}
		return d.finish(nil, err, EndUncounted)
	}
	d.st = st
	if !running(st) {
		return d.end()
	}
	return d.set(waiting, Action{Op: OpWait, Wait: jittered(d.backoff, o.Jitter), State: st})
}

// jittered is a wait between half of backoff and backoff, drawn from
// jitter.
func jittered(backoff time.Duration, jitter uint64) time.Duration {
	half := backoff / 2
	return half + time.Duration(jitter%uint64(half+1))
}

func (d *Driver) cancel(stop error) Action {
	d.tries = 0 // a new command: its own transient failures
	d.reason = stop.Error()
	return d.ask(cancelling, &triplanev1.TransferCancel{Reason: d.reason})
}

// end returns how the session ended, as the requester is to see it.
func (d *Driver) end() Action {
	st := d.st
	switch st.Status {
	case triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED:
		var moved uint64
		if st.Acked > d.startAck {
			moved = (st.Acked - d.startAck) * st.BlockSize
		}
		return d.set(finished, Action{Op: OpDone, State: st, Ended: EndCompleted, Moved: moved})
	case triplanev1.TransferStatus_TRANSFER_STATUS_FAILED:
		return d.finish(st, fmt.Errorf("%w: transfer %s after %d attempts, %d of %d blocks acknowledged: %s",
			ErrGaveUp, d.spec.ID, st.Attempts, st.Acked, st.Blocks, st.Error), EndGaveUp)
	case triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED:
		return d.finish(st, fmt.Errorf("%w: transfer %s: %s", ErrCancelled, d.spec.ID, st.Error), EndUncounted)
	}
	return d.finish(st, fmt.Errorf("transfer %s: unexpected status %s", d.spec.ID, st.Status), EndUncounted)
}

func (d *Driver) finish(st *triplanev1.TransferState, err error, e End) Action {
	return d.set(finished, Action{Op: OpDone, State: st, Err: err, Ended: e})
}

func (d *Driver) ask(p phase, msg proto.Message) Action {
	return d.set(p, Action{Op: OpAsk, Msg: msg})
}

func (d *Driver) set(p phase, a Action) Action {
	a.Hangup, a.AckedBytes = d.hangup, d.acked
	d.hangup, d.acked = false, 0
	d.phase, d.act = p, a
	return a
}

func (d *Driver) reply(o Outcome) (*triplanev1.TransferState, error) {
	st, err := stateOf(d.spec.ID, d.act.Msg, o.Reply, o.Err)
	if err == nil && d.phase != checking {
		// A command went through: the next one's transient failures count
		// afresh. (A check only reads: the report it checks is not through.)
		d.tries = 0
	}
	return st, err
}

// stateOf reads a session's reply to cmd.
func stateOf(id string, cmd, reply proto.Message, err error) (*triplanev1.TransferState, error) {
	if err != nil {
		return nil, fmt.Errorf("transfer %s: %T: %w", id, cmd, err)
	}
	st, ok := reply.(*triplanev1.TransferState)
	if !ok || st == nil {
		return nil, fmt.Errorf("transfer %s: %T replied %T", id, cmd, reply)
	}
	return st, nil
}
