package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// DefaultTTL is the lease TTL when none is configured.
const DefaultTTL = 10 * time.Second

// maxTxnOps stays under etcd's default --max-txn-ops of 128.
const maxTxnOps = 100

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	Client    *clientv3.Client
	Namespace string
	// Node describes this node; its identity's node_id is required.
	Node *triplanev1.NodeInfo
	// PlacementGroups the node can host actors of.
	PlacementGroups []string
	// TTL of the node's lease, whole seconds (rounded up), default 10 s.
	// The client sends keepalives every TTL/3.
	TTL time.Duration
	// RetryMin and RetryMax bound the backoff between attempts to get a new
	// lease after losing one; defaults 100 ms and TTL/3.
	RetryMin, RetryMax time.Duration
	Logger             *slog.Logger
	Metrics            *Metrics
	Now                func() time.Time
}

func (c *RegistrarConfig) defaults() error {
	if c.Client == nil {
		return errors.New("control: registrar needs an etcd client")
	}
	if err := CheckName("namespace", c.Namespace); err != nil {
		return err
	}
	if err := CheckName("node id", c.Node.GetIdentity().GetNodeId()); err != nil {
		return err
	}
	for _, g := range c.PlacementGroups {
		if err := CheckName("placement group", g); err != nil {
			return err
		}
	}
	if c.TTL == 0 {
		c.TTL = DefaultTTL
	}
	if c.TTL < time.Second {
		return fmt.Errorf("control: lease TTL %s is below etcd's 1 s granularity", c.TTL)
	}
	if c.RetryMin == 0 {
		c.RetryMin = 100 * time.Millisecond
	}
	if c.RetryMax == 0 {
		c.RetryMax = max(c.TTL/3, c.RetryMin)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// ttlSeconds rounds the TTL up to etcd's whole seconds.
func (c *RegistrarConfig) ttlSeconds() int64 {
	return int64(math.Ceil(c.TTL.Seconds()))
}

// Registrar keeps a node's registration and its endpoint instances in etcd
// on the node's lease. When the lease is lost it takes a new one and
// registers everything again; it never stops the process.
type Registrar struct {
	cfg  RegistrarConfig
	keys Keys
	log  *slog.Logger

	// wlock orders writes (held: a value in it): a registration made
	// while a new lease is being granted waits for it, so it never lands
	// on the dead lease, and a deregistration cannot fall between a
	// write's copy of the instances and its commit. Waiting for it honours
	// the waiter's context; every write under it is bounded by the TTL.
	wlock   chan struct{}
	mu      sync.Mutex
	lease   clientv3.LeaseID
	gen     uint64
	changed chan struct{} // closed when the lease changes
	// lost is closed when the current lease is found lost (its
	// keepalives ended), before a new one is granted; replaced then.
	lost      chan struct{}
	node      *triplanev1.NodeInfo
	instances map[string]*triplanev1.InstanceInfo // by key
	closed    bool                                // no more registrations
	revoked   bool                                // Close revoked the lease

	cancel context.CancelFunc
	done   chan struct{}
}

var marshal = protojson.MarshalOptions{UseProtoNames: true}

// StartRegistrar grants the node's lease and registers the node; it fails
// if etcd does not answer within ctx. It then keeps the lease alive until
// Close.
func StartRegistrar(ctx context.Context, cfg RegistrarConfig) (*Registrar, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	r := &Registrar{cfg: cfg, keys: Keys{cfg.Namespace}, changed: make(chan struct{}), lost: make(chan struct{}), wlock: make(chan struct{}, 1),
		node:      proto.Clone(cfg.Node).(*triplanev1.NodeInfo),
		instances: map[string]*triplanev1.InstanceInfo{}, done: make(chan struct{}),
		log: cfg.Logger.With("node_id", cfg.Node.GetIdentity().GetNodeId())}
	if r.node.Health == nil {
		r.node.Health = &triplanev1.Health{State: triplanev1.HealthState_HEALTH_STATE_READY, SinceUnixNanos: cfg.Now().UnixNano()}
	}
	if err := r.grant(ctx); err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go r.run(lctx)
	return r, nil
}

// NodeID of the registered node.
func (r *Registrar) NodeID() string { return r.cfg.Node.GetIdentity().GetNodeId() }

// Keys of the registrar's namespace.
func (r *Registrar) Keys() Keys { return r.keys }

// Metrics are the control plane's metrics this registrar counts in; a
// node's other watches (discovery) count in them too.
func (r *Registrar) Metrics() *Metrics { return r.cfg.Metrics }

// Client is the etcd client.
func (r *Registrar) Client() *clientv3.Client { return r.cfg.Client }

// TTL of the lease.
func (r *Registrar) TTL() time.Duration { return time.Duration(r.cfg.ttlSeconds()) * time.Second }

// Lease returns the current lease, its generation (1 for the first) and a
// channel closed when it is replaced.
func (r *Registrar) Lease() (clientv3.LeaseID, uint64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lease, r.gen, r.changed
}

// Held reports whether the current lease is believed alive, and returns a
// channel closed when it is found lost. Between the loss and the next
// grant the node is, for etcd, gone: its registrations expired and a
// placement leader elsewhere may give its actors to other nodes.
func (r *Registrar) Held() (bool, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-r.lost:
		return false, r.changed
	default:
		return true, r.lost
	}
}

// lockWrites takes the write lock, or fails when ctx ends first.
func (r *Registrar) lockWrites(ctx context.Context) error {
	select {
	case r.wlock <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("control: waiting for another etcd write of the registrar: %w", ctx.Err())
	}
}

func (r *Registrar) unlockWrites() { <-r.wlock }

// grant takes a new lease and writes every registration on it.
func (r *Registrar) grant(ctx context.Context) error {
	if err := r.lockWrites(ctx); err != nil {
		return err
	}
	defer r.unlockWrites()
	cli := r.cfg.Client
	lr, err := cli.Grant(ctx, r.cfg.ttlSeconds())
	if err != nil {
		return fmt.Errorf("control: grant a %ds lease: %w", r.cfg.ttlSeconds(), err)
	}
	r.mu.Lock()
	gen := r.gen + 1
	ops := []clientv3.Op{r.nodeOp(lr.ID, gen)}
	for _, k := range slices.Sorted(maps.Keys(r.instances)) {
		ops = append(ops, r.instanceOp(k, r.instances[k], lr.ID))
	}
	r.mu.Unlock()
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		if _, err := cli.Txn(ctx).Then(ops[:n]...).Commit(); err != nil {
			// Best effort, bounded: the lease expires by itself anyway,
			// and a Revoke waiting on an unreachable etcd would hold wlock
			// (and Close) forever.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.RetryMax)
			_, _ = cli.Revoke(rctx, lr.ID)
			cancel()
			return fmt.Errorf("control: register on lease %x: %w", lr.ID, err)
		}
		r.cfg.Metrics.Registrations.Add(float64(n))
		ops = ops[n:]
	}
	r.mu.Lock()
	r.lease, r.gen = lr.ID, gen
	close(r.changed)
	r.changed = make(chan struct{})
	select {
	case <-r.lost:
		r.lost = make(chan struct{})
	default:
	}
	r.mu.Unlock()
	r.cfg.Metrics.LeaseGranted.Inc()
	r.log.Info("registered", "lease", fmt.Sprintf("%x", lr.ID), "ttl_s", lr.TTL, "generation", gen)
	return nil
}

