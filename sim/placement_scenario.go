package sim

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/placement"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// The placement scenario's shape.
const (
	placementNodes  = 5
	placementActors = 8
	placementTTL    = 300 * time.Millisecond
	placementTick   = 50 * time.Millisecond
)

// BugUnfencedWrites makes placement leaders publish assignments without
// the fence (the create revision of their election key): a leader that was
// paused past its lease then overwrites its successor's decisions.
const BugUnfencedWrites = "unfenced-writes"

// placementScenario runs the real placement machine under the simulated
// control plane (Etcd): nodes hold leases, campaign, and the leader feeds
// the placement actor its view and publishes the assignments in fenced
// writes. Nodes pause past their lease (a stop-the-world pause) and resume
// believing they still lead; nodes are partitioned from etcd and heal;
// journal appends fail and the actor crashes.
var placementScenario = Scenario{
	Name: "placement",
	Description: fmt.Sprintf("%d nodes electing a placement leader on the simulated etcd (leases of %s), %d singleton actors; nodes pause past their lease and resume as stale leaders, are partitioned from etcd and heal",
		placementNodes, placementTTL, placementActors),
	Registry: func() *actors.Registry { return actors.NewRegistry(placement.Machine{}) },
	Drive:    drivePlacement,
	// The placement actor journals through the host. snapshot-before-
	// persist shows here only when the view changes between a failed
	// reconcile and the next (a node losing its lease): the next one
	// usually journals the same events the early snapshot holds. Rare
	// with the default faults (no seed of 2000), found with more append
	// failures (seed 2649 at --append-failure 0.2).
	Bugs:        []string{BugApplyBeforePersist, BugSnapshotBeforePersist, BugUnfencedWrites},
	Crashes:     "any rate above 0 crashes the placement actor once (a fixed number, however high the rate)",
	ReadsFaults: []string{"LeaderChanges"},
}

type simNode struct {
	id       string
	etcd     *EtcdClient // the node's connection: what a partition cuts
	lease    int64
	epoch    int64 // create revision of this node's election key
	leader   bool  // what the node believes
	pausedTo time.Time
	queued   []func()
	last     *triplanev1.PlacementState // the last decisions it reconciled
}

type placementRun struct {
	r        *Run
	etcd     *Etcd
	nodes    []*simNode
	want     []*triplanev1.ActorRef
	group    actors.Address
	writes   int
	refused  int
	problems *Problems
	final    error
}

func drivePlacement(r *Run) Invariant {
	w := r.World
	p := &placementRun{r: r, problems: NewProblems(w), etcd: NewEtcd(w), group: actors.Address{Kind: placement.Kind, ID: "default"}}
	for i := range placementActors {
		p.want = append(p.want, &triplanev1.ActorRef{Kind: "router", Id: fmt.Sprintf("model-%d", i)})
	}
	end := r.Opts.Duration + 2*time.Second
	for i := range placementNodes {
		n := &simNode{id: fmt.Sprintf("n%d", i)}
		n.etcd = p.etcd.Client(n.id)
		p.nodes = append(p.nodes, n)
		w.After(time.Duration(i)*7*time.Millisecond, func() { p.register(n) })
		n.etcd.Watch("/election/", func(string, bool) { p.onNode(n, func() { p.learn(n) }) })
		for t := placementTick + time.Duration(i)*time.Millisecond; t < end; t += placementTick {
			w.After(t, func() { p.tick(n) })
		}
	}
	// Pauses longer than the lease: the node comes back still believing
	// it leads, with decisions to publish.
	for range 1 + int(r.Opts.Duration/time.Second) {
		at := time.Duration(w.Rand().Int64N(int64(r.Opts.Duration)))
		n := p.nodes[w.Rand().IntN(len(p.nodes))]
		w.After(at, func() { p.pause(n, 2*placementTTL+time.Duration(w.Rand().Int64N(int64(placementTTL)))) })
	}
	// Partitions of a node from etcd, shorter and longer than its lease:
	// it keeps running, its requests fail, its watch stalls; after the heal
	// it may still believe it leads.
	for range 1 + int(r.Opts.Duration/time.Second) {
		at := time.Duration(w.Rand().Int64N(int64(r.Opts.Duration)))
		n := p.nodes[w.Rand().IntN(len(p.nodes))]
		d := placementTTL/2 + time.Duration(w.Rand().Int64N(int64(3*placementTTL)))
		w.After(at, func() { n.etcd.Partition(d) })
	}
	if r.Opts.Faults.CrashRate > 0 {
		w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() { r.Host.Crash(p.group) })
	}
	for range r.Opts.Faults.LeaderChanges {
		// etcd elects a new leader: a short outage, leases kept.
		w.After(time.Duration(w.Rand().Int64N(int64(r.Opts.Duration))), func() {
			p.etcd.LeaderChange(time.Duration(50+w.Rand().IntN(200)) * time.Millisecond)
		})
	}
	w.After(end-time.Millisecond, func() { p.final = p.converged() })
	return p.check
}

func (p *placementRun) onNode(n *simNode, fn func()) {
	if p.r.World.Now().Before(n.pausedTo) {
		n.queued = append(n.queued, fn)
		return
	}
	fn()
}

func (p *placementRun) pause(n *simNode, d time.Duration) {
	w := p.r.World
	n.pausedTo = w.Now().Add(d)
	w.Tracef("node %s paused for %s (leader: %v)", n.id, d, n.leader)
	w.After(d, func() {
		w.Tracef("node %s resumed", n.id)
		// The node acts on what it believed before it sees what changed.
		p.tick(n)
		q := n.queued
		n.queued = nil
		for _, fn := range q {
			fn()
		}
	})
}

