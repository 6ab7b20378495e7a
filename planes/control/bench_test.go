package control_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

func percentile(d []time.Duration, p float64) time.Duration {
	slices.Sort(d)
	return d[min(len(d)-1, int(float64(len(d))*p))]
}

// BenchmarkDiscoveryPropagation: an instance registered through one client
// until a Discovery on another client reports it Added, against the same
// run's raw etcd put on one client until a plain watch on another sees it.
func BenchmarkDiscoveryPropagation(b *testing.B) {
	e := planetest.StartEtcd(b)
	ctx := ctxT(b)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: client(b, e.Endpoints()...), Namespace: "bench", Node: nodeInfo("n1")})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close(ctx)
	d, err := control.NewDiscovery(client(b, e.Endpoints()...), control.DiscoveryConfig{Namespace: "bench", Component: "worker", Endpoint: "generate"})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := d.WaitReady(ctx); err != nil {
		b.Fatal(err)
	}
	events, stop := d.Subscribe()
	defer stop()
	putter, watcher := client(b, e.Endpoints()...), client(b, e.Endpoints()...)
	wch := watcher.Watch(ctx, "/bench/raw/", clientv3.WithPrefix())
	// Let the raw watch register before timing it.
	if _, err := putter.Put(ctx, "/bench/raw/warm", "x"); err != nil {
		b.Fatal(err)
	}
	<-wch
	raw := make([]time.Duration, 0, b.N)
	disc := make([]time.Duration, 0, b.N)
	val, _ := protojson.Marshal(instance("x"))
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if _, err := putter.Put(ctx, fmt.Sprintf("/bench/raw/%d", i), string(val)); err != nil {
			b.Fatal(err)
		}
		<-wch
		raw = append(raw, time.Since(t0))

		id := fmt.Sprintf("w%d", i)
		t0 = time.Now()
		if err := r.Register(ctx, instance(id)); err != nil {
			b.Fatal(err)
		}
		for ev := range events {
			if ev.Type == control.Added && ev.Value.InstanceId == id {
				break
			}
		}
		disc = append(disc, time.Since(t0))
	}
	b.StopTimer()
	rp50, rp99 := percentile(raw, 0.5), percentile(raw, 0.99)
	dp50, dp99 := percentile(disc, 0.5), percentile(disc, 0.99)
	b.ReportMetric(float64(dp50.Microseconds()), "discovery-p50-µs")
	b.ReportMetric(float64(dp99.Microseconds()), "discovery-p99-µs")
	b.ReportMetric(float64(rp50.Microseconds()), "raw-p50-µs")
	b.ReportMetric(float64(rp99.Microseconds()), "raw-p99-µs")
	b.ReportMetric(float64(dp50)/float64(rp50), "p50-ratio")
	b.ReportMetric(float64(dp99)/float64(rp99), "p99-ratio")
}

// BenchmarkPlacementFailover: the placement leader, which also hosts the
// only actor, stops talking to etcd without revoking its lease (as after
// SIGKILL); the time until the other node is leader and the actor is
// published on it, as a multiple of the lease TTL.
func BenchmarkPlacementFailover(b *testing.B) {
	const ttl = time.Second
	var ratios []float64
	for range b.N {
		b.StopTimer()
		e := planetest.StartEtcd(b)
		ctx := ctxT(b)
		j := openJournal(b, ctx)
		n1 := startNode(b, ctx, j, e.Endpoints(), "n1", ttl)
		planetest.EventuallyWithin(b, 10*time.Second, "n1 leads", func() bool { _, ok := n1.placement().Leader(); return ok })
		n2 := startNode(b, ctx, j, e.Endpoints(), "n2", ttl)
		acct := actors.Address{Kind: ledger.Kind, ID: "a"}
		if err := n2.placement().Want(ctx, acct.Kind, acct.ID); err != nil {
			b.Fatal(err)
		}
		planetest.EventuallyWithin(b, 10*time.Second, "placed on n1", func() bool { return n1.placement().Assignments()[acct] == "n1" })
		watch := client(b, e.Endpoints()...)
		b.StartTimer()
		t0 := time.Now()
		n1.cli.Close()
		for {
			resp, err := watch.Get(ctx, "/triplane/test/placement/default/assign/ledger/a")
			if err != nil {
				b.Fatal(err)
			}
			var rec triplanev1.PlacementRecord
			if len(resp.Kvs) == 1 && protojson.Unmarshal(resp.Kvs[0].Value, &rec) == nil && rec.NodeId == "n2" {
				break
			}
			if time.Since(t0) > 20*ttl {
				b.Fatal("no failover")
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(t0)
		b.StopTimer()
		ratios = append(ratios, took.Seconds()/ttl.Seconds())
		_ = n1.node.Close(context.Background())
	}
	slices.Sort(ratios)
	b.ReportMetric(ratios[len(ratios)/2], "failover/TTL-median")
	b.ReportMetric(ratios[len(ratios)-1], "failover/TTL-max")
	b.ReportMetric(ttl.Seconds(), "TTL-s")
}
