package control

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// ErrNoInstance: no instance is available to pick.
var ErrNoInstance = errors.New("control: no available instance")

// DiscoveryConfig configures a Discovery.
type DiscoveryConfig struct {
	Namespace, Component, Endpoint string
	// DownGrace is how long an instance reported down is skipped; default
	// 5 s.
	DownGrace time.Duration
	Cache     CacheConfig
	Now       func() time.Time
}

// Discovery is the client side of one component's endpoint: a watch-backed
// cache of its instances, local down reports, and picking.
type Discovery struct {
	cfg   DiscoveryConfig
	cache *Cache[*triplanev1.InstanceInfo]

	mu   sync.Mutex
	down map[string]time.Time // instance key -> until
}

// NewDiscovery starts watching the instances of component/endpoint (every
// endpoint of the component if Endpoint is empty). Close stops it.
func NewDiscovery(cli *clientv3.Client, cfg DiscoveryConfig) (*Discovery, error) {
	if err := CheckName("namespace", cfg.Namespace); err != nil {
		return nil, err
	}
	if err := CheckName("component", cfg.Component); err != nil {
		return nil, err
	}
	if cfg.Endpoint != "" {
		if err := CheckName("endpoint", cfg.Endpoint); err != nil {
			return nil, err
		}
	}
	if cfg.DownGrace == 0 {
		cfg.DownGrace = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	keys := Keys{cfg.Namespace}
	d := &Discovery{cfg: cfg, down: map[string]time.Time{}}
	d.cache = NewCheckedCache(cli, keys.Instances(cfg.Component, cfg.Endpoint),
		func() *triplanev1.InstanceInfo { return &triplanev1.InstanceInfo{} }, keys.checkInstance, cfg.Cache)
	return d, nil
}

// checkInstance refuses a record whose fields do not name its own key: an
// empty or repeated instance id would be a routing candidate no router
// accepts (and would fail every decision), and ReportDown finds an
// instance by the key its fields name.
func (k Keys) checkInstance(key string, in *triplanev1.InstanceInfo) error {
	if err := CheckName("instance id", in.GetInstanceId()); err != nil {
		return err
	}
	if want := k.Instance(in.GetComponent(), in.GetEndpoint(), in.GetInstanceId()); key != want {
		return fmt.Errorf("control: instance %q of %s/%s is stored under %s, not %s", in.GetInstanceId(), in.GetComponent(), in.GetEndpoint(), key, want)
	}
	return nil
}

// Close stops the watch.
func (d *Discovery) Close() { d.cache.Close() }

// WaitReady waits for the initial list.
func (d *Discovery) WaitReady(ctx context.Context) error { return d.cache.WaitReady(ctx) }

// Subscribe streams Added, Updated and Removed events.
func (d *Discovery) Subscribe() (<-chan Event[*triplanev1.InstanceInfo], func()) {
	return d.cache.Subscribe()
}

// Instances returns every registered instance, whatever its health.
func (d *Discovery) Instances() []*triplanev1.InstanceInfo {
	items, _ := d.cache.List()
	out := make([]*triplanev1.InstanceInfo, len(items))
	for i, it := range items {
		out[i] = it.Value
	}
	return out
}

// Has reports whether the instance with id is registered, whatever its
// health: a key lookup when the discovery follows one endpoint, a scan
// when it follows a whole component.
func (d *Discovery) Has(id string) bool {
	if d.cfg.Endpoint != "" {
		_, ok := d.cache.Get(Keys{d.cfg.Namespace}.Instance(d.cfg.Component, d.cfg.Endpoint, id))
		return ok
	}
	items, _ := d.cache.List()
	for _, it := range items {
		if it.Value.GetInstanceId() == id {
			return true
		}
	}
	return false
}

// Available returns the instances that are ready and not reported down,
// sorted by key.
func (d *Discovery) Available() []*triplanev1.InstanceInfo {
	items, _ := d.cache.List()
	now := d.cfg.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	// Forget reports of instances discovery removed (bounded by the cache)
	// and reports whose grace ran out.
	for k, until := range d.down {
		if _, ok := d.cache.Get(k); !ok || !now.Before(until) {
			delete(d.down, k)
		}
	}
	out := make([]*triplanev1.InstanceInfo, 0, len(items))
	for _, it := range items {
		if it.Value.GetHealth().GetState() != triplanev1.HealthState_HEALTH_STATE_READY {
			continue
		}
		if _, isDown := d.down[it.Key]; isDown {
			continue
		}
		out = append(out, it.Value)
	}
	return out
}

// ReportDown marks an instance as down locally (for example after a failed
// call): it is skipped for the grace period, then restored unless discovery
// removed it meanwhile.
func (d *Discovery) ReportDown(in *triplanev1.InstanceInfo) {
	key := Keys{d.cfg.Namespace}.Instance(in.GetComponent(), in.GetEndpoint(), in.GetInstanceId())
	if _, ok := d.cache.Get(key); !ok {
		return
	}
	d.mu.Lock()
	d.down[key] = d.cfg.Now().Add(d.cfg.DownGrace)
	d.mu.Unlock()
}

// Pick chooses an available instance with p.
func (d *Discovery) Pick(req PickRequest, p Picker) (*triplanev1.InstanceInfo, error) {
	c := d.Available()
	if len(c) == 0 {
		return nil, fmt.Errorf("%w for %s/%s", ErrNoInstance, d.cfg.Component, d.cfg.Endpoint)
	}
	return p.Pick(req, c)
}

// PickRequest is what a picker may look at. Simple pickers ignore it; a KV
// router uses the prompt's block hashes to find the instance holding the
// longest cached prefix.
type PickRequest struct {
	// BlockHashes are the chained KV-block hashes of the prompt.
	BlockHashes []uint64
	// Tokens is the prompt length in tokens.
	Tokens int
}

// Picker chooses one of the candidates (never empty, sorted by key). The
// KV router plugs in here by implementing Picker over its index.
type Picker interface {
	Pick(req PickRequest, candidates []*triplanev1.InstanceInfo) (*triplanev1.InstanceInfo, error)
}

// RoundRobin picks the candidates in turn.
type RoundRobin struct{ n atomic.Uint64 }

// Pick implements Picker.
func (r *RoundRobin) Pick(_ PickRequest, c []*triplanev1.InstanceInfo) (*triplanev1.InstanceInfo, error) {
	return c[(r.n.Add(1)-1)%uint64(len(c))], nil
}

// Random picks uniformly.
type Random struct {
	mu  sync.Mutex
	rng *rand.Rand
}

// NewRandom returns a Random picker seeded with seed.
func NewRandom(seed uint64) *Random {
	return &Random{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Pick implements Picker.
func (r *Random) Pick(_ PickRequest, c []*triplanev1.InstanceInfo) (*triplanev1.InstanceInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return c[r.rng.IntN(len(c))], nil
}

// LoadSource reports an instance's current load (for example from the
// event plane's load metrics); ok is false when it has no report.
type LoadSource interface {
	Load(instanceID string) (load float64, ok bool)
}

// LoadFunc adapts a function to LoadSource.
type LoadFunc func(instanceID string) (float64, bool)

// Load implements LoadSource.
func (f LoadFunc) Load(id string) (float64, bool) { return f(id) }

// LeastLoaded picks the candidate with the lowest reported load; instances
// without a report count as idle, and ties go round-robin so equal loads
// spread.
type LeastLoaded struct {
	Source LoadSource
	n      atomic.Uint64
}

// Pick implements Picker.
func (l *LeastLoaded) Pick(_ PickRequest, c []*triplanev1.InstanceInfo) (*triplanev1.InstanceInfo, error) {
	start := int(l.n.Add(1) % uint64(len(c)))
	var best *triplanev1.InstanceInfo
	bestLoad := 0.0
	for i := range c {
		in := c[(start+i)%len(c)]
		load, ok := l.Source.Load(in.InstanceId)
		if !ok {
			load = 0
		}
		if best == nil || load < bestLoad {
			best, bestLoad = in, load
		}
	}
	return best, nil
}
