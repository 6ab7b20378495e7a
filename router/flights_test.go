package router_test

import (
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
