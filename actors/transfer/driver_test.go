package transfer

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
)

// session is the real machine in memory, standing in for the actor host.
type session struct {
	t  *testing.T
	st *triplanev1.TransferState
}

func newSession(t *testing.T, id string) *session {
	return &session{t: t, st: Machine{}.Initial(id).(*triplanev1.TransferState)}
}

func (s *session) ask(msg proto.Message) (proto.Message, error) {
	d := Machine{}.Decide(s.st, actors.Command{Msg: msg, Now: time.Unix(100, 0)})
	if d.Err != nil {
		return nil, d.Err
	}
	for _, e := range d.Events {
		if err := (Machine{}).Apply(s.st, e); err != nil {
			s.t.Fatal(err)
		}
	}
	return proto.Clone(d.Reply), nil
}

func testSpec(id string, blocks int) Spec {
	ops := make([]data.Op, blocks)
	for i := range ops {
		ops[i] = data.Op{Src: make([]byte, 4), Dst: data.Descriptor{Region: 1, Offset: uint64(i * 4), Length: 4}}
	}
	return Spec{ID: id, Blocks: ops, BlockSize: 4, MaxAttempts: 4, Peer: "p"}
}

// Ranges of 8 blocks; the backoff doubles from 10 ms to at most 25 ms, so
// with jitter 0 the waits are 5, 10, 12.5, 12.5 ms.
func newDriver(t *testing.T, spec Spec) *Driver {
	t.Helper()
	d, err := NewDriver(spec, Pacing{RangeBlocks: 8, BackoffMin: 10 * time.Millisecond, BackoffMax: 25 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// script plays the shell: a session answers the asks, dials and writes
// succeed, unless a hook answers instead (n counts that hook's calls from 1).
type script struct {
	s     *session
	ask   func(n int, msg proto.Message) (proto.Message, error)
	dial  func(n int) error
	write func(n int, from, to uint64) error
	// stop is the Outcome.Stop of an action (nil: not stopped).
	stop func(a Action, o Outcome) error

	log      []string // one line an action
	reported []string // the errors of the failed attempts reported
	acked    uint64   // sum of AckedBytes
	asks     int
	dials    int
	writes   int
}

func (sc *script) run(t *testing.T, d *Driver) Action {
	t.Helper()
	a := d.Action()
	for range 1000 {
		line := a.Op.String()
		switch a.Op {
		case OpAsk:
			line = strings.TrimPrefix(fmt.Sprintf("%T", a.Msg), "*triplanev1.")
		case OpWrite:
			line = fmt.Sprintf("write %d-%d", a.From, a.To)
			if len(a.Blocks) != int(a.To-a.From) {
				t.Fatalf("write [%d, %d) of %d blocks", a.From, a.To, len(a.Blocks))
			}
		case OpWait:
			line = fmt.Sprintf("wait %s", a.Wait)
		}
		if a.Hangup {
			line = "hangup, " + line
		}
		sc.log = append(sc.log, line)
		sc.acked += a.AckedBytes
		var o Outcome
		switch a.Op {
		case OpAsk:
			if m, ok := a.Msg.(*triplanev1.TransferAttemptFailed); ok {
				sc.reported = append(sc.reported, m.Error)
			}
			sc.asks++
			if sc.ask != nil {
				o.Reply, o.Err = sc.ask(sc.asks, a.Msg)
			} else {
				o.Reply, o.Err = sc.s.ask(a.Msg)
			}
		case OpDial:
			sc.dials++
			if sc.dial != nil {
				o.Err = sc.dial(sc.dials)
			}
		case OpWrite:
			sc.writes++
			if sc.write != nil {
				o.Err = sc.write(sc.writes, a.From, a.To)
			}
		case OpDone:
			if again := d.Next(Outcome{Reply: &triplanev1.TransferState{}}); again.Op != OpDone || again.Err != a.Err || again.State != a.State {
				t.Fatalf("after done: %+v", again)
			}
			return a
		}
		if sc.stop != nil {
			o.Stop = sc.stop(a, o)
		}
		a = d.Next(o)
	}
	t.Fatalf("no end after 1000 actions: %v", sc.log)
	return Action{}
}

func wantLog(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("actions:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// onFirst answers the first ask of msg's type with answer, the rest from s.
func onFirst[M proto.Message](s *session, answer func(msg proto.Message) (proto.Message, error)) func(int, proto.Message) (proto.Message, error) {
	done := false
	return func(_ int, msg proto.Message) (proto.Message, error) {
		if _, ok := msg.(M); ok && !done {
			done = true
			return answer(msg)
		}
		return s.ask(msg)
	}
}

var errBoom = errors.New("boom")

func TestDriverCompletes(t *testing.T) {
	sc := &script{s: newSession(t, "d1")}
	a := sc.run(t, newDriver(t, testSpec("d1", 20)))
	if a.Err != nil || a.State.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || a.Ended != EndCompleted || a.Moved != 80 || sc.acked != 80 {
		t.Fatalf("end %+v, %d bytes acknowledged", a, sc.acked)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "write 0-8", "TransferAck", "write 8-16", "TransferAck", "write 16-20", "TransferAck", "done")
}

func TestDriverRejectsBadSpec(t *testing.T) {
	spec := testSpec("bad", 4)
	spec.Blocks[2].Src = make([]byte, 3)
	if _, err := NewDriver(spec, Pacing{}); err == nil || !strings.Contains(err.Error(), "block 2 is 3 bytes") {
		t.Fatalf("err %v", err)
	}
	spec = testSpec("bad", 4)
	spec.Blocks[3].Dst.Length = 8
	if _, err := NewDriver(spec, Pacing{}); err == nil {
		t.Fatal("block into a larger destination accepted")
	}
}

// A session a crashed supervisor left half done resumes after its
// acknowledged prefix, and the throughput counts only what this run moved.
func TestDriverResumesFromAcknowledgedPrefix(t *testing.T) {
	s := newSession(t, "d2")
	s.ask(&triplanev1.TransferStart{Blocks: 20, BlockSize: 4, MaxAttempts: 4})
	s.ask(&triplanev1.TransferAck{From: 0, To: 8})
	s.ask(&triplanev1.TransferAck{From: 8, To: 12})
	sc := &script{s: s}
	a := sc.run(t, newDriver(t, testSpec("d2", 20)))
	if a.Err != nil || a.Moved != 8*4 {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "write 12-20", "TransferAck", "done")
}

// Running an ended session again only reports how it ended.
func TestDriverRerunOfEndedSession(t *testing.T) {
	for _, c := range []struct {
		end    proto.Message
		is     error
		ended  End
		status triplanev1.TransferStatus
	}{
		{&triplanev1.TransferCompleted{}, nil, EndCompleted, triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED},
		{&triplanev1.TransferGaveUp{Attempts: 4, Error: "x"}, ErrGaveUp, EndGaveUp, triplanev1.TransferStatus_TRANSFER_STATUS_FAILED},
		// Not counted: whoever cancelled it counted it.
		{&triplanev1.TransferCancelled{Reason: "x"}, ErrCancelled, EndUncounted, triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED},
	} {
		s := newSession(t, "d3")
		s.ask(&triplanev1.TransferStart{Blocks: 20, BlockSize: 4})
		if err := (Machine{}).Apply(s.st, c.end); err != nil {
			t.Fatal(err)
		}
		sc := &script{s: s}
		a := sc.run(t, newDriver(t, testSpec("d3", 20)))
		if !errors.Is(a.Err, c.is) || (c.is == nil) != (a.Err == nil) || a.Ended != c.ended || a.Moved != 0 || a.State.Status != c.status {
			t.Fatalf("rerun of %T: %+v", c.end, a)
		}
		wantLog(t, sc.log, "TransferStart", "done")
	}
}

func TestDriverGivesUpAfterMaxAttempts(t *testing.T) {
	sc := &script{s: newSession(t, "d4"), dial: func(int) error { return errors.New("refused") }}
	a := sc.run(t, newDriver(t, testSpec("d4", 20)))
	if !errors.Is(a.Err, ErrGaveUp) || !strings.Contains(a.Err.Error(), "dial: refused") || a.Ended != EndGaveUp ||
		a.State.Status != triplanev1.TransferStatus_TRANSFER_STATUS_FAILED || a.State.Attempts != 4 {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "TransferAttemptFailed", "wait 5ms", "dial", "TransferAttemptFailed", "wait 10ms",
		"dial", "TransferAttemptFailed", "wait 12.5ms", "dial", "TransferAttemptFailed", "done")
}

func TestDriverJitter(t *testing.T) {
	const half = 5 * time.Millisecond // of the first backoff, 10 ms
	for _, c := range []struct {
		jitter uint64
		want   time.Duration
	}{
		{0, half},
		{1, half + 1},
		{uint64(half), 2 * half},
		{uint64(half) + 1, half},
		{^uint64(0), half + time.Duration(^uint64(0)%uint64(half+1))},
	} {
		d := newDriver(t, testSpec("j", 20))
		s := newSession(t, "j")
		a := d.Action()
		for a.Op != OpWait {
			o := Outcome{Jitter: c.jitter}
			switch a.Op {
			case OpAsk:
				o.Reply, o.Err = s.ask(a.Msg)
			case OpDial:
				o.Err = errBoom
			default:
				t.Fatalf("unexpected %v", a.Op)
			}
			a = d.Next(o)
		}
		if a.Wait != c.want || a.Wait < half || a.Wait > 2*half {
			t.Fatalf("jitter %d: wait %s, want %s", c.jitter, a.Wait, c.want)
		}
	}
}

// A failed step ends the attempt: the connection is dropped, the failure
// reported, and the next attempt resumes from the journaled prefix.
func TestDriverAttemptFailures(t *testing.T) {
	failedAck := []string{"TransferStart", "dial", "write 0-8", "TransferAck", "hangup, TransferAttemptFailed", "wait 5ms",
		"dial", "write 0-8", "TransferAck", "write 8-10", "TransferAck", "done"}
	for _, c := range []struct {
		name  string
		dial  func(int) error
		write func(n int, from, to uint64) error
		ack   func(s *session, msg proto.Message) (proto.Message, error) // answers the first ack
		// what the attempt reported, and the actions
		reported string
		log      []string
	}{
		{name: "dial", dial: func(n int) error {
			if n == 1 {
				return errBoom
			}
			return nil
		}, reported: "dial: boom",
			log: []string{"TransferStart", "dial", "TransferAttemptFailed", "wait 5ms", "dial", "write 0-8", "TransferAck", "write 8-10", "TransferAck", "done"}},
		{name: "write", write: func(n int, _, _ uint64) error {
			if n == 2 {
				return errBoom
			}
			return nil
		}, reported: "boom",
			log: []string{"TransferStart", "dial", "write 0-8", "TransferAck", "write 8-10", "hangup, TransferAttemptFailed", "wait 5ms",
				"dial", "write 8-10", "TransferAck", "done"}},
		{name: "ack refused", ack: func(*session, proto.Message) (proto.Message, error) { return nil, errBoom },
			reported: "journal ack: transfer f: *triplanev1.TransferAck: boom", log: failedAck},
		{name: "ack of the wrong type", ack: func(*session, proto.Message) (proto.Message, error) { return &triplanev1.TransferGet{}, nil },
			reported: "journal ack: transfer f: *triplanev1.TransferAck replied *triplanev1.TransferGet", log: failedAck},
		{name: "ack of no state", ack: func(*session, proto.Message) (proto.Message, error) { return (*triplanev1.TransferState)(nil), nil },
			reported: "journal ack: transfer f: *triplanev1.TransferAck replied *triplanev1.TransferState", log: failedAck},
		{name: "ack of nothing", ack: func(*session, proto.Message) (proto.Message, error) { return nil, nil },
			reported: "journal ack: transfer f: *triplanev1.TransferAck replied <nil>", log: failedAck},
		// The request failed (not a journal failure the driver asks again
		// after), yet the ack was written: the next attempt resumes after
		// the range instead of sending it again.
		{name: "ack written, then failed", ack: func(s *session, msg proto.Message) (proto.Message, error) {
			s.ask(msg)
			return nil, errors.New("request timed out")
		}, reported: "journal ack: transfer f: *triplanev1.TransferAck: request timed out",
			log: []string{"TransferStart", "dial", "write 0-8", "TransferAck", "hangup, TransferAttemptFailed", "wait 5ms",
				"dial", "write 8-10", "TransferAck", "done"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newSession(t, "f")
			sc := &script{s: s, dial: c.dial, write: c.write}
			if c.ack != nil {
				sc.ask = onFirst[*triplanev1.TransferAck](s, func(msg proto.Message) (proto.Message, error) { return c.ack(s, msg) })
			}
			a := sc.run(t, newDriver(t, testSpec("f", 10)))
			wantLog(t, sc.log, c.log...)
			if len(sc.reported) != 1 || sc.reported[0] != c.reported {
				t.Fatalf("reported %q, want %q", sc.reported, c.reported)
			}
			if a.Err != nil || a.State.Acked != 10 || a.State.Attempts != 1 {
				t.Fatalf("end %+v", a)
			}
		})
	}
}

// The last ack failed yet completed the session: the report finds it
// ended, and the run reads how.
func TestDriverReportFindsSessionEnded(t *testing.T) {
	s := newSession(t, "e")
	sc := &script{s: s}
	sc.ask = func(n int, msg proto.Message) (proto.Message, error) {
		if m, ok := msg.(*triplanev1.TransferAck); ok && m.To == 10 {
			s.ask(msg)
			return nil, errors.New("request timed out")
		}
		return s.ask(msg)
	}
	a := sc.run(t, newDriver(t, testSpec("e", 10)))
	if a.Err != nil || a.Ended != EndCompleted || a.State.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
		t.Fatalf("end %+v", a)
	}
	// The range acknowledged by the failed append is not in the bytes
	// counter, which counts the acks the run saw succeed.
	if sc.acked != 8*4 {
		t.Fatalf("%d bytes counted", sc.acked)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "write 0-8", "TransferAck", "write 8-10", "TransferAck", "hangup, TransferAttemptFailed", "TransferGet", "done")

	// Cancelled elsewhere while a write failed: the run says so, without
	// counting the cancellation (whoever journaled it did).
	s = newSession(t, "e2")
	sc = &script{s: s, write: func(int, uint64, uint64) error {
		s.ask(&triplanev1.TransferCancel{Reason: "operator"})
		return errBoom
	}}
	a = sc.run(t, newDriver(t, testSpec("e2", 10)))
	if !errors.Is(a.Err, ErrCancelled) || !strings.Contains(a.Err.Error(), "operator") || a.Ended != EndUncounted {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "write 0-8", "hangup, TransferAttemptFailed", "TransferGet", "done")
}

// Errors the run cannot go on from end it, for the requester to see.
func TestDriverRunEndingErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		ask  func(s *session, n int, msg proto.Message) (proto.Message, error)
		dial func(int) error
		err  string
		log  []string
	}{
		{name: "start refused", ask: func(*session, int, proto.Message) (proto.Message, error) { return nil, errBoom },
			err: "transfer x: *triplanev1.TransferStart: boom", log: []string{"TransferStart", "done"}},
		{name: "start of the wrong type", ask: func(*session, int, proto.Message) (proto.Message, error) { return &triplanev1.TransferAck{}, nil },
			err: "transfer x: *triplanev1.TransferStart replied *triplanev1.TransferAck", log: []string{"TransferStart", "done"}},
		{name: "start of no status", ask: func(*session, int, proto.Message) (proto.Message, error) {
			return &triplanev1.TransferState{Id: "x"}, nil
		},
			err: "transfer x: unexpected status TRANSFER_STATUS_UNSPECIFIED", log: []string{"TransferStart", "done"}},
		// A state that contradicts the spec would write nothing for ever,
		// or past its blocks.
		{name: "running with everything acknowledged", ask: func(*session, int, proto.Message) (proto.Message, error) {
			return &triplanev1.TransferState{Id: "x", Status: triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING, Blocks: 10, Acked: 10}, nil
		}, err: "transfer x: running with 10 of 10 blocks acknowledged, the spec has 10: nothing to write", log: []string{"TransferStart", "dial", "done"}},
		{name: "more blocks than the spec", ask: func(*session, int, proto.Message) (proto.Message, error) {
			return &triplanev1.TransferState{Id: "x", Status: triplanev1.TransferStatus_TRANSFER_STATUS_RUNNING, Blocks: 40, Acked: 8}, nil
		}, err: "transfer x: running with 8 of 40 blocks acknowledged, the spec has 10: nothing to write", log: []string{"TransferStart", "dial", "done"}},
		// The report's append keeps failing: each time the session is read
		// (the report was not written) and the report asked again, until
		// the bound of transient failures in a row.
		{name: "report refused", dial: func(int) error { return errBoom }, ask: func(s *session, _ int, msg proto.Message) (proto.Message, error) {
			if _, ok := msg.(*triplanev1.TransferAttemptFailed); ok {
				return nil, fmt.Errorf("%w: timeout", actors.ErrPersist)
			}
			return s.ask(msg)
		}, err: "transfer x: *triplanev1.TransferAttemptFailed: actors: persist failed, outcome unknown: timeout",
			log: []string{"TransferStart", "dial",
				"TransferAttemptFailed", "TransferGet", "wait 5ms", "TransferAttemptFailed", "TransferGet", "wait 10ms",
				"TransferAttemptFailed", "TransferGet", "wait 12.5ms", "TransferAttemptFailed", "TransferGet", "wait 12.5ms",
				"TransferAttemptFailed", "TransferGet", "wait 12.5ms", "TransferAttemptFailed", "done"}},
		{name: "report of the wrong type", dial: func(int) error { return errBoom }, ask: func(s *session, _ int, msg proto.Message) (proto.Message, error) {
			if _, ok := msg.(*triplanev1.TransferAttemptFailed); ok {
				return &triplanev1.TransferAck{}, nil
			}
			return s.ask(msg)
		}, err: "transfer x: *triplanev1.TransferAttemptFailed replied *triplanev1.TransferAck",
			log: []string{"TransferStart", "dial", "TransferAttemptFailed", "done"}},
		{name: "read after the report refused", dial: func(int) error { return errBoom }, ask: func(s *session, _ int, msg proto.Message) (proto.Message, error) {
			switch msg.(type) {
			case *triplanev1.TransferAttemptFailed:
				return nil, fmt.Errorf("%w: x is cancelled", ErrNotRunning)
			case *triplanev1.TransferGet:
				return nil, errBoom
			}
			return s.ask(msg)
		}, err: "transfer x: *triplanev1.TransferGet: boom", log: []string{"TransferStart", "dial", "TransferAttemptFailed", "TransferGet", "done"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newSession(t, "x")
			sc := &script{s: s, dial: c.dial, ask: func(n int, msg proto.Message) (proto.Message, error) { return c.ask(s, n, msg) }}
			a := sc.run(t, newDriver(t, testSpec("x", 10)))
			if a.Err == nil || a.Err.Error() != c.err || a.Ended != EndUncounted {
				t.Fatalf("end %+v, want err %q", a, c.err)
			}
			wantLog(t, sc.log, c.log...)
		})
	}
}

func TestDriverCancel(t *testing.T) {
	gone := errors.New("client went away")
	// stopWhen stops the run from the first action pred matches on.
	stopWhen := func(pred func(a Action, o Outcome) bool) func(Action, Outcome) error {
		stopped := false
		return func(a Action, o Outcome) error {
			stopped = stopped || pred(a, o)
			if stopped {
				return gone
			}
			return nil
		}
	}
	for _, c := range []struct {
		name  string
		write func(n int, from, to uint64) error
		dial  func(int) error
		ask   func(s *session, msg proto.Message) (proto.Message, error)
		stop  func(a Action, o Outcome) bool
		err   string // "": cancelled with the reason, journaled
		log   []string
	}{
		{name: "while writing", write: func(n int, _, _ uint64) error {
			if n == 2 {
				return errBoom // the write's context was cancelled
			}
			return nil
		}, stop: func(a Action, o Outcome) bool { return o.Err != nil },
			log: []string{"TransferStart", "dial", "write 0-8", "TransferAck", "write 8-16", "hangup, TransferCancel", "done"}},
		{name: "while waiting", dial: func(n int) error {
			if n == 1 {
				return errBoom
			}
			return nil
		}, stop: func(a Action, _ Outcome) bool { return a.Op == OpWait },
			log: []string{"TransferStart", "dial", "TransferAttemptFailed", "wait 5ms", "TransferCancel", "done"}},
		// A step that succeeded goes on: under a cancelled context the
		// next one fails, and the run stops there.
		{name: "after a write that succeeded", write: func(n int, _, _ uint64) error {
			if n == 2 {
				return errBoom
			}
			return nil
		}, stop: func(a Action, _ Outcome) bool { return a.Op == OpWrite },
			log: []string{"TransferStart", "dial", "write 0-8", "TransferAck", "write 8-16", "hangup, TransferCancel", "done"}},
		{name: "report refused", dial: func(int) error { return errBoom }, ask: func(s *session, msg proto.Message) (proto.Message, error) {
			if _, ok := msg.(*triplanev1.TransferAttemptFailed); ok {
				return nil, errBoom
			}
			return s.ask(msg)
		}, stop: func(a Action, _ Outcome) bool { _, ok := a.Msg.(*triplanev1.TransferAttemptFailed); return ok },
			log: []string{"TransferStart", "dial", "TransferAttemptFailed", "TransferCancel", "done"}},
		{name: "journaling it fails", dial: func(int) error { return errBoom }, ask: func(s *session, msg proto.Message) (proto.Message, error) {
			if _, ok := msg.(*triplanev1.TransferCancel); ok {
				return nil, errBoom
			}
			return s.ask(msg)
		}, stop: func(a Action, o Outcome) bool { return o.Err != nil },
			err: "transfer: cancelled: transfer c (journaling the cancellation failed: transfer c: *triplanev1.TransferCancel: boom)",
			log: []string{"TransferStart", "dial", "TransferCancel", "done"}},
		// Stopped while the start was asked: it may have been applied,
		// so the run cancels (here the journal refuses that too).
		{name: "start refused", ask: func(*session, proto.Message) (proto.Message, error) { return nil, errBoom },
			stop: func(Action, Outcome) bool { return true },
			err:  "transfer: cancelled: transfer c (journaling the cancellation failed: transfer c: *triplanev1.TransferCancel: boom)", log: []string{"TransferStart", "TransferCancel", "done"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newSession(t, "c")
			sc := &script{s: s, dial: c.dial, write: c.write, stop: stopWhen(c.stop)}
			if c.ask != nil {
				sc.ask = func(_ int, msg proto.Message) (proto.Message, error) { return c.ask(s, msg) }
			}
			a := sc.run(t, newDriver(t, testSpec("c", 20)))
			wantLog(t, sc.log, c.log...)
			if c.err != "" {
				if a.Err == nil || a.Err.Error() != c.err || a.Ended != EndUncounted || a.State != nil {
					t.Fatalf("end %+v, want %q", a, c.err)
				}
				return
			}
			if !errors.Is(a.Err, ErrCancelled) || a.Err.Error() != "transfer: cancelled: transfer c: client went away" || a.Ended != EndCancelled ||
				a.State.Status != triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED || s.st.Error != "cancelled: client went away" {
				t.Fatalf("end %+v", a)
			}
		})
	}
}

// Whatever the shell answers, the Driver never panics, never writes outside
// the spec, asks only the session's commands, and ends for good.
func TestDriverAnyOutcomes(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	replies := []func(s *session, msg proto.Message) (proto.Message, error){
		func(s *session, msg proto.Message) (proto.Message, error) { return s.ask(msg) },
		func(s *session, msg proto.Message) (proto.Message, error) { return s.ask(msg) },
		func(s *session, msg proto.Message) (proto.Message, error) { return s.ask(msg) },
		func(*session, proto.Message) (proto.Message, error) { return nil, errBoom },
		func(*session, proto.Message) (proto.Message, error) { return nil, nil },
		func(*session, proto.Message) (proto.Message, error) { return (*triplanev1.TransferState)(nil), nil },
		func(*session, proto.Message) (proto.Message, error) { return &triplanev1.TransferAck{}, nil },
		func(*session, proto.Message) (proto.Message, error) {
			return &triplanev1.TransferState{Status: triplanev1.TransferStatus(rng.IntN(6)), Blocks: rng.Uint64N(30), Acked: rng.Uint64N(30)}, nil
		},
		func(s *session, msg proto.Message) (proto.Message, error) {
			s.ask(msg)
			return nil, fmt.Errorf("%w: written", actors.ErrPersist)
		},
	}
	ends := map[bool]int{}
	for run := range 2000 {
		s := newSession(t, "any")
		d := newDriver(t, testSpec("any", 20))
		a := d.Action()
		steps := 0
		for ; a.Op != OpDone && steps < 200; steps++ {
			o := Outcome{Jitter: rng.Uint64()}
			if rng.IntN(20) == 0 {
				o.Stop = errors.New("stop")
			}
			switch a.Op {
			case OpAsk:
				switch a.Msg.(type) {
				case *triplanev1.TransferStart, *triplanev1.TransferAck, *triplanev1.TransferAttemptFailed, *triplanev1.TransferGet, *triplanev1.TransferCancel:
				default:
					t.Fatalf("run %d: asked %T", run, a.Msg)
				}
				o.Reply, o.Err = replies[rng.IntN(len(replies))](s, a.Msg)
			case OpDial, OpWrite:
				if a.Op == OpWrite && (a.From >= a.To || a.To > 20 || len(a.Blocks) != int(a.To-a.From)) {
					t.Fatalf("run %d: write [%d, %d) of %d blocks", run, a.From, a.To, len(a.Blocks))
				}
				if rng.IntN(4) == 0 {
					o.Err = errBoom
				}
			case OpWait:
				if a.Wait < 5*time.Millisecond || a.Wait > 25*time.Millisecond {
					t.Fatalf("run %d: wait %s", run, a.Wait)
				}
			default:
				t.Fatalf("run %d: op %v", run, a.Op)
			}
			a = d.Next(o)
		}
		if a.Op == OpDone {
			if a.Err == nil && (a.State == nil || a.State.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED) {
				t.Fatalf("run %d: success with %v", run, a.State)
			}
			if again := d.Next(Outcome{Err: errBoom}); again.Op != OpDone || again.Err != a.Err {
				t.Fatalf("run %d: after done %+v", run, again)
			}
		}
		ends[a.Op == OpDone]++
	}
	if ends[true] == 0 {
		t.Fatalf("no run ended: %v", ends)
	}
}

// A journal append that failed is not the end of the run: a start is asked
// again (it is idempotent), a report is checked and asked again only if it
// was not written, so an attempt is never counted twice.
func TestDriverAsksAgainAfterTransientFailures(t *testing.T) {
	t.Run("start", func(t *testing.T) {
		s := newSession(t, "x")
		sc := &script{s: s, ask: func(n int, msg proto.Message) (proto.Message, error) {
			if _, ok := msg.(*triplanev1.TransferStart); ok && n <= 2 {
				if n == 2 {
					_, _ = s.ask(msg) // written, then failed
				}
				return nil, actors.ErrPersist
			}
			return s.ask(msg)
		}}
		a := sc.run(t, newDriver(t, testSpec("x", 10)))
		if a.Err != nil || a.State.GetStatus() != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
			t.Fatalf("end %+v", a)
		}
		wantLog(t, sc.log[:6], "TransferStart", "wait 5ms", "TransferStart", "wait 10ms", "TransferStart", "dial")
	})
	for _, written := range []bool{true, false} {
		t.Run(fmt.Sprintf("report written %v", written), func(t *testing.T) {
			s := newSession(t, "x")
			failedOnce := false
			sc := &script{s: s, dial: func(n int) error {
				if n == 1 {
					return errBoom
				}
				return nil
			}, ask: func(_ int, msg proto.Message) (proto.Message, error) {
				if _, ok := msg.(*triplanev1.TransferAttemptFailed); ok && !failedOnce {
					failedOnce = true
					if written {
						_, _ = s.ask(msg)
					}
					return nil, fmt.Errorf("%w: timeout", actors.ErrPersist)
				}
				return s.ask(msg)
			}}
			a := sc.run(t, newDriver(t, testSpec("x", 10)))
			if a.Err != nil || a.State.GetAttempts() != 1 {
				t.Fatalf("end %+v: the one failed attempt must count once", a)
			}
			want := []string{"TransferStart", "dial", "TransferAttemptFailed", "TransferGet"}
			if !written {
				want = append(want, "wait 5ms", "TransferAttemptFailed")
			}
			wantLog(t, sc.log[:len(want)], want...)
		})
	}
}

// An ack whose append failed is asked again (a repeated ack is a no-op),
// not counted as a failed attempt.
func TestDriverAsksAckAgain(t *testing.T) {
	s := newSession(t, "x")
	failed := false
	sc := &script{s: s, ask: func(_ int, msg proto.Message) (proto.Message, error) {
		if _, ok := msg.(*triplanev1.TransferAck); ok && !failed {
			failed = true
			_, _ = s.ask(msg) // written, then failed
			return nil, actors.ErrPersist
		}
		return s.ask(msg)
	}}
	a := sc.run(t, newDriver(t, testSpec("x", 10)))
	if a.Err != nil || a.State.GetAttempts() != 0 || a.State.GetAcked() != 10 {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log[:5], "TransferStart", "dial", "write 0-8", "TransferAck", "wait 5ms")
	if sc.log[5] != "TransferAck" {
		t.Fatalf("log %v", sc.log)
	}
}

// Stopped during a start's pause: the cancellation finds no session and is
// not counted as one; a cancellation whose append fails is asked again.
func TestDriverStopDuringPauseAndCancelRetried(t *testing.T) {
	gone := errors.New("client went away")
	s := newSession(t, "x")
	sc := &script{s: s, ask: func(n int, msg proto.Message) (proto.Message, error) {
		if _, ok := msg.(*triplanev1.TransferStart); ok {
			return nil, actors.ErrNotApplied
		}
		return s.ask(msg)
	}, stop: func(a Action, _ Outcome) error {
		if a.Op == OpWait {
			return gone
		}
		return nil
	}}
	a := sc.run(t, newDriver(t, testSpec("x", 10)))
	if !errors.Is(a.Err, ErrCancelled) || a.Ended != EndUncounted {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log, "TransferStart", "wait 5ms", "TransferCancel", "done")

	s = newSession(t, "y")
	cancels := 0
	sc = &script{s: s, dial: func(int) error { return errBoom }, ask: func(_ int, msg proto.Message) (proto.Message, error) {
		if _, ok := msg.(*triplanev1.TransferCancel); ok {
			if cancels++; cancels <= 2 {
				return nil, actors.ErrPersist
			}
		}
		return s.ask(msg)
	}, stop: func(a Action, _ Outcome) error {
		if a.Op == OpDial {
			return gone
		}
		return nil
	}}
	a = sc.run(t, newDriver(t, testSpec("y", 10)))
	if !errors.Is(a.Err, ErrCancelled) || a.Ended != EndCancelled || a.State.GetStatus() != triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log, "TransferStart", "dial", "TransferCancel", "TransferCancel", "TransferCancel", "done")
}

