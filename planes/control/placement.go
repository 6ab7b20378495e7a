package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/placement"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// ErrNotLeader: a fenced placement write failed because the writer's
// election key is gone (or was never the leader's).
var ErrNotLeader = errors.New("control: not the placement leader (fenced write refused)")

// Hoster starts and stops the actors placed on this node.
type Hoster interface {
	StartActor(ctx context.Context, a actors.Address) error
	StopActor(ctx context.Context, a actors.Address) error
}

// PlacementConfig configures a Placement.
type PlacementConfig struct {
	Registrar *Registrar
	Group     string
	// Host runs the placement actor while this node leads, journaling its
	// decisions; without one the node only hosts, never leads.
	Host *actors.Host
	// Hoster starts and stops the actors placed here; nil hosts nothing.
	Hoster Hoster
	// Resync bounds how long the leader waits before reconciling again
	// with no change seen; default the lease TTL.
	Resync  time.Duration
	Logger  *slog.Logger
	Metrics *Metrics
	Now     func() time.Time
}

// Placement takes part in one placement group: it campaigns for the
// group's leadership with the node's lease, and while leader decides and
// publishes placements; on every node it starts and stops the actors the
// published placement gives it.
type Placement struct {
	cfg  PlacementConfig
	reg  *Registrar
	keys Keys
	log  *slog.Logger

	assigns *Cache[*triplanev1.PlacementRecord]
	epoch   atomic.Int64 // leader epoch while leading, else 0

	// hosted is changed only by the host goroutine (and Close, after it
	// ended), which starts and stops actors without holding hmu: a start
	// may replay a long journal, and Hosted must not wait for it.
	hmu      sync.Mutex
	hosted   map[actors.Address]bool
	starting *startBackoff[actors.Address] // the host goroutine's
	// syncedGen is the lease generation whose assignments the cache was
	// last found to agree with etcd on (the host goroutine's).
	syncedGen uint64

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// StartPlacement joins the group.
func StartPlacement(cfg PlacementConfig) (*Placement, error) {
	if cfg.Registrar == nil {
		return nil, errors.New("control: placement needs a registrar")
	}
	if err := CheckName("placement group", cfg.Group); err != nil {
		return nil, err
	}
	if cfg.Resync == 0 {
		cfg.Resync = cfg.Registrar.TTL()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	p := &Placement{cfg: cfg, reg: cfg.Registrar, keys: cfg.Registrar.Keys(), hosted: map[actors.Address]bool{}, starting: newStartBackoff[actors.Address](),
		log: cfg.Logger.With("group", cfg.Group, "node_id", cfg.Registrar.NodeID())}
	cc := CacheConfig{Logger: cfg.Logger, Metrics: cfg.Metrics}
	p.assigns = NewCache(p.reg.Client(), p.keys.Assigns(cfg.Group), func() *triplanev1.PlacementRecord { return &triplanev1.PlacementRecord{} }, cc)
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	p.wg.Add(1)
	go p.host(ctx)
	if cfg.Host != nil {
		p.wg.Add(1)
		go p.campaign(ctx)
	}
	return p, nil
}

// Close leaves the group: stops campaigning and hosting. A leader does
// not resign here: revoking the node's lease (Registrar.Close) removes its
// election key at once.
func (p *Placement) Close(ctx context.Context) {
	p.cancel()
	p.wg.Wait()
	p.assigns.Close()
	p.hmu.Lock()
	defer p.hmu.Unlock()
	if p.cfg.Hoster != nil {
		for a := range p.hosted {
			if err := p.cfg.Hoster.StopActor(ctx, a); err != nil {
				p.log.Warn("stop actor", "actor", a, "err", err)
			}
		}
	}
	clear(p.hosted)
}

// Leader reports whether this node leads the group, with its epoch.
func (p *Placement) Leader() (int64, bool) {
	e := p.epoch.Load()
	return e, e != 0
}

// Want asks for a singleton actor to be hosted somewhere in the group.
func (p *Placement) Want(ctx context.Context, kind, id string) error {
	if err := CheckName("actor kind", kind); err != nil {
		return err
	}
	if err := CheckName("actor id", id); err != nil {
		return err
	}
	b, _ := marshal.Marshal(&triplanev1.PlacementWant{Actor: &triplanev1.ActorRef{Kind: kind, Id: id}, RequestedUnixNanos: p.cfg.Now().UnixNano()})
	if _, err := p.reg.Client().Put(ctx, p.keys.Want(p.cfg.Group, kind, id), string(b)); err != nil {
		return fmt.Errorf("control: want %s/%s: %w", kind, id, err)
	}
	return nil
}

// Unwant withdraws a Want.
func (p *Placement) Unwant(ctx context.Context, kind, id string) error {
	if _, err := p.reg.Client().Delete(ctx, p.keys.Want(p.cfg.Group, kind, id)); err != nil {
		return fmt.Errorf("control: unwant %s/%s: %w", kind, id, err)
	}
	return nil
}

// Assignments returns the published placement: actor -> node.
func (p *Placement) Assignments() map[actors.Address]string {
	items, _ := p.assigns.List()
	out := make(map[actors.Address]string, len(items))
	for _, it := range items {
		out[actors.Address{Kind: it.Value.GetActor().GetKind(), ID: it.Value.GetActor().GetId()}] = it.Value.NodeId
	}
	return out
}

// Hosted returns the actors this node hosts now, sorted.
func (p *Placement) Hosted() []actors.Address {
	p.hmu.Lock()
	defer p.hmu.Unlock()
	out := make([]actors.Address, 0, len(p.hosted))
	for a := range p.hosted {
		out = append(out, a)
	}
	slices.SortFunc(out, func(a, b actors.Address) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// mine is the actors items assign to node me.
func mine(items []Item[*triplanev1.PlacementRecord], me string) map[actors.Address]bool {
	out := map[actors.Address]bool{}
	for _, it := range items {
		if it.Value.NodeId == me {
			out[actors.Address{Kind: it.Value.GetActor().GetKind(), ID: it.Value.GetActor().GetId()}] = true
		}
	}
	return out
}

// readAssigns reads the actors assigned to me from etcd (linearizable),
// not from the cache.
func (p *Placement) readAssigns(ctx context.Context, me string) (map[actors.Address]bool, error) {
	rctx, cancel := context.WithTimeout(ctx, p.reg.TTL())
	defer cancel()
	resp, err := p.reg.Client().Get(rctx, p.keys.Assigns(p.cfg.Group), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	items := make([]Item[*triplanev1.PlacementRecord], 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		// Decoded and checked as the cache does, so both skip the same.
		if v, ok := p.assigns.decode(kv); ok {
			items = append(items, Item[*triplanev1.PlacementRecord]{Key: string(kv.Key), Value: v, ModRev: kv.ModRevision})
		}
	}
	return mine(items, me), nil
}

// startTimeout bounds one actor's start (its recovery: a long journal
// replays in minutes, a blocked read never ends).
const startTimeout = 10 * time.Minute

// host starts and stops actors as the published placement changes.
func (p *Placement) host(ctx context.Context) {
	defer p.wg.Done()
	retry := time.NewTicker(time.Second)
	defer retry.Stop()
	changed, stop := p.assigns.Notify()
	defer stop()
	for {
		// Taken before the sync: a loss or a regain during it wakes the
		// next one at once.
		_, lease := p.reg.Held()
		p.syncHosted(ctx)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-lease: // lost, or back
		case <-retry.C: // retries failed starts
		}
	}
}

func (p *Placement) syncHosted(ctx context.Context) {
	if p.cfg.Hoster == nil {
		return
	}
	me := p.reg.NodeID()
	items, _ := p.assigns.List()
	want := mine(items, me)
	// Without its lease the node is gone for etcd: the leader moves its
	// actors to other nodes, and the assignments seen here (a watch cut
	// off with the lease) are stale. It stops hosting until it holds a
	// lease again, rather than run actors other nodes now run too. On a
	// new lease the cache may still be the view from before the cut (its
	// watch reconnects on its own time): until it agrees with a read of
	// etcd, that read says what to host.
	held, _ := p.reg.Held()
	_, gen, _ := p.reg.Lease()
	switch {
	case !held:
		want = nil
	case gen != p.syncedGen:
		fresh, err := p.readAssigns(ctx, me)
		switch {
		case err != nil:
			p.log.Warn("reading the assignments after a new lease; hosting nothing until it works", "err", err)
			want = nil
		case maps.Equal(fresh, want):
			p.syncedGen = gen
		default:
			want = fresh
		}
	}
	p.hmu.Lock()
	hosted := maps.Clone(p.hosted)
	p.hmu.Unlock()
	for a := range hosted {
		if !want[a] {
			if err := p.cfg.Hoster.StopActor(ctx, a); err != nil {
				p.log.Warn("stop actor", "actor", a, "err", err)
			}
			p.hmu.Lock()
			delete(p.hosted, a)
			p.hmu.Unlock()
			p.log.Info("stopped hosting", "actor", a)
		}
	}
	p.starting.keep(want)
	now := p.cfg.Now()
	for a := range want {
		if hosted[a] || !p.starting.due(a, now) {
			continue
		}
		// Bounded: a start replays the actor's journal, and the next
		// changes of placement wait for it. A lease lost meanwhile ends
		// it: the actor may be starting on another node already.
		sctx, cancel := context.WithTimeout(ctx, startTimeout)
		_, lost := p.reg.Held()
		go func() {
			select {
			case <-lost:
				cancel()
			case <-sctx.Done():
			}
		}()
		err := p.cfg.Hoster.StartActor(sctx, a)
		cancel()
		if err != nil {
			// From when the try ended: a start that timed out took long.
			wait := p.starting.failed(a, p.cfg.Now())
			p.log.Warn("start actor failed; retrying", "actor", a, "in", wait, "err", err)
			continue
		}
		p.starting.forget(a)
		p.hmu.Lock()
		p.hosted[a] = true
		p.hmu.Unlock()
		p.log.Info("hosting", "actor", a)
	}
}

// campaign runs for leader with the node's current lease, leads while it
// can, and runs again (on a new lease if the old one was lost).
func (p *Placement) campaign(ctx context.Context) {
	defer p.wg.Done()
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		lease, _, changed := p.reg.Lease()
		err := p.campaignOnce(ctx, lease, changed)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			p.log.Debug("campaign ended", "err", err)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			backoff = min(backoff*2, 2*time.Second)
		} else {
			backoff = 100 * time.Millisecond
		}
	}
}

func (p *Placement) campaignOnce(ctx context.Context, lease clientv3.LeaseID, changed <-chan struct{}) error {
	// The session shares the node's lease: a node that dies loses its
	// registrations and its leadership together. Orphan (not Close) ends
	// it, because the Registrar owns the lease.
	sess, err := concurrency.NewSession(p.reg.Client(), concurrency.WithLease(lease), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("session: %w", err)
	}
	defer sess.Orphan()
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.Done():
		case <-changed:
		case <-cctx.Done():
		}
		cancel()
	}()
	el := concurrency.NewElection(sess, p.keys.Election(p.cfg.Group))
	if err := el.Campaign(cctx, p.reg.NodeID()); err != nil {
		return fmt.Errorf("campaign: %w", err)
	}
	// Campaign can return after the session's lease expired: check that
	// the key is still there before acting as leader.
	resp, err := p.reg.Client().Get(cctx, el.Key())
	if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != el.Rev() {
		return fmt.Errorf("elected, but the election key %s is gone", el.Key())
	}
	p.cfg.Metrics.Elected.Inc()
	p.epoch.Store(el.Rev())
	p.log.Info("placement leader", "epoch", el.Rev(), "key", el.Key())
	err = p.lead(cctx, el.Key(), el.Rev())
	p.epoch.Store(0)
	if cctx.Err() != nil {
		// Shutdown, a new lease or the session's end: the key goes (or
		// went) with the lease; nothing to hand on.
		return err
	}
	switch {
	case errors.Is(err, ErrNotLeader):
		p.log.Warn("deposed", "epoch", el.Rev(), "err", err)
	case errors.Is(err, placement.ErrFenced):
		// Still elected, yet the placement journal has seen a later
		// epoch: etcd's revisions went back (restored from a backup, or
		// wiped, while the NATS journal was kept). No node can lead until
		// they pass the journal's epoch.
		p.log.Error("placement leadership refused by the journal: etcd's revision is behind the journal's epoch (etcd restored or wiped while the journal was kept?); handing leadership on",
			"epoch", el.Rev(), "err", err)
	default:
		p.log.Warn("placement leader cannot reconcile, handing leadership on", "epoch", el.Rev(), "err", err)
	}
	{
		// Orphan leaves the election key on the node's lease, and the
		// next Campaign on that lease would find it and win again at
		// once: a leader that cannot lead would keep the group for
		// good. Resigning deletes it, so another node may win.
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if rerr := el.Resign(rctx); rerr != nil {
			p.log.Debug("resign", "err", rerr)
		}
		rcancel()
	}
	return err
}

