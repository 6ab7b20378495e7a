package control_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/actors/placement"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

// A leader whose session expired cannot write placement.
func TestDeposedLeaderCannotWrite(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	cli := e.Client(t)
	s1, err := concurrency.NewSession(cli, concurrency.WithTTL(1))
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Orphan()
	el1 := concurrency.NewElection(s1, "/triplane/test/election/g")
	if err := el1.Campaign(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	put := func(v string) clientv3.Op { return clientv3.OpPut("/triplane/test/placement/g/assign/router/m", v) }
	if err := control.FencedTxn(ctx, cli, el1.Key(), el1.Rev(), put("old")); err != nil {
		t.Fatalf("leader's write: %v", err)
	}
	// The old leader's session expires (keepalives stop, as in a pause or
	// partition); another node is elected.
	s1.Orphan()
	s2, err := concurrency.NewSession(client(t, e.Endpoints()...), concurrency.WithTTL(1))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	el2 := concurrency.NewElection(s2, "/triplane/test/election/g")
	if err := el2.Campaign(ctx, "new"); err != nil {
		t.Fatal(err)
	}
	if err := control.FencedTxn(ctx, cli, el1.Key(), el1.Rev(), put("stale")); !errors.Is(err, control.ErrNotLeader) {
		t.Fatalf("deposed leader's write: %v, want ErrNotLeader", err)
	}
	if err := control.FencedTxn(ctx, cli, el2.Key(), el2.Rev(), put("new")); err != nil {
		t.Fatalf("new leader's write: %v", err)
	}
	resp, err := cli.Get(ctx, "/triplane/test/placement/g/assign/router/m")
	if err != nil || string(resp.Kvs[0].Value) != "new" {
		t.Fatalf("value %v %v, want new", resp, err)
	}
}

// registry holds the kinds these tests place.
func registry() *actors.Registry { return actors.NewRegistry(ledger.Machine{}, placement.Machine{}) }

// testNode is a node of the placement tests: an actor host on a shared
// journal and a control-plane node.
type testNode struct {
	id   string
	host *actors.Host
	node *control.Node
	cli  *clientv3.Client
}

func startNode(t testing.TB, ctx context.Context, j *journal.Journal, endpoints []string, id string, ttl time.Duration) *testNode {
	t.Helper()
	snaps, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snap-"+id), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snaps.Close() })
	h, err := actors.NewHost(actors.HostConfig{Journal: j, Snapshots: snaps, Registry: registry(),
		BackoffMin: time.Millisecond, BackoffMax: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop(context.Background()) })
	cli := client(t, endpoints...)
	n, err := control.StartNode(ctx, control.NodeConfig{Client: cli, Namespace: "test", Info: nodeInfo(id), TTL: ttl,
		Host: h, Journal: j, Snapshots: snaps, Registry: registry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close(context.Background()) })
	return &testNode{id: id, host: h, node: n, cli: cli}
}

func (n *testNode) placement() *control.Placement { return n.node.Placements[control.DefaultGroup] }

func hostedBy(nodes []*testNode, a actors.Address) *testNode {
	for _, n := range nodes {
		for _, h := range n.placement().Hosted() {
			if h == a {
				return n
			}
		}
	}
	return nil
}

func openJournal(t testing.TB, ctx context.Context) *journal.Journal {
	t.Helper()
	nc := planetest.StartNATS(t).Connect(t)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// An actor placed on a node that leaves is placed elsewhere and recovers
// its state from the journal there; the placement actor journals why.
func TestPlacementMovesActorsOfADeadNode(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	nodes := []*testNode{
		startNode(t, ctx, j, e.Endpoints(), "n1", 2*time.Second),
		startNode(t, ctx, j, e.Endpoints(), "n2", 2*time.Second),
	}
	acct := actors.Address{Kind: ledger.Kind, ID: "acct-1"}
	if err := nodes[1].placement().Want(ctx, acct.Kind, acct.ID); err != nil {
		t.Fatal(err)
	}
	var first *testNode
	planetest.EventuallyWithin(t, 10*time.Second, "actor hosted", func() bool { first = hostedBy(nodes, acct); return first != nil })
	if _, err := first.host.Request(ctx, acct, &triplanev1.LedgerDeposit{Amount: 100}); err != nil {
		t.Fatal(err)
	}
	if err := first.host.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := first.node.Close(ctx); err != nil {
		t.Fatal(err)
	}
	other := nodes[0]
	if other == first {
		other = nodes[1]
	}
	planetest.EventuallyWithin(t, 15*time.Second, "actor moved to the surviving node", func() bool { return hostedBy([]*testNode{other}, acct) != nil })
	rec, ok := other.node.Hoster.Recovered(acct)
	if !ok || rec.State.(*triplanev1.LedgerState).Balance != 100 {
		t.Fatalf("recovered %v, want balance 100", rec)
	}
	r, err := other.host.Request(ctx, acct, &triplanev1.LedgerDeposit{Amount: 1})
	if err != nil || r.(*triplanev1.LedgerReply).Balance != 101 {
		t.Fatalf("deposit on the new node: %v %v", r, err)
	}
	st, err := other.placement().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Assignments) != 1 || st.Assignments[0].NodeId != other.id {
		t.Fatalf("journaled placement %v", st)
	}
	t.Logf("why: %s", st.Assignments[0].Reason)
	// The journal tells the story, as `triplane replay` shows it.
	var story []string
	err = j.Read(ctx, placement.Kind, control.DefaultGroup, journal.Query{}, func(r *journal.Record) error {
		ev, err := r.Decode()
		if p, ok := ev.(*triplanev1.PlacementActorPlaced); ok {
			story = append(story, p.NodeId+": "+p.Reason)
		}
		return err
	})
	if err != nil || len(story) != 2 || !strings.Contains(story[1], "left (gone, draining or unhealthy); moved") {
		t.Fatalf("journaled placements %q (%v)", story, err)
	}
}

// A three-member etcd cluster loses its leader member; registration and
// placement keep working on the other two.
func TestThreeMemberClusterSurvivesLeaderLoss(t *testing.T) {
	members, urls := cluster(t, 3)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	nodes := []*testNode{
		startNode(t, ctx, j, urls, "n1", 2*time.Second),
		startNode(t, ctx, j, urls, "n2", 2*time.Second),
	}
	a1 := actors.Address{Kind: ledger.Kind, ID: "a1"}
	if err := nodes[0].placement().Want(ctx, a1.Kind, a1.ID); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 10*time.Second, "a1 hosted", func() bool { return hostedBy(nodes, a1) != nil })
	var leader int
	planetest.EventuallyWithin(t, 5*time.Second, "an etcd leader", func() bool {
		for i, m := range members {
			if m.Server.Leader() == m.Server.MemberID() {
				leader = i
				return true
			}
		}
		return false
	})
	members[leader].Close()
	members[leader] = nil
	a2 := actors.Address{Kind: ledger.Kind, ID: "a2"}
	planetest.EventuallyWithin(t, 20*time.Second, "want written after the leader member died", func() bool {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return nodes[1].placement().Want(wctx, a2.Kind, a2.ID) == nil
	})
	planetest.EventuallyWithin(t, 20*time.Second, "a2 hosted after the leader member died", func() bool { return hostedBy(nodes, a2) != nil })
	if hostedBy(nodes, a1) == nil {
		t.Fatal("a1 no longer hosted")
	}
}

