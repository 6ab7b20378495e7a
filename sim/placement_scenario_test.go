package sim_test

import (
	"errors"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/sim"
)

var placementScenario = sim.Scenarios()["placement"]

// Leaders paused past their lease resume believing they lead; fencing
// keeps their writes out, and placement converges.
func TestPlacementScenarioSweep(t *testing.T) {
	sim.Check(t, placementScenario, sim.Options{Duration: 3 * time.Second, Faults: sim.DefaultFaults}, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
}

func TestPlacementScenarioFindsUnfencedWrites(t *testing.T) {
	opts := sim.Options{Duration: 3 * time.Second, Faults: sim.DefaultFaults, Bug: sim.BugUnfencedWrites}
	sim.CheckFinds(t, placementScenario, opts, 1, 10, "fenced-leader")
}

// The simulated etcd: a lease not kept alive expires and takes its keys;
// a fenced write fails once the fence key is gone.
func TestSimEtcdLeasesAndFences(t *testing.T) {
	w := sim.NewWorld(1)
	e := sim.NewEtcd(w)
	l, err := e.Grant(100 * time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := e.Put("/election/a", "a", l); !ok {
		t.Fatal("put on a live lease failed")
	}
	_, rev, _ := e.Get("/election/a")
	var deleted []string
	e.Watch("/election/", func(k string, del bool) {
		if del {
			deleted = append(deleted, k)
		}
	})
	if !e.PutIfCreateRev("/election/a", rev, "/assign/x", "a") {
		t.Fatal("fenced write of the leader refused")
	}
	w.RunFor(50 * time.Millisecond)
	e.KeepAlive(l)
	w.RunFor(90 * time.Millisecond)
	if _, _, ok := e.Get("/election/a"); !ok {
		t.Fatal("a kept-alive lease expired")
	}
	w.RunFor(200 * time.Millisecond)
	if _, _, ok := e.Get("/election/a"); ok || len(deleted) != 1 {
		t.Fatalf("lease did not expire with its key (deleted %v)", deleted)
	}
	if alive, _ := e.KeepAlive(l); alive || e.PutIfCreateRev("/election/a", rev, "/assign/x", "stale") {
		t.Fatal("a deposed leader wrote, or an expired lease was renewed")
	}
	if _, ok := e.Put("/k", "v", l); ok {
		t.Fatal("put on an expired lease accepted")
	}
	// A leader change: requests fail meanwhile, leases survive it.
	l2, _ := e.Grant(100 * time.Millisecond)
	e.LeaderChange(80 * time.Millisecond)
	if _, err := e.KeepAlive(l2); !errors.Is(err, sim.ErrUnavailable) {
		t.Fatalf("keep-alive during a leader change: %v", err)
	}
	if _, ok := e.Put("/k", "v", 0); ok {
		t.Fatal("put accepted without a leader")
	}
	w.RunFor(150 * time.Millisecond)
	if alive, err := e.KeepAlive(l2); !alive || err != nil {
		t.Fatalf("lease lost over a leader change: %v %v", alive, err)
	}
}

// A client cut off from the simulated etcd gets ErrUnavailable for every
// request (reads too) while another client carries on; its watch
// notifications wait and arrive after the heal, in order.
func TestSimEtcdClientPartition(t *testing.T) {
	w := sim.NewWorld(1)
	e := sim.NewEtcd(w)
	a, b := e.Client("a"), e.Client("b")
	var seen []string
	a.Watch("/k/", func(k string, del bool) { seen = append(seen, k) })
	a.Partition(100 * time.Millisecond)
	a.Partition(10 * time.Millisecond) // a shorter overlapping cut does not heal it early
	if _, err := a.Grant(time.Second); !errors.Is(err, sim.ErrUnavailable) {
		t.Fatalf("grant while cut: %v", err)
	}
	if _, _, _, err := a.Get("/k/1"); !errors.Is(err, sim.ErrUnavailable) {
		t.Fatalf("read while cut: %v", err)
	}
	if _, ok := a.Put("/k/0", "x", 0); ok {
		t.Fatal("a put while cut succeeded")
	}
	if _, ok := b.Put("/k/1", "x", 0); !ok {
		t.Fatal("the other client's put failed")
	}
	b.Put("/k/2", "x", 0)
	w.RunFor(50 * time.Millisecond)
	if len(seen) != 0 {
		t.Fatalf("watch delivered while cut: %v", seen)
	}
	w.RunFor(60 * time.Millisecond)
	if len(seen) != 2 || seen[0] != "/k/1" || seen[1] != "/k/2" {
		t.Fatalf("after the heal: %v", seen)
	}
	if v, _, ok, err := a.Get("/k/1"); err != nil || !ok || v != "x" {
		t.Fatalf("read after the heal: %q %v %v", v, ok, err)
	}
}
