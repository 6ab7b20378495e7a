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
	down                   time.Time // unavailable until then (a leader election)
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
	e.down = e.w.Now().Add(d)
	e.w.Tracef("etcd: leader change, unavailable for %s", d)
	e.w.After(d, func() {
		for _, id := range slices.Sorted(maps.Keys(e.leases)) {
			if l := e.leases[id]; !l.revoked {
				e.KeepAlive(id)
			}
		}
	})
}

func (e *Etcd) available() bool { return !e.w.Now().Before(e.down) }

type etcdKey struct {
	value             string
	createRev, modRev int64
	lease             int64
}

type etcdLease struct {
	ttl     time.Duration
	expires time.Time
	revoked bool
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
	e.w.After(l.ttl, func() {
		if !l.revoked && !e.w.Now().Before(l.expires) && e.available() {
			e.revoke(id)
		}
	})
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
	k.value, k.modRev, k.lease = value, e.rev, lease
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
			d := e.MinLatency
			if span := int64(e.MaxLatency - e.MinLatency); span > 0 {
				d += time.Duration(e.w.Rand().Int64N(span + 1))
			}
			fn := wt.fn
			e.w.After(d, func() { fn(key, deleted) })
		}
	}
}
