package actors

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"google.golang.org/protobuf/proto"
)

// ErrMachinePanic: a machine's Decide or Apply panicked, a bug in the
// machine. The host answers the command with it (Decide), or restarts the
// actor answering every caller (Apply); recovery reports it as a bad
// record. The process goes on either way.
var ErrMachinePanic = errors.New("actors: machine panicked")

// decideGuarded is m.Decide with a panic turned into a rejection: Decide is pure,
// so the state is as it was.
func decideGuarded(m Machine, state proto.Message, c Command) (d Decision) {
	defer func() {
		if p := recover(); p != nil {
			d = Decision{Err: &machinePanic{msg: fmt.Sprintf("%s Decide of %T: %v (at %s)", m.Kind(), c.Msg, p, panicSite()), stack: debug.Stack()}}
		}
	}()
	return m.Decide(state, c)
}

// applyGuarded is m.Apply with a panic turned into an error. The state may be
// half changed: the caller must not go on with it.
func applyGuarded(m Machine, state, ev proto.Message) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &machinePanic{msg: fmt.Sprintf("%s Apply of %T: %v (at %s)", m.Kind(), ev, p, panicSite()), stack: debug.Stack()}
		}
	}()
	return m.Apply(state, ev)
}

// machinePanic is ErrMachinePanic with what panicked and where; the stack
// goes to the log (PanicStack), not into answers.
type machinePanic struct {
	msg   string
	stack []byte
}

func (p *machinePanic) Error() string { return ErrMachinePanic.Error() + ": " + p.msg }
func (p *machinePanic) Unwrap() error { return ErrMachinePanic }

// PanicStack is the goroutine stack of a machine panic in err's chain, or
// nil.
func PanicStack(err error) []byte {
	var p *machinePanic
	if errors.As(err, &p) {
		return p.stack
	}
	return nil
}

// panicSite is the file:line that panicked, called from the deferred
// recover: the first frame after the runtime's panic machinery.
func panicSite() string {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	for {
		f, more := frames.Next()
		if !strings.HasPrefix(f.Function, "runtime.") && !strings.HasSuffix(f.Function, "panicSite") {
			return fmt.Sprintf("%s:%d", f.File, f.Line)
		}
		if !more {
			return "unknown"
		}
	}
}