// A node that starts draining gets its actors moved off, and gets no new
// ones.
func TestDrainingNodeHandsItsActorsOver(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	nodes := []*testNode{
		startNode(t, ctx, j, e.Endpoints(), "n1", 2*time.Second),
		startNode(t, ctx, j, e.Endpoints(), "n2", 2*time.Second),
	}
	a := actors.Address{Kind: ledger.Kind, ID: "d1"}
	if err := nodes[0].placement().Want(ctx, a.Kind, a.ID); err != nil {
		t.Fatal(err)
	}
	var first *testNode
	planetest.EventuallyWithin(t, 10*time.Second, "hosted", func() bool { first = hostedBy(nodes, a); return first != nil })
	if err := first.node.Registrar.SetHealth(ctx, triplanev1.HealthState_HEALTH_STATE_DRAINING, "test"); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 10*time.Second, "moved off the draining node", func() bool {
		h := hostedBy(nodes, a)
		return h != nil && h != first && len(first.placement().Hosted()) == 0
	})
	b := actors.Address{Kind: ledger.Kind, ID: "d2"}
	if err := nodes[0].placement().Want(ctx, b.Kind, b.ID); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 10*time.Second, "new actor placed", func() bool { return hostedBy(nodes, b) != nil })
	if hostedBy(nodes, b) == first {
		t.Fatal("new actor placed on the draining node")
	}
}

