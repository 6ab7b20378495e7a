package event_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestLoadReportsAggregatedAndAgedOut(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	clock := &fakeClock{now: time.Unix(1000, 0)}
	all, err := b.LoadSubject("ns", "*")
	if err != nil {
		t.Fatal(err)
	}
	agg, err := event.NewLoadAggregator(b, all, event.AggregatorConfig{TTL: 3 * time.Second, MaxInstances: 3, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer agg.Close()
	var src event.LoadSource = agg

	// Two workers report through the real loop.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for _, w := range []struct{ id, component string }{{"w1", "decode"}, {"w2", "prefill"}} {
		subject, err := b.LoadSubject("ns", w.component)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = event.ReportLoad(ctx, b, subject, 5*time.Millisecond, func() *triplanev1.LoadReport {
				return &triplanev1.LoadReport{InstanceId: w.id, Namespace: "ns", Component: w.component,
					ActiveRequests: 3, WaitingRequests: 1, KvBlocksUsed: 10, KvBlocksTotal: 100, CacheHitRate: 0.5}
			})
		}()
	}
	planetest.Eventually(t, "reports from both workers, more than one each", func() bool {
		l := src.Loads()
		return len(l) == 2 && l["w1"].GetSeq() > 1 && l["w2"].GetSeq() > 1
	})
	cancel()
	wg.Wait()
	l := src.Loads()
	if r := l["w1"]; r.KvBlocksTotal != 100 || r.CacheHitRate != 0.5 || r.Component != "decode" || r.SentAt == nil {
		t.Fatalf("report %v", r)
	}
	// Latest shares the same reports without copying them.
	if lt := agg.Latest(); len(lt) != 2 || lt["w1"].KvBlocksTotal != 100 || lt["w1"].Seq != l["w1"].Seq {
		t.Fatalf("Latest %v, Loads %v", lt, l)
	}
	// The map is the caller's: changing it changes nothing inside.
	l["w1"].ActiveRequests = 99
	if src.Loads()["w1"].ActiveRequests != 3 {
		t.Fatal("Loads shares its reports")
	}

	// w1 keeps reporting, w2 falls silent past the TTL.
	clock.Add(2 * time.Second)
	agg.Observe(&triplanev1.LoadReport{InstanceId: "w1", Seq: 1000, SentAt: timestamppb.New(clock.Now())})
	clock.Add(2 * time.Second)
	l = src.Loads()
	if _, ok := l["w2"]; ok || len(l) != 1 || l["w1"].Seq != 1000 {
		t.Fatalf("after w2's silence: %v", l)
	}
	// A reordered older report does not replace a newer one.
	agg.Observe(&triplanev1.LoadReport{InstanceId: "w1", Seq: 999, SentAt: timestamppb.New(clock.Now().Add(-3 * time.Second))})
	if src.Loads()["w1"].Seq != 1000 {
		t.Fatal("older report replaced a newer one")
	}
	// Bounded: a fourth instance evicts the least recently heard.
	for i, id := range []string{"a", "b", "c"} {
		clock.Add(time.Millisecond)
		agg.Observe(&triplanev1.LoadReport{InstanceId: id, Seq: uint64(i + 1)})
	}
	l = src.Loads()
	if len(l) != 3 || l["w1"] != nil {
		t.Fatalf("bound of 3 instances: %v", l)
	}
	if agg.Evicted() < 2 {
		t.Fatalf("evicted %d", agg.Evicted())
	}
}

// Latest shares one map between calls until the kept reports change, and
// still ages out the silent.
func TestLatestSharedUntilChanged(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	v := event.NewLoadView(event.AggregatorConfig{TTL: 3 * time.Second, Now: clock.Now})
	v.Observe(&triplanev1.LoadReport{InstanceId: "w1", Seq: 1})
	clock.Add(time.Second)
	v.Observe(&triplanev1.LoadReport{InstanceId: "w2", Seq: 1})
	a, b := v.Latest(), v.Latest()
	if len(a) != 2 || a["w1"].Seq != 1 || a["w2"].Seq != 1 {
		t.Fatalf("Latest %v", a)
	}
	b["w3"] = nil // a caller breaking the contract, to tell the maps apart
	if len(a) != 3 {
		t.Fatal("two calls without a change gave different maps")
	}
	delete(b, "w3")
	v.Observe(&triplanev1.LoadReport{InstanceId: "w1", Seq: 2})
	if c := v.Latest(); c["w1"].Seq != 2 || len(c) != 2 {
		t.Fatalf("after a newer report: %v", c)
	}
	if a["w1"].Seq != 1 {
		t.Fatal("an earlier Latest changed under its caller")
	}
	// Both last reported at 1001 s; w1 reports again at 1003 s, and at
	// 1004.5 s only w2 has been silent past the TTL.
	clock.Add(2 * time.Second)
	if c := v.Latest(); len(c) != 2 {
		t.Fatalf("within the TTL: %v", c)
	}
	v.Observe(&triplanev1.LoadReport{InstanceId: "w1", Seq: 3})
	clock.Add(1500 * time.Millisecond)
	c := v.Latest()
	if len(c) != 1 || c["w1"].Seq != 3 || v.Evicted() != 1 {
		t.Fatalf("after w2's silence: %v, evicted %d", c, v.Evicted())
	}
	if l := v.Loads(); len(l) != 1 || l["w1"] == c["w1"] {
		t.Fatal("Loads must copy the map and its reports")
	}
	clock.Add(4 * time.Second)
	if c := v.Latest(); len(c) != 0 || v.Evicted() != 2 {
		t.Fatalf("after everyone's silence: %v", c)
	}
}
