package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// EventType says what happened to a key.
type EventType int

// Event types.
const (
	Added EventType = iota + 1
	Updated
	Removed
)

func (t EventType) String() string {
	switch t {
	case Added:
		return "added"
	case Updated:
		return "updated"
	case Removed:
		return "removed"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is a change under a watched prefix. For Removed, Value is the last
// value seen.
type Event[T proto.Message] struct {
	Type  EventType
	Key   string
	Value T
	// Rev is the etcd revision of the change (of the resync for changes a
	// resync found).
	Rev int64
}

// Item is one key of a cache.
type Item[T proto.Message] struct {
	Key    string
	Value  T
	ModRev int64
}

// CacheConfig configures a Cache.
type CacheConfig struct {
	// SubscriberBuffer bounds each subscriber's channel; events that do
	// not fit are dropped and counted (a subscriber can always List).
	// Default 1024.
	SubscriberBuffer int
	// RetryMin and RetryMax bound the backoff between failed lists or
	// watches; defaults 50 ms and 2 s.
	RetryMin, RetryMax time.Duration
	Logger             *slog.Logger
	Metrics            *Metrics
}

// Cache is a watch-backed copy of every key under a prefix, decoded from
// protobuf JSON. The initial list and the watch are joined on the list's
// revision, so no change falls between them; a broken watch resumes from
// the last revision seen, and a full resync (reporting the differences as
// events) follows when etcd compacted past it.
type Cache[T proto.Message] struct {
	cli    *clientv3.Client
	prefix string
	newT   func() T
	check  func(key string, v T) error // nil: every value that decodes
	cfg    CacheConfig
	log    *slog.Logger

	mu      sync.Mutex
	items   map[string]Item[T]
	rev     int64
	subs    map[*subscriber[T]]struct{}
	notes   map[chan struct{}]struct{} // capacity 1 each: coalesced change signals
	ready   chan struct{}
	isReady bool

	cancel context.CancelFunc
	done   chan struct{}
}

type subscriber[T proto.Message] struct{ ch chan Event[T] }

// NewCache starts caching prefix. newT returns an empty message to decode
// into. Stop it with Close.
func NewCache[T proto.Message](cli *clientv3.Client, prefix string, newT func() T, cfg CacheConfig) *Cache[T] {
	return NewCheckedCache(cli, prefix, newT, nil, cfg)
}

// NewCheckedCache is NewCache that also ignores (and counts, as values
// that do not decode) the values check refuses: a record that decodes but
// would mislead its readers.
func NewCheckedCache[T proto.Message](cli *clientv3.Client, prefix string, newT func() T, check func(key string, v T) error, cfg CacheConfig) *Cache[T] {
	if cfg.SubscriberBuffer <= 0 {
		cfg.SubscriberBuffer = 1024
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 50 * time.Millisecond
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cache[T]{cli: cli, prefix: prefix, newT: newT, check: check, cfg: cfg, log: cfg.Logger.With("prefix", prefix),
		items: map[string]Item[T]{}, subs: map[*subscriber[T]]struct{}{},
		notes: map[chan struct{}]struct{}{}, ready: make(chan struct{}), cancel: cancel, done: make(chan struct{})}
	go c.run(ctx)
	return c
}

// Close stops the watch.
func (c *Cache[T]) Close() {
	c.cancel()
	<-c.done
}

// WaitReady waits for the initial list.
func (c *Cache[T]) WaitReady(ctx context.Context) error {
	select {
	case <-c.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("control: cache of %s not ready: %w", c.prefix, ctx.Err())
	}
}

// Notify returns a channel that receives after changes (several changes
// may coalesce into one signal, never lost), and a function to stop it.
// It suits readers that look at List after a change.
func (c *Cache[T]) Notify() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	c.mu.Lock()
	c.notes[ch] = struct{}{}
	c.mu.Unlock()
	return ch, func() {
		c.mu.Lock()
		delete(c.notes, ch)
		c.mu.Unlock()
	}
}

// List returns the cached items sorted by key, and the revision they are
// current at.
func (c *Cache[T]) List() ([]Item[T], int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Item[T], 0, len(c.items))
	for _, k := range slices.Sorted(maps.Keys(c.items)) {
		out = append(out, c.items[k])
	}
	return out, c.rev
}

// Get returns the item at key.
func (c *Cache[T]) Get(key string) (Item[T], bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	it, ok := c.items[key]
	return it, ok
}

// Subscribe returns a channel of every change from now on; cancel stops it.
// A subscriber that falls more than the buffer behind loses events (they
// are counted); List gives the truth at any time.
func (c *Cache[T]) Subscribe() (<-chan Event[T], func()) {
	s := &subscriber[T]{ch: make(chan Event[T], c.cfg.SubscriberBuffer)}
	c.mu.Lock()
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			c.mu.Lock()
			delete(c.subs, s)
			c.mu.Unlock()
		})
	}
}

// emit delivers an event; c.mu is held.
func (c *Cache[T]) emit(ev Event[T]) {
	for s := range c.subs {
		select {
		case s.ch <- ev:
		default:
			c.cfg.Metrics.EventsDropped.Inc()
		}
	}
}