// register takes a lease and campaigns: both keys live on the lease. While
// etcd is unavailable it fails and the next tick tries again.
func (p *placementRun) register(n *simNode) {
	lease, err := n.etcd.Grant(placementTTL)
	if err != nil {
		n.lease = 0
		return
	}
	n.lease = lease
	n.etcd.Put("/nodes/"+n.id, n.id, n.lease)
	rev, ok := n.etcd.Put("/election/"+n.id, n.id, n.lease)
	if ok {
		if _, epoch, found, err := n.etcd.Get("/election/" + n.id); err == nil && found {
			n.epoch = epoch
			p.r.World.Tracef("node %s campaigns at revision %d (put %d)", n.id, n.epoch, rev)
		}
	}
	p.learn(n)
}

// learn reads the election as a watch event tells the node to.
func (p *placementRun) learn(n *simNode) {
	key, rev, ok, err := n.etcd.Leader("/election/")
	if err != nil {
		return // unreachable: keep believing what it believed
	}
	was := n.leader
	n.leader = ok && key == "/election/"+n.id && rev == n.epoch
	if n.leader != was {
		p.r.World.Tracef("node %s leader=%v (epoch %d)", n.id, n.leader, n.epoch)
	}
}

func (p *placementRun) tick(n *simNode) {
	w := p.r.World
	if w.Now().Before(n.pausedTo) {
		return
	}
	// A node that believes it leads first publishes what it decided last
	// (a retry, as after a failed write) — before its keep-alive loop can
	// notice a lost lease, as after a stop-the-world pause. The fence is
	// what makes that harmless.
	if n.leader && n.last != nil {
		p.publish(n, n.last)
	}
	if n.lease == 0 {
		p.register(n)
	} else if alive, err := n.etcd.KeepAlive(n.lease); err == nil && !alive {
		// The lease expired (a pause): register again, at the back. (An
		// unavailable etcd is no news: try again next tick.)
		w.Tracef("node %s lost its lease", n.id)
		p.register(n)
	}
	if !n.leader {
		return
	}
	keys, err := n.etcd.Keys("/nodes/")
	if err != nil {
		return // no view of the nodes this tick
	}
	cmd := &triplanev1.PlacementReconcile{Epoch: n.epoch, Leader: n.id, Actors: p.want}
	for _, k := range keys {
		cmd.Nodes = append(cmd.Nodes, strings.TrimPrefix(k, "/nodes/"))
	}
	epoch := n.epoch
	p.r.Host.Deliver(p.group, fmt.Sprintf("%s@%d-%s", n.id, epoch, w.Now().Format("15:04:05.000000")), cmd, func(m proto.Message, err error) {
		p.onNode(n, func() { p.reconciled(n, epoch, m, err) })
	})
}

// reconciled handles the placement actor's answer as the node that asked:
// with the epoch it asked with (it may have re-registered since), and only
// when it runs (a paused node handles it on resume).
func (p *placementRun) reconciled(n *simNode, epoch int64, m proto.Message, err error) {
	switch {
	case err == nil && epoch != n.epoch:
		// Decided for an election key the node no longer holds.
	case err == nil:
		n.last = m.(*triplanev1.PlacementState)
		p.publish(n, n.last)
	case errors.Is(err, placement.ErrFenced):
		p.refused++
	case errors.Is(err, actors.ErrPersist), errors.Is(err, ErrCrashed):
		// The next tick tries again.
	default:
		p.problems.Add(fmt.Errorf("node %s reconcile: %w", n.id, err))
	}
}

// publish writes the assignments, fenced by the node's election key.
func (p *placementRun) publish(n *simNode, st *triplanev1.PlacementState) {
	for _, a := range st.Assignments {
		key := "/assign/" + a.Actor.Kind + "/" + a.Actor.Id
		val := fmt.Sprintf("%s@%d", a.NodeId, n.epoch)
		var ok bool
		if p.r.Opts.Bug == BugUnfencedWrites {
			_, ok = n.etcd.Put(key, val, 0)
		} else {
			ok = n.etcd.PutIfCreateRev("/election/"+n.id, n.epoch, key, val)
		}
		if !ok {
			p.refused++
			continue
		}
		p.writes++
		leaderKey, leaderRev, _ := p.etcd.Leader("/election/")
		if leaderKey != "/election/"+n.id || leaderRev != n.epoch {
			p.problems.Add(fmt.Errorf("invariant fenced-leader: node %s (epoch %d) wrote %s while %s (epoch %d) leads",
				n.id, n.epoch, key, leaderKey, leaderRev))
		}
	}
}

// converged: every wanted actor is assigned, by the current leader's
// epoch, to a live node.
func (p *placementRun) converged() error {
	_, leaderRev, ok := p.etcd.Leader("/election/")
	if !ok {
		return errors.New("invariant converged: no leader at the end")
	}
	for _, a := range p.want {
		key := "/assign/" + a.Kind + "/" + a.Id
		v, _, ok := p.etcd.Get(key)
		if !ok {
			return fmt.Errorf("invariant converged: %s never assigned", key)
		}
		node, epoch, _ := strings.Cut(v, "@")
		if _, _, live := p.etcd.Get("/nodes/" + node); !live {
			return fmt.Errorf("invariant converged: %s on %s, which is not live", key, node)
		}
		if epoch != fmt.Sprint(leaderRev) {
			return fmt.Errorf("invariant converged: %s written at epoch %s, the leader's is %d", key, epoch, leaderRev)
		}
	}
	return nil
}

func (p *placementRun) check(r *Run) error {
	if err := p.problems.Err(); err != nil {
		return err
	}
	if p.final != nil {
		return p.final
	}
	r.World.Tracef("placement: %d fenced writes took effect, %d refused", p.writes, p.refused)
	return nil
}
