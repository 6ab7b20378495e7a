package sim

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"time"
)

// Etcd is the simulated control plane: a key space with revisions, leases
// that expire in virtual time unless kept alive, keys deleted with their
// lease, watches delivered after a latency, and transactions that compare a
// key's create revision (what fenced placement writes rely on). Elections
// are built on it as on etcd: the live key with the smallest create
// revision under a prefix leads.
type Etcd struct {
	w      *World
	rev    int64
	kv     map[string]etcdKey
	leases map[int64]*etcdLease
	nextID int64
	// Latency bounds watch delivery; default 1..5 ms.
	MinLatency, MaxLatency time.Duration
	watches                []etcdWatch
	down                   outage // unavailable meanwhile (a leader election)
	// LeaderChanges counts the simulated etcd leader elections.
	LeaderChanges uint64
}

// ErrUnavailable is what a client gets while the simulated etcd elects a
// new leader: the request failed, nothing changed, try again.
var ErrUnavailable = errors.New("sim etcd: no leader (election in progress)")

// LeaderChange makes etcd unavailable for d, as while its members elect a
// new leader. Leases are not lost for it: when service resumes every
// lease gets its full TTL again, as etcd's new leader does.
func (e *Etcd) LeaderChange(d time.Duration) {
	e.LeaderChanges++
	e.down.extend(e.w.Now(), d)
	e.w.Tracef("etcd: leader change, unavailable for %s", d)
	e.w.After(d, func() {
		for _, id := range slices.Sorted(maps.Keys(e.leases)) {
			if l := e.leases[id]; !l.revoked {
				e.KeepAlive(id)
			}
		}
	})
}

func (e *Etcd) available() bool { return !e.down.on(e.w.Now()) }

type etcdKey struct {
	value     string
	createRev int64
	lease     int64
}

type etcdLease struct {
	ttl     time.Duration
	expires time.Time
	revoked bool
	check   func() // revokes the lease if it expired
	timer   bool   // check is scheduled
}

type etcdWatch struct {
	prefix string
	fn     func(key string, deleted bool)
}

// NewEtcd creates a simulated etcd in w.
func NewEtcd(w *World) *Etcd {
	return &Etcd{w: w, kv: map[string]etcdKey{}, leases: map[int64]*etcdLease{},
		MinLatency: time.Millisecond, MaxLatency: 5 * time.Millisecond}
}

// Grant creates a lease of ttl, expiring unless kept alive.
func (e *Etcd) Grant(ttl time.Duration) (int64, error) {
	if !e.available() {
		return 0, ErrUnavailable
	}
	e.nextID++
	id := e.nextID
	e.leases[id] = &etcdLease{ttl: ttl}
	_, _ = e.KeepAlive(id)
	return id, nil
}

// KeepAlive renews a lease; false when it already expired.
func (e *Etcd) KeepAlive(id int64) (bool, error) {
	if !e.available() {
		return false, ErrUnavailable
	}
	l := e.leases[id]
	if l == nil || l.revoked {
		return false, nil
	}
	l.expires = e.w.Now().Add(l.ttl)
	if l.check == nil { // made once per lease: workers keep leases alive every round
		l.check = func() {
			l.timer = false
			switch {
			case l.revoked:
			case e.w.Now().Before(l.expires):
				// Kept alive since the timer was set: wait for the new
				// expiry. One timer per lease, not one per keep-alive (a
				// lease kept alive every round had several pending).
				l.timer = true
				e.w.After(l.expires.Sub(e.w.Now()), l.check)
			case e.available():
				e.revoke(id)
			}
			// Expired while etcd is unavailable: the keep-alive etcd's new
			// leader gives every lease sets the timer again.
		}
	}
	if !l.timer {
		l.timer = true
		e.w.After(l.ttl, l.check)
	}
	return true, nil
}

func (e *Etcd) revoke(id int64) {
	l := e.leases[id]
	if l == nil || l.revoked {
		return
	}
	l.revoked = true
	e.w.Tracef("etcd: lease %d expired", id)
	for _, k := range slices.Sorted(maps.Keys(e.kv)) {
		if e.kv[k].lease == id {
			e.del(k)
		}
	}
}

// Put writes key (attached to lease, 0 for none) and returns the revision.
// A put on an expired lease fails, and so does any put while etcd is
// unavailable.
func (e *Etcd) Put(key, value string, lease int64) (int64, bool) {
	if !e.available() || (lease != 0 && (e.leases[lease] == nil || e.leases[lease].revoked)) {
		return 0, false
	}
	e.rev++
	k, ok := e.kv[key]
	if !ok {
		k.createRev = e.rev
	}
	k.value, k.lease = value, lease
	e.kv[key] = k
	e.notify(key, false)
	return e.rev, true
}

func (e *Etcd) del(key string) {
	if _, ok := e.kv[key]; !ok {
		return
	}
	e.rev++
	delete(e.kv, key)
	e.notify(key, true)
}

// Get reads a key.
func (e *Etcd) Get(key string) (value string, createRev int64, ok bool) {
	k, ok := e.kv[key]
	return k.value, k.createRev, ok
}

