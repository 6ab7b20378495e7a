package control_test

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

func instance(id string) *triplanev1.InstanceInfo {
	return &triplanev1.InstanceInfo{Component: "worker", Endpoint: "generate", InstanceId: id,
		Addresses: []*triplanev1.Endpoint{{Protocol: triplanev1.Protocol_PROTOCOL_DATA_TCP, Address: "127.0.0.1:9000"}}}
}

func discovery(t *testing.T, cli *clientv3.Client) *control.Discovery {
	t.Helper()
	d, err := control.NewDiscovery(cli, control.DiscoveryConfig{Namespace: "test", Component: "worker", Endpoint: "generate"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	if err := d.WaitReady(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	return d
}

func ids(ins []*triplanev1.InstanceInfo) string {
	var s []string
	for _, in := range ins {
		s = append(s, in.InstanceId)
	}
	return strings.Join(s, ",")
}

func TestRegistrationIsReadableProtobufJSON(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n1"), TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close(context.Background()) })
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
	resp, err := e.Client(t).Get(ctx, "/triplane/test/instances/worker/generate/w1")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get: %v %v", resp, err)
	}
	kv := resp.Kvs[0]
	lease, _, _ := r.Lease()
	if kv.Lease != int64(lease) {
		t.Fatalf("instance on lease %x, want the node's %x", kv.Lease, lease)
	}
	var in triplanev1.InstanceInfo
	if err := protojson.Unmarshal(kv.Value, &in); err != nil {
		t.Fatalf("value is not protobuf JSON: %v\n%s", err, kv.Value)
	}
	if !strings.Contains(string(kv.Value), `"instance_id":"w1"`) || !strings.Contains(string(kv.Value), "HEALTH_STATE_READY") {
		t.Fatalf("value not readable: %s", kv.Value)
	}
	if in.NodeId != "n1" || in.Namespace != "test" {
		t.Fatalf("node id / namespace not filled in: %v", &in)
	}
	ttl, err := e.Client(t).TimeToLive(ctx, lease)
	if err != nil || ttl.GrantedTTL != 2 {
		t.Fatalf("lease TTL %v %v, want 2 s", ttl, err)
	}
}

func TestBadRegistrationsAreRejected(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	cli := e.Client(t)
	for name, cfg := range map[string]control.RegistrarConfig{
		"no namespace": {Client: cli, Node: nodeInfo("n")},
		"slash in id":  {Client: cli, Namespace: "test", Node: nodeInfo("a/b")},
		"short ttl":    {Client: cli, Namespace: "test", Node: nodeInfo("n"), TTL: time.Millisecond},
	} {
		if _, err := control.StartRegistrar(ctx, cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: cli, Namespace: "test", Node: nodeInfo("n")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	bad := instance("w 1")
	if err := r.Register(ctx, bad); err == nil || !strings.Contains(err.Error(), "instance id") {
		t.Fatalf("bad instance id: %v", err)
	}
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
}

// A crashed node's instances leave every watcher within TTL + 1 s; a
// cleanly closed node's at once.
func TestLeaseExpiryRemovesInstancesFromEveryWatcher(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	const ttl = 2 * time.Second
	crashing := client(t, e.Endpoints()...)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: crashing, Namespace: "test", Node: nodeInfo("n1"), TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	clean, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n2"), TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
	if err := clean.Register(ctx, instance("w2")); err != nil {
		t.Fatal(err)
	}
	watchers := []*control.Discovery{discovery(t, e.Client(t)), discovery(t, client(t, e.Endpoints()...)), discovery(t, client(t, e.Endpoints()...))}
	for i, w := range watchers {
		planetest.EventuallyWithin(t, 5*time.Second, "watcher sees both", func() bool { return ids(w.Instances()) == "w1,w2" })
		_ = i
	}
	// Clean shutdown: gone at once (well within one TTL).
	if err := clean.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, w := range watchers {
		planetest.EventuallyWithin(t, ttl/2, "cleanly closed node's instance removed", func() bool { return ids(w.Instances()) == "w1" })
	}
	// Crash: the client goes away without revoking; the lease expires.
	t0 := time.Now()
	crashing.Close()
	for _, w := range watchers {
		planetest.EventuallyWithin(t, ttl+time.Second-time.Since(t0), "crashed node's instance removed", func() bool { return len(w.Instances()) == 0 })
	}
	t.Logf("removed from every watcher %s after the crash (TTL %s)", time.Since(t0).Round(time.Millisecond), ttl)
	_ = r.Close(context.Background()) // revoke fails: its client is closed
}

// Revoking the node's lease from elsewhere (as etcd does when it expires)
// does not stop the node: it registers again on a new lease and counts it.
func TestLeaseLossReRegisters(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	m := control.NewMetrics(nil)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n1"), TTL: 2 * time.Second, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
	w := discovery(t, client(t, e.Endpoints()...))
	events, stop := w.Subscribe()
	defer stop()
	planetest.EventuallyWithin(t, 5*time.Second, "registered", func() bool { return ids(w.Instances()) == "w1" })
	old, gen, changed := r.Lease()
	// One client for the polls below: a new one each poll would dial each time.
	cli := e.Client(t)
	if _, err := cli.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("no new lease")
	}
	lease, gen2, _ := r.Lease()
	if lease == old || gen2 != gen+1 {
		t.Fatalf("lease %x gen %d after loss, had %x gen %d", lease, gen2, old, gen)
	}
	planetest.EventuallyWithin(t, 5*time.Second, "re-registered on the new lease", func() bool {
		resp, err := cli.Get(ctx, "/triplane/test/instances/worker/generate/w1")
		return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease == int64(lease)
	})
	planetest.EventuallyWithin(t, 5*time.Second, "node re-registered", func() bool {
		resp, err := cli.Get(ctx, "/triplane/test/nodes/n1")
		return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease == int64(lease)
	})
	if got := planetest.CounterValue(t, m.LeaseLost); got != 1 {
		t.Fatalf("lease_lost_total = %v, want 1", got)
	}
	// The watcher saw it go and come back.
	var seen []string
	for len(seen) < 2 {
		select {
		case ev := <-events:
			seen = append(seen, ev.Type.String())
		case <-ctx.Done():
			t.Fatalf("events %v", seen)
		}
	}
	if strings.Join(seen, ",") != "removed,added" {
		t.Fatalf("events %v, want removed,added", seen)
	}
}

// etcd unreachable for longer than the TTL: the node keeps running and
// registers again once it is back.
func TestUnreachableLongerThanTTLReRegisters(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	p := startProxy(t, strings.TrimPrefix(e.Endpoints()[0], "http://"))
	m := control.NewMetrics(nil)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: client(t, p.URL()), Namespace: "test", Node: nodeInfo("n1"),
		TTL: time.Second, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
	w := discovery(t, e.Client(t))
	planetest.EventuallyWithin(t, 5*time.Second, "registered", func() bool { return ids(w.Instances()) == "w1" })
	p.Block()
	planetest.EventuallyWithin(t, 10*time.Second, "instance expired while unreachable", func() bool { return len(w.Instances()) == 0 })
	planetest.EventuallyWithin(t, 10*time.Second, "loss counted", func() bool { return planetest.CounterValue(t, m.LeaseLost) >= 1 })
	p.Unblock()
	planetest.EventuallyWithin(t, 20*time.Second, "registered again", func() bool { return ids(w.Instances()) == "w1" })
}

// A registration that failed stays failed: the next lease does not write
// it behind the caller's back (a worker that gave up would be routed to).
func TestFailedRegistrationIsNotWrittenLater(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	p := startProxy(t, strings.TrimPrefix(e.Endpoints()[0], "http://"))
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: client(t, p.URL()), Namespace: "test", Node: nodeInfo("n1"), TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if err := r.Register(ctx, instance("w1")); err != nil {
		t.Fatal(err)
	}
	p.Block()
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = r.Register(short, instance("w2"))
	cancel()
	p.Unblock()
	if err == nil {
		t.Fatal("a registration through a blocked connection succeeded")
	}
	old, _, changed := r.Lease()
	if _, err := e.Client(t).Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("no new lease")
	}
	resp, err := e.Client(t).Get(ctx, "/triplane/test/instances/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	if strings.Join(keys, " ") != "/triplane/test/instances/worker/generate/w1" {
		t.Fatalf("registered on the new lease: %v, want w1 only", keys)
	}
}