// nodeOp puts the node's registration; r.mu is held.
func (r *Registrar) nodeOp(lease clientv3.LeaseID, gen uint64) clientv3.Op {
	v := &triplanev1.NodeRegistration{Node: r.node, LeaseId: int64(lease), PlacementGroups: r.cfg.PlacementGroups,
		RegisteredUnixNanos: r.cfg.Now().UnixNano(), LeaseGeneration: gen}
	b, _ := marshal.Marshal(v) // a message built here always marshals
	return clientv3.OpPut(r.keys.Node(r.NodeID()), string(b), clientv3.WithLease(lease))
}

func (r *Registrar) instanceOp(key string, in *triplanev1.InstanceInfo, lease clientv3.LeaseID) clientv3.Op {
	in = proto.Clone(in).(*triplanev1.InstanceInfo)
	in.LeaseId = int64(lease)
	in.RegisteredUnixNanos = r.cfg.Now().UnixNano()
	b, _ := marshal.Marshal(in)
	return clientv3.OpPut(key, string(b), clientv3.WithLease(lease))
}

// run keeps the lease alive and replaces it when it is lost.
func (r *Registrar) run(ctx context.Context) {
	defer close(r.done)
	for {
		lease, _, _ := r.Lease()
		// KeepAlive sends a keepalive every TTL/3 and closes its channel
		// when the lease expires, is revoked, or no answer came for a TTL.
		ka, err := r.cfg.Client.KeepAlive(ctx, lease)
		if err == nil {
			for range ka {
			}
		}
		if ctx.Err() != nil {
			return
		}
		r.cfg.Metrics.LeaseLost.Inc()
		r.mu.Lock()
		close(r.lost)
		r.mu.Unlock()
		r.log.Warn("lease lost; the node keeps running and registers again on a new lease", "lease", fmt.Sprintf("%x", lease), "err", err)
		// The old lease may still live if etcd was only unreachable:
		// revoke it so stale keys and election entries go at once.
		rctx, cancel := context.WithTimeout(ctx, r.cfg.RetryMax)
		_, _ = r.cfg.Client.Revoke(rctx, lease)
		cancel()
		backoff := r.cfg.RetryMin
		for {
			gctx, cancel := context.WithTimeout(ctx, r.TTL())
			err := r.grant(gctx)
			cancel()
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			r.cfg.Metrics.GrantFailures.Inc()
			r.log.Warn("cannot register yet, retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			backoff = min(backoff*2, r.cfg.RetryMax)
		}
	}
}

// Register writes (or rewrites) an endpoint instance on the node's lease.
// Its namespace and node id are filled in.
func (r *Registrar) Register(ctx context.Context, in *triplanev1.InstanceInfo) error {
	for _, f := range []struct{ what, v string }{{"component", in.GetComponent()}, {"endpoint", in.GetEndpoint()}, {"instance id", in.GetInstanceId()}} {
		if err := CheckName(f.what, f.v); err != nil {
			return err
		}
	}
	in = proto.Clone(in).(*triplanev1.InstanceInfo)
	in.Namespace = r.cfg.Namespace
	in.NodeId = r.NodeID()
	if in.Health == nil {
		in.Health = &triplanev1.Health{State: triplanev1.HealthState_HEALTH_STATE_READY, SinceUnixNanos: r.cfg.Now().UnixNano()}
	}
	key := r.keys.Instance(in.Component, in.Endpoint, in.InstanceId)
	if err := r.lockWrites(ctx); err != nil {
		return err
	}
	defer r.unlockWrites()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return errors.New("control: registrar closed")
	}
	_, known := r.instances[key]
	r.instances[key] = in
	op := r.instanceOp(key, in, r.lease)
	r.mu.Unlock()
	// Bounded even when ctx is not: the lease's renewal waits for the
	// write lock.
	wctx, cancel := context.WithTimeout(ctx, r.TTL())
	defer cancel()
	if _, err := r.cfg.Client.Do(wctx, op); err != nil {
		if !known {
			// The caller takes the registration for failed: it must not
			// appear later (the next lease writes every instance), and
			// the put may have landed before its answer was lost.
			r.mu.Lock()
			delete(r.instances, key)
			r.mu.Unlock()
			dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.RetryMax)
			_, _ = r.cfg.Client.Delete(dctx, key)
			dcancel()
		}
		return fmt.Errorf("control: register %s: %w", key, err)
	}
	r.cfg.Metrics.Registrations.Inc()
	return nil
}