// PutIfCreateRev is a fenced write: it puts key only while fence exists
// with createRev (the writer still holds the election key it won with).
func (e *Etcd) PutIfCreateRev(fence string, createRev int64, key, value string) bool {
	if k, ok := e.kv[fence]; !e.available() || !ok || k.createRev != createRev {
		return false
	}
	_, ok := e.Put(key, value, 0)
	return ok
}

// Leader returns the key under prefix with the smallest create revision
// (the election's winner) and that revision.
func (e *Etcd) Leader(prefix string) (string, int64, bool) {
	best, rev := "", int64(0)
	for k, v := range e.kv {
		if strings.HasPrefix(k, prefix) && (best == "" || v.createRev < rev) {
			best, rev = k, v.createRev
		}
	}
	return best, rev, best != ""
}

// Keys lists the keys under prefix, sorted.
func (e *Etcd) Keys(prefix string) []string {
	var out []string
	for k := range e.kv {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// Watch calls fn for every change under prefix, after a latency.
func (e *Etcd) Watch(prefix string, fn func(key string, deleted bool)) {
	e.watches = append(e.watches, etcdWatch{prefix: prefix, fn: fn})
}

func (e *Etcd) notify(key string, deleted bool) {
	for _, wt := range e.watches {
		if strings.HasPrefix(key, wt.prefix) {
			fn := wt.fn
			e.w.After(e.w.Between(e.MinLatency, e.MaxLatency), func() { fn(key, deleted) })
		}
	}
}

// EtcdClient is one node's connection to the simulated etcd: what a
// network partition cuts. While cut (or while etcd elects a leader) every
// request fails with ErrUnavailable, reads included, and watch
// notifications wait; on the heal they are delivered in order, as a
// resumed etcd watch replays what it missed.
type EtcdClient struct {
	e      *Etcd
	name   string
	cutOff outage
	held   []func()
	// DroppedWatch counts notifications lost because more than
	// maxHeldWatch waited for one heal.
	DroppedWatch uint64
}

const maxHeldWatch = 1024

// Client opens a named client connection.
func (e *Etcd) Client(name string) *EtcdClient { return &EtcdClient{e: e, name: name} }

// Partition cuts the client off etcd for d (overlapping partitions: the
// later heal wins).
func (c *EtcdClient) Partition(d time.Duration) {
	w := c.e.w
	c.cutOff.extend(w.Now(), d)
	w.Tracef("etcd: client %s partitioned for %s", c.name, d)
	w.After(d, func() {
		if c.cut() {
			return // a later partition extended it
		}
		w.Tracef("etcd: client %s healed, %d watch notifications delivered", c.name, len(c.held))
		held := c.held
		c.held = nil
		for _, fn := range held {
			fn()
		}
	})
}

func (c *EtcdClient) cut() bool { return c.cutOff.on(c.e.w.Now()) }

func (c *EtcdClient) err() error {
	if c.cut() || !c.e.available() {
		return ErrUnavailable
	}
	return nil
}

// Grant creates a lease.
func (c *EtcdClient) Grant(ttl time.Duration) (int64, error) {
	if err := c.err(); err != nil {
		return 0, err
	}
	return c.e.Grant(ttl)
}

// KeepAlive renews a lease; false when it already expired.
func (c *EtcdClient) KeepAlive(id int64) (bool, error) {
	if err := c.err(); err != nil {
		return false, err
	}
	return c.e.KeepAlive(id)
}

// Put writes a key; false when it failed (cut off, unavailable, lease gone).
func (c *EtcdClient) Put(key, value string, lease int64) (int64, bool) {
	if c.err() != nil {
		return 0, false
	}
	return c.e.Put(key, value, lease)
}

// PutIfCreateRev is a fenced write (Etcd.PutIfCreateRev).
func (c *EtcdClient) PutIfCreateRev(fence string, createRev int64, key, value string) bool {
	return c.err() == nil && c.e.PutIfCreateRev(fence, createRev, key, value)
}

// Get reads a key.
func (c *EtcdClient) Get(key string) (value string, createRev int64, ok bool, err error) {
	if err := c.err(); err != nil {
		return "", 0, false, err
	}
	value, createRev, ok = c.e.Get(key)
	return value, createRev, ok, nil
}

// Leader reads an election's winner (Etcd.Leader).
func (c *EtcdClient) Leader(prefix string) (key string, createRev int64, ok bool, err error) {
	if err := c.err(); err != nil {
		return "", 0, false, err
	}
	key, createRev, ok = c.e.Leader(prefix)
	return key, createRev, ok, nil
}

// Keys lists the keys under prefix, sorted.
func (c *EtcdClient) Keys(prefix string) ([]string, error) {
	if err := c.err(); err != nil {
		return nil, err
	}
	return c.e.Keys(prefix), nil
}

// Watch calls fn for every change under prefix; while the client is cut
// off the notifications wait for the heal.
func (c *EtcdClient) Watch(prefix string, fn func(key string, deleted bool)) {
	c.e.Watch(prefix, func(key string, deleted bool) {
		if c.cut() {
			if len(c.held) >= maxHeldWatch {
				c.DroppedWatch++
				return
			}
			c.held = append(c.held, func() { fn(key, deleted) })
			return
		}
		fn(key, deleted)
	})
}
