package router_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/router"
)

func TestFlightsCorrectTheLastReport(t *testing.T) {
	t0 := time.Unix(1000, 0)
	f := router.NewFlights()
	f.Add("w", "a", t0.Add(-time.Second), 4) // before the report: in it
	f.Add("w", "b", t0.Add(time.Second), 6)  // after: not yet
	rep := &router.Report{BlocksUsed: 100, BlocksTotal: 1000, Waiting: 1, SentAt: t0}
	c := f.Candidate("w", rep)
	if c.Active != 2 || c.BlocksUsed != 106 || c.PendingPrefill != 10 || c.Waiting != 1 || c.BlocksTotal != 1000 {
		t.Fatalf("candidate %+v", c)
	}
	f.Started("w", "a")
	if c := f.Candidate("w", rep); c.PendingPrefill != 6 {
		t.Fatalf("a started, pending %d", c.PendingPrefill)
	}
	// No report yet: only the flights speak.
	if c := f.Candidate("w", nil); c.BlocksUsed != 0 || c.Active != 2 {
		t.Fatalf("without a report %+v", c)
	}
	// Unknown ids and workers change nothing; Done forgets.
	f.Started("w", "zz")
	f.Done("v", "a")
	f.Done("w", "zz")
	if f.Len("w") != 2 {
		t.Fatalf("%d flights", f.Len("w"))
	}
	f.Done("w", "a")
	f.Done("w", "b")
	if f.Len("w") != 0 || f.Candidate("w", nil).Active != 0 {
		t.Fatal("flights not forgotten")
	}
}

// refFlights is Flights as first written: every candidate walks every
// flight.
type refFlights map[string][]refFlight

type refFlight struct {
	id        string
	at        time.Time
	newBlocks int
	started   bool
}

func (f refFlights) candidate(worker string, r *router.Report) router.Candidate {
	fs := f[worker]
	c := router.Candidate{ID: worker, Active: len(fs)}
	if r != nil {
		c.BlocksUsed, c.BlocksTotal, c.Waiting = r.BlocksUsed, r.BlocksTotal, r.Waiting
	}
	for _, fl := range fs {
		if !fl.started {
			c.PendingPrefill += fl.newBlocks
		}
		if r != nil && fl.at.After(r.SentAt) {
			c.BlocksUsed += fl.newBlocks
		}
	}
	return c
}

// Flights keep their sums as they go and stop early among the flights
// after a report; the candidates are those of walking every flight, for flights
// added in order or not, duplicated ids, and reports with and without a
// monotonic clock reading.
func TestFlightsMatchAWalkOfEveryFlight(t *testing.T) {
	for _, ordered := range []bool{true, false} {
		rng := rand.New(rand.NewPCG(7, map[bool]uint64{true: 1, false: 2}[ordered]))
		f, ref := router.NewFlights(), refFlights{}
		workers := []string{"a", "b", "c"}
		base := time.Now() // with a monotonic reading, as the frontend's
		now := base
		for op := range 5000 {
			w := workers[rng.IntN(len(workers))]
			switch r := rng.IntN(10); {
			case r < 4:
				now = now.Add(time.Duration(rng.IntN(100)) * time.Millisecond)
				at := now
				if !ordered && rng.IntN(4) == 0 {
					at = now.Add(-time.Duration(rng.IntN(2000)) * time.Millisecond)
				}
				id := fmt.Sprintf("r%d", rng.IntN(200))
				n := rng.IntN(20)
				f.Add(w, id, at, n)
				// In wall clock order, as Flights keep them (which of two
				// flights with one id Started and Done take follows it).
				i := len(ref[w])
				for i > 0 && at.Round(0).Before(ref[w][i-1].at.Round(0)) {
					i--
				}
				ref[w] = slices.Insert(ref[w], i, refFlight{id: id, at: at, newBlocks: n})
			case r < 6:
				if fs := ref[w]; len(fs) > 0 {
					id := fs[rng.IntN(len(fs))].id
					f.Started(w, id)
					if i := slices.IndexFunc(fs, func(x refFlight) bool { return x.id == id }); i >= 0 {
						fs[i].started = true
					}
				}
			default:
				if fs := ref[w]; len(fs) > 0 {
					id := fs[rng.IntN(len(fs))].id
					f.Done(w, id)
					i := slices.IndexFunc(fs, func(x refFlight) bool { return x.id == id })
					ref[w] = slices.Delete(fs, i, i+1)
				}
			}
			sent := now.Add(-time.Duration(rng.IntN(1500)) * time.Millisecond)
			reports := []*router.Report{nil, {BlocksUsed: 10, BlocksTotal: 100, Waiting: 2, SentAt: sent.Round(0)},
				{BlocksUsed: 3, SentAt: sent}, {SentAt: time.Unix(sent.Unix(), 0)}}
			for _, w := range append(workers, "nobody") {
				for _, rep := range reports {
					if got, want := f.Candidate(w, rep), ref.candidate(w, rep); got != want {
						t.Fatalf("ordered %v op %d: %s: %+v, want %+v", ordered, op, w, got, want)
					}
				}
				if f.Len(w) != len(ref[w]) {
					t.Fatalf("ordered %v op %d: %s: %d flights, want %d", ordered, op, w, f.Len(w), len(ref[w]))
				}
			}
		}
	}
}
