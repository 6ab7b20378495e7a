package control_test

import (
	"strings"
	"testing"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

// A watch that was cut while etcd compacted past its revision resyncs in
// full and reports exactly the differences; without compaction it resumes
// from its revision and misses nothing.
func TestDiscoveryResyncsAfterCompaction(t *testing.T) { testDiscoveryCut(t, true) }

func TestDiscoveryResumesAfterDisconnect(t *testing.T) { testDiscoveryCut(t, false) }

func testDiscoveryCut(t *testing.T, compact bool) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	p := startProxy(t, strings.TrimPrefix(e.Endpoints()[0], "http://"))
	m := control.NewMetrics(nil)
	w, err := control.NewDiscovery(client(t, p.URL()), control.DiscoveryConfig{Namespace: "test", Component: "worker", Endpoint: "generate",
		Cache: control.CacheConfig{Metrics: m}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n1")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	for _, id := range []string{"a", "b", "c"} {
		if err := r.Register(ctx, instance(id)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 5*time.Second, "initial", func() bool { return ids(w.Instances()) == "a,b,c" })
	events, stop := w.Subscribe()
	defer stop()

	p.Block()
	if err := r.Deregister(ctx, "worker", "generate", "a"); err != nil {
		t.Fatal(err)
	}
	up := instance("b")
	up.Metadata = map[string]string{"model": "m2"}
	for _, in := range []*triplanev1.InstanceInfo{up, instance("d")} {
		if err := r.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := e.Client(t).Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	if compact {
		if _, err := e.Client(t).Compact(ctx, resp.Header.Revision); err != nil {
			t.Fatal(err)
		}
	}
	p.Unblock()
	planetest.EventuallyWithin(t, 20*time.Second, "resynced", func() bool { return ids(w.Instances()) == "b,c,d" })
	got := map[string]string{}
	for len(got) < 3 {
		select {
		case ev := <-events:
			got[ev.Value.InstanceId] = ev.Type.String()
		case <-ctx.Done():
			t.Fatalf("events %v", got)
		}
	}
	if got["a"] != "removed" || got["b"] != "updated" || got["d"] != "added" {
		t.Fatalf("events %v, want a removed, b updated, d added", got)
	}
	if n := planetest.CounterValue(t, m.WatchResyncs); compact && n < 1 {
		t.Fatalf("watch_resyncs_total = %v: the watch did not notice the compaction", n)
	} else if !compact && n != 0 {
		t.Fatalf("watch_resyncs_total = %v without compaction: it should have resumed", n)
	}
}

type loads map[string]float64

func (l loads) Load(id string) (float64, bool) { v, ok := l[id]; return v, ok }

func TestPickersAndReportDown(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n1")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	for _, id := range []string{"a", "b", "c"} {
		if err := r.Register(ctx, instance(id)); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Unix(1000, 0)
	d, err := control.NewDiscovery(e.Client(t), control.DiscoveryConfig{Namespace: "test", Component: "worker", Endpoint: "generate",
		DownGrace: time.Minute, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	planetest.EventuallyWithin(t, 5*time.Second, "listed", func() bool { return ids(d.Instances()) == "a,b,c" })

	rr := &control.RoundRobin{}
	var picks []string
	for range 4 {
		in, err := d.Pick(control.PickRequest{}, rr)
		if err != nil {
			t.Fatal(err)
		}
		picks = append(picks, in.InstanceId)
	}
	if strings.Join(picks, ",") != "a,b,c,a" {
		t.Fatalf("round robin %v", picks)
	}
	ll := &control.LeastLoaded{Source: loads{"a": 5, "b": 1, "c": 3}}
	if in, _ := d.Pick(control.PickRequest{}, ll); in.InstanceId != "b" {
		t.Fatalf("least loaded picked %s", in.InstanceId)
	}
	rnd := control.NewRandom(1)
	for range 20 {
		if _, err := d.Pick(control.PickRequest{}, rnd); err != nil {
			t.Fatal(err)
		}
	}

	// Reported down: skipped for the grace period, then back.
	d.ReportDown(d.Instances()[1])
	if got := ids(d.Available()); got != "a,c" {
		t.Fatalf("available %s after b reported down", got)
	}
	now = now.Add(time.Minute)
	if got := ids(d.Available()); got != "a,b,c" {
		t.Fatalf("available %s after the grace period", got)
	}
	// Draining and unhealthy instances are not picked.
	if err := r.SetHealth(ctx, triplanev1.HealthState_HEALTH_STATE_DRAINING, "shutting down"); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 5*time.Second, "draining seen", func() bool { return len(d.Available()) == 0 && len(d.Instances()) == 3 })
	if _, err := d.Pick(control.PickRequest{}, rr); err == nil {
		t.Fatal("picked a draining instance")
	}
}