// signal wakes every notifier; c.mu is held.
func (c *Cache[T]) signal() {
	for ch := range c.notes {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Decode reads a value written by the control plane: protobuf JSON of the
// message newT returns. Fields this version does not know are ignored, as
// protobuf means them to be: during a rolling upgrade the newer nodes'
// records (a field added to InstanceInfo, say) stay readable to the older
// ones, which would otherwise see no new workers, or take new nodes for
// gone and move their actors. A value that is not JSON of the message
// (or has a known field of the wrong type) is an error.
func Decode[T proto.Message](b []byte, newT func() T) (T, error) {
	v := newT()
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(b, v); err != nil {
		return v, fmt.Errorf("control: value is not %s protobuf JSON: %w", v.ProtoReflect().Descriptor().FullName(), err)
	}
	return v, nil
}

func (c *Cache[T]) decode(kv *mvccpb.KeyValue) (T, bool) {
	v, err := Decode(kv.Value, c.newT)
	if err == nil && c.check != nil {
		err = c.check(string(kv.Key), v)
	}
	if err != nil {
		c.cfg.Metrics.DecodeErrors.Inc()
		c.log.Warn("ignoring a value that does not decode or is invalid", "key", string(kv.Key), "type", fmt.Sprintf("%T", v), "err", err)
		return v, false
	}
	return v, true
}

// put records a key's new value; c.mu is held.
func (c *Cache[T]) put(kv *mvccpb.KeyValue) {
	v, ok := c.decode(kv)
	if !ok {
		c.del(string(kv.Key), kv.ModRevision)
		return
	}
	key := string(kv.Key)
	old, had := c.items[key]
	c.items[key] = Item[T]{Key: key, Value: v, ModRev: kv.ModRevision}
	switch {
	case !had:
		c.emit(Event[T]{Type: Added, Key: key, Value: v, Rev: kv.ModRevision})
	case old.ModRev != kv.ModRevision:
		c.emit(Event[T]{Type: Updated, Key: key, Value: v, Rev: kv.ModRevision})
	}
}

func (c *Cache[T]) del(key string, rev int64) {
	if old, ok := c.items[key]; ok {
		delete(c.items, key)
		c.emit(Event[T]{Type: Removed, Key: key, Value: old.Value, Rev: rev})
	}
}

// resync lists the prefix and replaces the cache, emitting the differences.
func (c *Cache[T]) resync(ctx context.Context) error {
	resp, err := c.cli.Get(ctx, c.prefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("control: list %s: %w", c.prefix, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		seen[string(kv.Key)] = true
		c.put(kv)
	}
	for _, k := range slices.Sorted(maps.Keys(c.items)) {
		if !seen[k] {
			c.del(k, resp.Header.Revision)
		}
	}
	c.rev = resp.Header.Revision
	if !c.isReady {
		c.isReady = true
		close(c.ready)
	}
	c.signal()
	return nil
}

func (c *Cache[T]) run(ctx context.Context) {
	defer close(c.done)
	needSync := true
	backoff := c.cfg.RetryMin
	wait := func() bool {
		select {
		case <-time.After(backoff):
			backoff = min(backoff*2, c.cfg.RetryMax)
			return true
		case <-ctx.Done():
			return false
		}
	}
	for ctx.Err() == nil {
		if needSync {
			if err := c.resync(ctx); err != nil {
				c.log.Debug("list failed, retrying", "err", err)
				if !wait() {
					return
				}
				continue
			}
			needSync = false
		}
		c.mu.Lock()
		from := c.rev + 1
		c.mu.Unlock()
		// WithRequireLeader ends the watch when its member loses the
		// leader, so a partitioned member cannot hold it silently stale.
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := c.cli.Watch(wctx, c.prefix, clientv3.WithPrefix(), clientv3.WithRev(from), clientv3.WithProgressNotify())
		for resp := range wch {
			if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
				c.cfg.Metrics.WatchResyncs.Inc()
				c.log.Info("etcd compacted past the watch; resyncing", "from", from, "compacted", resp.CompactRevision)
				needSync = true
				break
			}
			if err := resp.Err(); err != nil {
				c.log.Debug("watch broke", "err", err)
				break
			}
			backoff = c.cfg.RetryMin
			c.mu.Lock()
			for _, ev := range resp.Events {
				switch ev.Type {
				case clientv3.EventTypePut:
					c.put(ev.Kv)
				case clientv3.EventTypeDelete:
					c.del(string(ev.Kv.Key), ev.Kv.ModRevision)
				}
				c.rev = ev.Kv.ModRevision
			}
			// Only a progress notification promises that everything up to
			// its header revision was sent; a created response does not.
			if resp.IsProgressNotify() && resp.Header.Revision > c.rev {
				c.rev = resp.Header.Revision
			}
			if len(resp.Events) > 0 {
				c.signal()
			}
			c.mu.Unlock()
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		if !needSync {
			c.cfg.Metrics.WatchResumes.Inc()
		}
		if !wait() {
			return
		}
	}
}
