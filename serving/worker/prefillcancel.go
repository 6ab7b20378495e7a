package worker

import (
	"context"
	"errors"
	"slices"
	"sync"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

// ErrPrefillCancelled ends a prefill whose decode worker gave it up.
var ErrPrefillCancelled = errors.New("worker: prefill cancelled by the decode worker (its client left)")

// recentCancels is how many cancelled sessions a prefill worker remembers:
// a cancel can overtake its own request (they travel on different
// subjects, each handled on its own goroutine, so a prefill's handler may
// register it only after its cancel was handled), and the request must
// then be refused rather than prefilled for nobody.
const recentCancels = 256

// PrefillCancelSubject is where a prefill worker takes the cancels of the
// prefills it was asked for.
func PrefillCancelSubject(b *event.Bus, namespace, worker string) (string, error) {
	return b.Subject(namespace, Component, "prefill-cancel", worker)
}

// prefillRuns are the prefills a worker is serving, by session id, so that
// a cancel reaches them, and the sessions cancelled lately.
type prefillRuns struct {
	mu sync.Mutex
	// running holds a cancel per prefill being served: at most as many
	// as the prefill service runs at once (a session asked twice runs
	// twice until the transfer supervisor refuses the second).
	running map[string][]*prefillRun
	recent  map[string]struct{}
	order   []string // of recent, oldest first; at most recentCancels
}

type prefillRun struct{ cancel context.CancelCauseFunc }

// start registers a prefill of session and returns its context, which a
// cancel of the session ends with ErrPrefillCancelled, and the function
// that ends the registration. It fails with ErrPrefillCancelled when the
// session was cancelled already.
func (p *prefillRuns) start(ctx context.Context, session string) (context.Context, func(), error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.recent[session]; ok {
		return nil, nil, ErrPrefillCancelled
	}
	ctx, cancel := context.WithCancelCause(ctx)
	r := &prefillRun{cancel: cancel}
	if p.running == nil {
		p.running = map[string][]*prefillRun{}
	}
	p.running[session] = append(p.running[session], r)
	return ctx, func() {
		p.mu.Lock()
		if rs := slices.DeleteFunc(p.running[session], func(x *prefillRun) bool { return x == r }); len(rs) == 0 {
			delete(p.running, session)
		} else {
			p.running[session] = rs
		}
		p.mu.Unlock()
		cancel(nil)
	}, nil
}

// cancel stops the prefills of session running here and returns how many
// it stopped. The session is remembered either way, so that its request,
// arriving later or again, is refused.
func (p *prefillRuns) cancel(session string) int {
	p.mu.Lock()
	rs := slices.Clone(p.running[session])
	if _, ok := p.recent[session]; !ok {
		if p.recent == nil {
			p.recent = map[string]struct{}{}
		}
		if len(p.order) == recentCancels {
			delete(p.recent, p.order[0])
			p.order = slices.Delete(p.order, 0, 1)
		}
		p.recent[session] = struct{}{}
		p.order = append(p.order, session)
	}
	p.mu.Unlock()
	for _, r := range rs {
		r.cancel(ErrPrefillCancelled)
	}
	return len(rs)
}

// onPrefillCancel handles a decode worker's cancel of a prefill it asked
// this worker for.
func (w *Worker) onPrefillCancel(c *triplanev1.PrefillCancel) {
	if c.GetSessionId() == "" {
		w.log.Warn("prefill cancel without a session id ignored")
		return
	}
	n := w.runs.cancel(c.SessionId)
	w.log.Debug("prefill cancelled by its decode worker", "session", c.SessionId, "running", n)
}

// cancelRemotePrefill tells a prefill worker to stop the prefill of
// session, which this worker gave up because the client left. Best
// effort: a cancel lost costs the prefill worker the work until the
// prefill's deadline, nothing else.
func (w *Worker) cancelRemotePrefill(worker, session string) {
	subj, err := PrefillCancelSubject(w.cfg.Bus, w.cfg.Namespace, worker)
	if err == nil {
		err = event.Publish(w.cfg.Bus, subj, &triplanev1.PrefillCancel{SessionId: session})
	}
	if err != nil {
		w.log.Warn("could not tell the prefill worker to stop an abandoned prefill", "prefill_worker", worker,
			"session", session, "err", err)
		return
	}
	w.metrics.prefillCancelsSent.Inc()
	w.stats.prefillCancelsSent.Add(1)
}