// Each command has its own budget of transient failures: an ack that used
// it up leaves the report its own; a cancel after a start's pauses too.
// A cancel that finds the session already completed reports completion.
func TestDriverTransientBudgetPerCommandAndLateCompletion(t *testing.T) {
	s := newSession(t, "b")
	acks, reports := 0, 0
	sc := &script{s: s, ask: func(_ int, msg proto.Message) (proto.Message, error) {
		switch msg.(type) {
		case *triplanev1.TransferAck:
			if acks++; acks <= 6 {
				return nil, actors.ErrNotApplied
			}
		case *triplanev1.TransferAttemptFailed:
			if reports++; reports == 1 {
				return nil, actors.ErrNotApplied
			}
		}
		return s.ask(msg)
	}}
	a := sc.run(t, newDriver(t, testSpec("b", 10)))
	if a.Err != nil || a.State.GetStatus() != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || a.State.GetAttempts() != 1 {
		t.Fatalf("end %+v (log %v)", a, sc.log)
	}

	// The last ack is written but its reply lost; the requester goes
	// away: the cancel finds the session completed, and says so.
	s = newSession(t, "l")
	gone := errors.New("client went away")
	sc = &script{s: s, ask: func(_ int, msg proto.Message) (proto.Message, error) {
		if m, ok := msg.(*triplanev1.TransferAck); ok && m.To == 10 {
			_, _ = s.ask(msg)
			return nil, errors.New("request timed out")
		}
		return s.ask(msg)
	}, stop: func(a Action, o Outcome) error {
		if o.Err != nil {
			return gone
		}
		return nil
	}}
	a = sc.run(t, newDriver(t, testSpec("l", 10)))
	if a.Err != nil || a.Ended != EndCompleted || a.State.GetStatus() != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
		t.Fatalf("end %+v", a)
	}
	wantLog(t, sc.log[len(sc.log)-2:], "hangup, TransferCancel", "done")
}
