package event

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// LoadSubject is where instances of a component publish load reports:
// <prefix>.<namespace>.<component>.load. component "*" subscribes to every
// component of the namespace.
func (b *Bus) LoadSubject(namespace, component string) (string, error) {
	if component == "*" {
		if err := checkToken(namespace); err != nil {
			return "", fmt.Errorf("event: load subject: %w", err)
		}
		return b.cfg.Prefix + "." + namespace + ".*.load", nil
	}
	return b.Subject(namespace, component, "load")
}

// ReportLoad publishes report() on subject at once and then every interval
// until ctx ends. It numbers the reports (seq) and stamps them (sent_at).
// Publish errors are logged and the loop goes on: a missed report only
// makes the instance look stale for a while.
func ReportLoad(ctx context.Context, b *Bus, subject string, interval time.Duration, report func() *triplanev1.LoadReport) error {
	if interval <= 0 {
		return fmt.Errorf("event: load report interval %s must be positive", interval)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var seq uint64
	for {
		r := report()
		seq++
		r.Seq = seq
		r.SentAt = timestamppb.Now()
		if err := Publish(b, subject, r); err != nil {
			b.log.Warn("load report not sent", "subject", subject, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// LoadSource serves the latest load of every live instance; the control
// plane's load balancers read it.
type LoadSource interface {
	// Loads maps instance id to its latest report. The reports are the
	// caller's to keep.
	Loads() map[string]*triplanev1.LoadReport
}

// AggregatorConfig configures a LoadAggregator.
type AggregatorConfig struct {
	// TTL: an instance with no report for this long is dropped; default
	// 3 report intervals of 1 s, i.e. 3 s.
	TTL time.Duration
	// MaxInstances bounds the instances kept; when full, the least recently
	// heard one makes room. Default 10000.
	MaxInstances int
	// Now is the clock (tests pass a fake one); default time.Now.
	Now func() time.Time
}

type loadEntry struct {
	r    *triplanev1.LoadReport
	seen time.Time
}

// LoadAggregator keeps the latest load report of every instance heard on a
// subject and ages out the silent ones.
type LoadAggregator struct {
	cfg     AggregatorConfig
	sub     *Subscription
	mu      sync.Mutex
	latest  map[string]loadEntry
	evicted uint64
	// view is what Latest returns, shared (read-only) until a report is
	// kept or dropped: routers ask once per request, reports change a few
	// times a second.
	view map[string]*triplanev1.LoadReport
	// oldest is no later than any kept report's seen (zero: unknown), so a
	// sweep before oldest+TTL has nothing to drop.
	oldest time.Time
}

var _ LoadSource = (*LoadAggregator)(nil)

// NewLoadAggregator subscribes to subject (usually LoadSubject(ns, "*")).
func NewLoadAggregator(b *Bus, subject string, cfg AggregatorConfig) (*LoadAggregator, error) {
	a := NewLoadView(cfg)
	sub, err := Subscribe(b, subject, a.Observe)
	if err != nil {
		return nil, err
	}
	a.sub = sub
	return a, nil
}

// NewLoadView is a LoadAggregator fed only by Observe, with no
// subscription: for an in-process reporter, or the simulator's routing
// shell (with its virtual clock as Now).
func NewLoadView(cfg AggregatorConfig) *LoadAggregator {
	if cfg.TTL <= 0 {
		cfg.TTL = 3 * time.Second
	}
	if cfg.MaxInstances <= 0 {
		cfg.MaxInstances = 10000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &LoadAggregator{cfg: cfg, latest: map[string]loadEntry{}}
}

// Observe records a report; the subscription calls it, and so can a test
// or an in-process reporter.
func (a *LoadAggregator) Observe(r *triplanev1.LoadReport) {
	if r.GetInstanceId() == "" {
		return
	}
	now := a.cfg.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if prev, ok := a.latest[r.InstanceId]; ok {
		// Reports of one reporter arrive in order over one connection; a
		// lower seq is a restarted reporter unless it is older than the
		// one kept.
		if r.Seq <= prev.r.Seq && !r.GetSentAt().AsTime().After(prev.r.GetSentAt().AsTime()) {
			return
		}
	} else if len(a.latest) >= a.cfg.MaxInstances {
		a.sweepLocked(now)
		if len(a.latest) >= a.cfg.MaxInstances {
			var oldest string
			var at time.Time
			for id, e := range a.latest {
				if oldest == "" || e.seen.Before(at) {
					oldest, at = id, e.seen
				}
			}
			delete(a.latest, oldest)
			a.evicted++
		}
	}
	a.latest[r.InstanceId] = loadEntry{r: r, seen: now}
	a.view = nil
	if a.oldest.IsZero() || now.Before(a.oldest) {
		a.oldest = now
	}
}

func (a *LoadAggregator) sweepLocked(now time.Time) {
	if !a.oldest.IsZero() && now.Sub(a.oldest) <= a.cfg.TTL {
		return // nothing kept is older than oldest
	}
	var oldest time.Time
	for id, e := range a.latest {
		if now.Sub(e.seen) > a.cfg.TTL {
			delete(a.latest, id)
			a.evicted++
			a.view = nil
		} else if oldest.IsZero() || e.seen.Before(oldest) {
			oldest = e.seen
		}
	}
	a.oldest = oldest
}

// Loads returns the latest report of every instance heard within the TTL.
func (a *LoadAggregator) Loads() map[string]*triplanev1.LoadReport {
	latest := a.Latest()
	out := make(map[string]*triplanev1.LoadReport, len(latest))
	for id, r := range latest {
		out[id] = proto.Clone(r).(*triplanev1.LoadReport)
	}
	return out
}

// Latest is Loads without copying: the map and the reports must be read
// only. A kept report is never changed (a newer one replaces it), and the
// map is shared by the calls until the reports kept change (a new map
// then): routers call it once per request.
func (a *LoadAggregator) Latest() map[string]*triplanev1.LoadReport {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sweepLocked(a.cfg.Now())
	if a.view == nil {
		a.view = make(map[string]*triplanev1.LoadReport, len(a.latest))
		for id, e := range a.latest {
			a.view[id] = e.r
		}
	}
	return a.view
}

// Evicted counts instances dropped for silence or for room.
func (a *LoadAggregator) Evicted() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.evicted
}

// Close stops listening.
func (a *LoadAggregator) Close() error {
	if a.sub == nil {
		return nil
	}
	return a.sub.Unsubscribe()
}
