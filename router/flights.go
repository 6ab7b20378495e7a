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
	byWorker map[string][]flight
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
func NewFlights() *Flights { return &Flights{byWorker: map[string][]flight{}} }

// Add records request id sent to worker at at, needing newBlocks blocks of
// prefill there (its blocks the worker does not hold).
func (f *Flights) Add(worker, id string, at time.Time, newBlocks int) {
	f.byWorker[worker] = append(f.byWorker[worker], flight{id: id, at: at, newBlocks: newBlocks})
}

// Started marks id's prefill done (its first token arrived).
func (f *Flights) Started(worker, id string) {
	fs := f.byWorker[worker]
	if i := slices.IndexFunc(fs, func(x flight) bool { return x.id == id }); i >= 0 {
		fs[i].started = true
	}
}

// Done forgets id (finished, failed or moved elsewhere).
func (f *Flights) Done(worker, id string) {
	fs := f.byWorker[worker]
	i := slices.IndexFunc(fs, func(x flight) bool { return x.id == id })
	if i < 0 {
		return
	}
	fs = slices.Delete(fs, i, i+1)
	if len(fs) == 0 {
		delete(f.byWorker, worker)
		return
	}
	f.byWorker[worker] = fs
}

// Len is the number of requests in flight to worker.
func (f *Flights) Len(worker string) int { return len(f.byWorker[worker]) }

// Candidate is worker as a routing candidate: its report (nil when none
// arrived yet) corrected by the flights.
func (f *Flights) Candidate(worker string, r *Report) Candidate {
	fs := f.byWorker[worker]
	c := Candidate{ID: worker, Active: len(fs)}
	if r != nil {
		c.BlocksUsed, c.BlocksTotal, c.Waiting = r.BlocksUsed, r.BlocksTotal, r.Waiting
	}
	for _, fl := range fs {
		if !fl.started {
			c.PendingPrefill += fl.newBlocks
		}
		// Requests sent after the report are not in it yet.
		if r != nil && fl.at.After(r.SentAt) {
			c.BlocksUsed += fl.newBlocks
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