// An elected node whose decisions the placement journal refuses (its epoch
// is behind the journal's: etcd restored or wiped while the journal was
// kept) hands leadership on instead of winning its own election again and
// again; so does a leader that cannot reconcile.
func TestFencedLeaderHandsLeadershipOn(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	b, err := actors.NewBatch("restored", time.Now(), []proto.Message{&triplanev1.PlacementLeaderChanged{Epoch: 1 << 40, Leader: "old"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Append(ctx, placement.Kind, control.DefaultGroup, journal.Position{}, b); err != nil {
		t.Fatal(err)
	}
	nodes := []*testNode{
		startNode(t, ctx, j, e.Endpoints(), "n1", 5*time.Second),
		startNode(t, ctx, j, e.Endpoints(), "n2", 5*time.Second),
	}
	planetest.EventuallyWithin(t, 20*time.Second, "both nodes elected in turn", func() bool {
		return planetest.CounterValue(t, nodes[0].node.Metrics.Elected) > 0 && planetest.CounterValue(t, nodes[1].node.Metrics.Elected) > 0
	})
}

// A node cut off from etcd past its lease stops hosting: for etcd it is
// gone and the leader gives its actors to other nodes, which must not find
// them still running where they were. Once back, it hosts again what it is
// given.
func TestNodeWithoutLeaseStopsHosting(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	p := startProxy(t, strings.TrimPrefix(e.Endpoints()[0], "http://"))
	cut := startNode(t, ctx, j, []string{p.URL()}, "n1", time.Second)
	other := startNode(t, ctx, j, e.Endpoints(), "n2", time.Second)
	for i := range 4 {
		if err := other.placement().Want(ctx, ledger.Kind, fmt.Sprint("acct-", i)); err != nil {
			t.Fatal(err)
		}
	}
	planetest.EventuallyWithin(t, 15*time.Second, "actors on both nodes", func() bool {
		return len(cut.placement().Hosted()) > 0 && len(cut.placement().Hosted())+len(other.placement().Hosted()) == 4
	})
	p.Block()
	planetest.EventuallyWithin(t, 15*time.Second, "the cut-off node hosts nothing", func() bool { return len(cut.placement().Hosted()) == 0 })
	planetest.EventuallyWithin(t, 15*time.Second, "the other node hosts every actor", func() bool { return len(other.placement().Hosted()) == 4 })
	p.Unblock()
	planetest.EventuallyWithin(t, 20*time.Second, "the node back registered", func() bool { held, _ := cut.node.Registrar.Held(); return held })
	// Back with a new lease, it hosts only what etcd assigns it now, not
	// what its cache said before the cut: no actor is ever seen on both.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		both := map[actors.Address]int{}
		for _, n := range []*testNode{cut, other} {
			for _, a := range n.placement().Hosted() {
				if both[a]++; both[a] == 2 {
					t.Fatalf("%s hosted by both nodes after the lease came back", a)
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// State read on a node that does not lead is the journal's, every time,
// not the copy that node recovered on its first read.
func TestStateOffTheLeaderIsCurrent(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	j := openJournal(t, ctx)
	nodes := []*testNode{
		startNode(t, ctx, j, e.Endpoints(), "n1", 2*time.Second),
		startNode(t, ctx, j, e.Endpoints(), "n2", 2*time.Second),
	}
	var follower *testNode
	planetest.EventuallyWithin(t, 10*time.Second, "a leader", func() bool {
		for i, n := range nodes {
			if _, ok := n.placement().Leader(); ok {
				follower = nodes[1-i]
				return true
			}
		}
		return false
	})
	for i := range 2 {
		if err := follower.placement().Want(ctx, ledger.Kind, fmt.Sprint("acct-", i)); err != nil {
			t.Fatal(err)
		}
		planetest.EventuallyWithin(t, 10*time.Second, "the follower reads the new assignment", func() bool {
			st, err := follower.placement().State(ctx)
			return err == nil && len(st.Assignments) == i+1
		})
	}
}

// A leader whose reconciles keep failing (its journal unreachable: another
// node may reach it) hands leadership on within two lease TTLs, and the
// other node leads.
func TestFailingLeaderHandsLeadershipOn(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	n := planetest.StartNATS(t)
	conns := map[string]*nats.Conn{}
	var nodes []*testNode
	for _, id := range []string{"n1", "n2"} {
		nc := n.Connect(t)
		j, err := journal.Open(ctx, nc, journal.Config{})
		if err != nil {
			t.Fatal(err)
		}
		conns[id] = nc
		nodes = append(nodes, startNode(t, ctx, j, e.Endpoints(), id, 2*time.Second))
	}
	elected := func(n *testNode) float64 { return planetest.CounterValue(t, n.node.Metrics.Elected) }
	var leader, other *testNode
	planetest.EventuallyWithin(t, 20*time.Second, "a leader", func() bool {
		switch {
		case elected(nodes[0]) > 0:
			leader, other = nodes[0], nodes[1]
		case elected(nodes[1]) > 0:
			leader, other = nodes[1], nodes[0]
		}
		return leader != nil
	})
	if elected(other) != 0 {
		t.Fatalf("both nodes elected before the fault")
	}
	// The leader loses its journal: every reconcile waits for the actor
	// host and fails, each bounded by the lease TTL (2 s); after two TTLs
	// of failures the leader hands on. Before, each waited for the host's
	// request timeout (30 s) and the leader kept leading for 8 of them.
	conns[leader.id].Close()
	// A change the leader must journal: a new actor wanted (through etcd,
	// which the leader still reaches).
	if err := other.placement().Want(ctx, ledger.Kind, "acct-1"); err != nil {
		t.Fatal(err)
	}
	planetest.EventuallyWithin(t, 20*time.Second, "the other node elected", func() bool { return elected(other) > 0 })
	// It reconciles: its placement actor journals and answers.
	planetest.EventuallyWithin(t, 20*time.Second, "the new leader's state", func() bool {
		_, err := other.placement().State(ctx)
		return err == nil
	})
}