// Deregister removes an instance.
func (r *Registrar) Deregister(ctx context.Context, component, endpoint, instanceID string) error {
	key := r.keys.Instance(component, endpoint, instanceID)
	// Forgotten first: should the lock or etcd not answer, the next lease
	// must not register it again.
	r.mu.Lock()
	delete(r.instances, key)
	r.mu.Unlock()
	if err := r.lockWrites(ctx); err != nil {
		return err
	}
	defer r.unlockWrites()
	wctx, cancel := context.WithTimeout(ctx, r.TTL())
	defer cancel()
	if _, err := r.cfg.Client.Delete(wctx, key); err != nil {
		return fmt.Errorf("control: deregister %s: %w", key, err)
	}
	return nil
}

// SetHealth sets the health of the node and of every instance it serves.
func (r *Registrar) SetHealth(ctx context.Context, state triplanev1.HealthState, reason string) error {
	h := &triplanev1.Health{State: state, Reason: reason, SinceUnixNanos: r.cfg.Now().UnixNano()}
	if err := r.lockWrites(ctx); err != nil {
		return err
	}
	defer r.unlockWrites()
	ctx, cancel := context.WithTimeout(ctx, r.TTL())
	defer cancel()
	r.mu.Lock()
	r.node.Health = h
	ops := []clientv3.Op{r.nodeOp(r.lease, r.gen)}
	for _, k := range slices.Sorted(maps.Keys(r.instances)) {
		r.instances[k].Health = h
		ops = append(ops, r.instanceOp(k, r.instances[k], r.lease))
	}
	r.mu.Unlock()
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		if _, err := r.cfg.Client.Txn(ctx).Then(ops[:n]...).Commit(); err != nil {
			return fmt.Errorf("control: set health %s: %w", state, err)
		}
		ops = ops[n:]
	}
	return nil
}

// Close stops the keepalives and revokes the lease, so every registration
// (and any election the node takes part in) disappears at once.
func (r *Registrar) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.revoked {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	select {
	case <-r.done:
	case <-ctx.Done():
		// A later Close tries again.
		return fmt.Errorf("control: registrar close: %w", ctx.Err())
	}
	lease, _, _ := r.Lease()
	// Bounded: if etcd is unreachable the lease expires by itself within
	// the TTL, and a stop should not wait longer than that.
	ctx, cancel := context.WithTimeout(ctx, min(r.TTL(), 3*time.Second))
	defer cancel()
	if _, err := r.cfg.Client.Revoke(ctx, lease); err != nil {
		return fmt.Errorf("control: revoke lease %x: %w", lease, err)
	}
	r.mu.Lock()
	r.revoked = true
	r.mu.Unlock()
	return nil
}
