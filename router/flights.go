package router

import (
	"slices"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Flights are a routing shell's own requests in flight, per worker: what
// the worker's last load report cannot show yet. A worker's candidate is
// its report corrected by them: every flight is active there, the blocks
// of flights sent after the report are in use, and the prefill of flights
// without a first token is queued ahead of the next request. The frontend
// and the simulator both keep one (not safe for concurrent use).
type Flights struct {
	byWorker map[string]*workerFlights
}

// workerFlights are one worker's flights in the order of their wall
// clocks' at, with what a candidate needs kept up to date: routing asks per
// candidate per request, and walking every flight each time was 3% of a
// serving simulation. The flights after a report are the last few.
type workerFlights struct {
	fs []flight
	// pending is the newBlocks of the flights not started.
	pending int
}

type flight struct {
	id        string
	at        time.Time
	newBlocks int
	started   bool // produced its first token: its prefill is done
}

// Report is what a worker's last load report said, and when it was sent.
type Report struct {
	BlocksUsed, BlocksTotal, Waiting int
	SentAt                           time.Time
}

// NewFlights tracks no request yet.
func NewFlights() *Flights { return &Flights{byWorker: map[string]*workerFlights{}} }

// Add records request id sent to worker at at, needing newBlocks blocks of
// prefill there (its blocks the worker does not hold).
func (f *Flights) Add(worker, id string, at time.Time, newBlocks int) {
	wf := f.byWorker[worker]
	if wf == nil {
		wf = &workerFlights{}
		f.byWorker[worker] = wf
	}
	// Reports carry wall clock times only: the order that matters is the
	// wall clocks' (Round(0) drops a monotonic reading). Flights mostly
	// come in that order; concurrent requests (their times read before
	// routing, added after it) land a few places back.
	i := len(wf.fs)
	for i > 0 && at.Round(0).Before(wf.fs[i-1].at.Round(0)) {
		i--
	}
	wf.fs = slices.Insert(wf.fs, i, flight{id: id, at: at, newBlocks: newBlocks})
	wf.pending += newBlocks
}

// Started marks id's prefill done (its first token arrived).
func (f *Flights) Started(worker, id string) {
	wf := f.byWorker[worker]
	if wf == nil {
		return
	}
	if i := slices.IndexFunc(wf.fs, func(x flight) bool { return x.id == id }); i >= 0 && !wf.fs[i].started {
		wf.fs[i].started = true
		wf.pending -= wf.fs[i].newBlocks
	}
}

// Done forgets id (finished, failed or moved elsewhere).
func (f *Flights) Done(worker, id string) {
	wf := f.byWorker[worker]
	if wf == nil {
		return
	}
	i := slices.IndexFunc(wf.fs, func(x flight) bool { return x.id == id })
	if i < 0 {
		return
	}
	if !wf.fs[i].started {
		wf.pending -= wf.fs[i].newBlocks
	}
	wf.fs = slices.Delete(wf.fs, i, i+1)
	if len(wf.fs) == 0 {
		delete(f.byWorker, worker)
	}
}

// Len is the number of requests in flight to worker.
func (f *Flights) Len(worker string) int {
	if wf := f.byWorker[worker]; wf != nil {
		return len(wf.fs)
	}
	return 0
}

// Candidate is worker as a routing candidate: its report (nil when none
// arrived yet) corrected by the flights.
func (f *Flights) Candidate(worker string, r *Report) Candidate {
	c := Candidate{ID: worker}
	if r != nil {
		c.BlocksUsed, c.BlocksTotal, c.Waiting = r.BlocksUsed, r.BlocksTotal, r.Waiting
	}
	wf := f.byWorker[worker]
	if wf == nil {
		return c
	}
	c.Active, c.PendingPrefill = len(wf.fs), wf.pending
	if r == nil {
		return c
	}
	// Requests sent after the report are not in it yet: when the report's
	// time is a wall clock's (as decoded; no monotonic reading to compare
	// instead), the last ones.
	early := r.SentAt == r.SentAt.Round(0)
	fs := wf.fs
	for i := len(fs) - 1; i >= 0; i-- {
		if fs[i].at.After(r.SentAt) {
			c.BlocksUsed += fs[i].newBlocks
		} else if early {
			break
		}
	}
	return c
}

// ReportOf is what a worker's load report says, for Candidate; nil for
// none.
func ReportOf(l *triplanev1.LoadReport) *Report {
	if l == nil {
		return nil
	}
	// Small enough to inline, so that a caller handing the report straight
	// to Candidate keeps it on its stack (routing runs this per candidate).
	r := reportOf(l)
	return &r
}

func reportOf(l *triplanev1.LoadReport) Report {
	return Report{BlocksUsed: int(l.KvBlocksUsed), BlocksTotal: int(l.KvBlocksTotal), Waiting: int(l.WaitingRequests),
		SentAt: l.GetSentAt().AsTime()}
}