// maxReconcileFailures is how many reconciles in a row a leader may fail
// (its journal unreachable, say) before it hands leadership on: another
// node may reach what this one cannot. A leader also hands it on once its
// reconciles have failed for two lease TTLs, each bounded by one: a
// journal that does not answer made every reconcile wait for the actor
// host's request timeout (30 s), and a leader that could not place
// anything kept leading for four minutes.
const maxReconcileFailures = 8

// lead reconciles until leadership ends.
func (p *Placement) lead(ctx context.Context, key string, epoch int64) error {
	cc := CacheConfig{Logger: p.cfg.Logger, Metrics: p.cfg.Metrics}
	nodes := NewCache(p.reg.Client(), p.keys.Nodes(), func() *triplanev1.NodeRegistration { return &triplanev1.NodeRegistration{} }, cc)
	defer nodes.Close()
	wants := NewCache(p.reg.Client(), p.keys.Wants(p.cfg.Group), func() *triplanev1.PlacementWant { return &triplanev1.PlacementWant{} }, cc)
	defer wants.Close()
	if err := nodes.WaitReady(ctx); err != nil {
		return err
	}
	if err := wants.WaitReady(ctx); err != nil {
		return err
	}
	if err := p.assigns.WaitReady(ctx); err != nil {
		return err
	}
	nodesChanged, stop1 := nodes.Notify()
	defer stop1()
	wantsChanged, stop2 := wants.Notify()
	defer stop2()
	assignsChanged, stop3 := p.assigns.Notify()
	defer stop3()
	tick := time.NewTicker(p.cfg.Resync)
	defer tick.Stop()
	backoff := 50 * time.Millisecond
	failures := 0
	var failingSince time.Time
	ttl := p.reg.TTL()
	for {
		began := time.Now()
		rctx, cancel := context.WithTimeout(ctx, ttl)
		err := p.reconcile(rctx, key, epoch, nodes, wants)
		cancel()
		switch {
		case err == nil:
			backoff, failures = 50*time.Millisecond, 0
		case errors.Is(err, ErrNotLeader), errors.Is(err, placement.ErrFenced), ctx.Err() != nil:
			return err
		default:
			if failures++; failures == 1 {
				// From when the first failing reconcile began: one that
				// waits out its TTL counts as failing all along.
				failingSince = began
			}
			if failures == maxReconcileFailures || time.Since(failingSince) >= 2*ttl {
				return fmt.Errorf("%d reconciles failed in a row over %s: %w", failures, time.Since(failingSince).Round(time.Millisecond), err)
			}
			p.log.Warn("reconcile failed, retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return ctx.Err()
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-nodesChanged:
		case <-wantsChanged:
		case <-assignsChanged:
		case <-tick.C:
		}
	}
}

// reconcile journals the decision for the current view and publishes it.
func (p *Placement) reconcile(ctx context.Context, key string, epoch int64, nodes *Cache[*triplanev1.NodeRegistration], wants *Cache[*triplanev1.PlacementWant]) error {
	cmd := &triplanev1.PlacementReconcile{Epoch: epoch, Leader: p.reg.NodeID()}
	ns, _ := nodes.List()
	for _, it := range ns {
		r := it.Value
		if slices.Contains(r.PlacementGroups, p.cfg.Group) && r.GetNode().GetHealth().GetState() == triplanev1.HealthState_HEALTH_STATE_READY {
			cmd.Nodes = append(cmd.Nodes, lastSegment(it.Key))
		}
	}
	ws, _ := wants.List()
	for _, it := range ws {
		if a := it.Value.GetActor(); a.GetKind() != "" && a.GetId() != "" {
			cmd.Actors = append(cmd.Actors, a)
		}
	}
	reply, err := p.cfg.Host.Request(ctx, actors.Address{Kind: placement.Kind, ID: p.cfg.Group}, cmd)
	if err != nil {
		return fmt.Errorf("control: placement actor: %w", err)
	}
	return p.publish(ctx, key, epoch, reply.(*triplanev1.PlacementState))
}

// publish makes the assign keys match the state, in transactions fenced on
// the leader key's create revision.
func (p *Placement) publish(ctx context.Context, key string, epoch int64, s *triplanev1.PlacementState) error {
	var ops []clientv3.Op
	keep := map[string]bool{}
	for _, a := range s.Assignments {
		if a.NodeId == "" {
			continue
		}
		k := p.keys.Assign(p.cfg.Group, a.Actor.Kind, a.Actor.Id)
		keep[k] = true
		if it, ok := p.assigns.Get(k); ok && it.Value.NodeId == a.NodeId && it.Value.Epoch == a.Epoch {
			continue
		}
		rec := &triplanev1.PlacementRecord{Actor: a.Actor, NodeId: a.NodeId, Epoch: a.Epoch, Leader: s.Leader, Reason: a.Reason,
			DecidedUnixNanos: p.cfg.Now().UnixNano()}
		b, _ := marshal.Marshal(rec)
		ops = append(ops, clientv3.OpPut(k, string(b)))
	}
	items, _ := p.assigns.List()
	for _, it := range items {
		if !keep[it.Key] {
			ops = append(ops, clientv3.OpDelete(it.Key))
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		if err := FencedTxn(ctx, p.reg.Client(), key, epoch, ops[:n]...); err != nil {
			if errors.Is(err, ErrNotLeader) {
				p.cfg.Metrics.FencedWrites.Inc()
			}
			return err
		}
		p.cfg.Metrics.PlacementMoves.Add(float64(n))
		ops = ops[n:]
	}
	return nil
}

// FencedTxn applies ops only if the election key leaderKey still has the
// create revision epoch: a deposed leader, whose key was deleted (its
// lease expired) or re-created, gets ErrNotLeader and changes nothing.
func FencedTxn(ctx context.Context, cli *clientv3.Client, leaderKey string, epoch int64, ops ...clientv3.Op) error {
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", epoch)).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("control: fenced write: %w", err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: key %s epoch %d", ErrNotLeader, leaderKey, epoch)
	}
	return nil
}

// State asks the placement actor for the group's journaled state (on any
// node with a host: it recovers the actor from the journal). Off the
// leader the actor is released after the answer: the leader appends to
// the journal elsewhere, and a copy kept here would answer the next call
// with what it recovered the first time.
func (p *Placement) State(ctx context.Context) (*triplanev1.PlacementState, error) {
	if p.cfg.Host == nil {
		return nil, errors.New("control: no actor host")
	}
	addr := actors.Address{Kind: placement.Kind, ID: p.cfg.Group}
	r, err := p.cfg.Host.Request(ctx, addr, &triplanev1.PlacementGet{})
	if _, leading := p.Leader(); !leading {
		// Even when ctx ended: the copy must not outlive this read.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if rerr := p.cfg.Host.Release(rctx, addr); rerr != nil {
			p.log.Debug("release the placement actor after a read", "err", rerr)
		}
	}
	if err != nil {
		return nil, err
	}
	return proto.Clone(r).(*triplanev1.PlacementState), nil
}
