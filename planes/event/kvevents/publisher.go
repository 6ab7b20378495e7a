package kvevents

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

// PublisherConfig configures a worker's event publisher.
type PublisherConfig struct {
	WorkerID  string
	Namespace string
	// Epoch numbers this run of the worker; it must grow across restarts
	// (the shell passes its start time in Unix nanoseconds). Required.
	Epoch uint64
	// RingSize is how many recent events are kept for resends; default 4096.
	RingSize int
	// MaxResend bounds the events in one resend reply; the consumer asks
	// again for the rest. Default 1024.
	MaxResend int
	// HeartbeatInterval between heartbeats carrying the latest event id;
	// default 1 s.
	HeartbeatInterval time.Duration
	// Subject overrides the events subject (tests route it through a lossy
	// relay).
	Subject string
}

// Publisher numbers, publishes and remembers one worker's KV events.
type Publisher struct {
	b       *event.Bus
	cfg     PublisherConfig
	subject string

	mu  sync.Mutex
	log *Log

	serve  *event.Subscription
	cancel context.CancelFunc
	done   chan struct{}
}

// NewPublisher starts answering resend requests and sending heartbeats.
func NewPublisher(b *event.Bus, cfg PublisherConfig) (*Publisher, error) {
	if cfg.Epoch == 0 {
		return nil, errors.New("kvevents: publisher needs an epoch (the worker's start time)")
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = time.Second
	}
	subject := cfg.Subject
	if subject == "" {
		s, err := EventsSubject(b, cfg.Namespace, cfg.WorkerID)
		if err != nil {
			return nil, err
		}
		subject = s
	}
	resend, err := ResendSubject(b, cfg.Namespace, cfg.WorkerID)
	if err != nil {
		return nil, err
	}
	p := &Publisher{b: b, cfg: cfg, subject: subject, log: NewLog(cfg.WorkerID, cfg.Epoch, cfg.RingSize, cfg.MaxResend, nil),
		done: make(chan struct{})}
	p.log.SetDumpIdleHeartbeats(dumpIdleFor(cfg.HeartbeatInterval))
	p.serve, err = event.Serve(b, resend, "", p.resend)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go p.heartbeats(ctx)
	return p, nil
}

// dumpKeep is how long a frozen dump outlives its last page at least, in
// a Publisher: well above a router's repair timeout plus backoff (2.1 s by
// default), so a router retrying a lost page finds the copy however short
// the heartbeat interval (the Log counts heartbeats, not time).
const dumpKeep = 10 * time.Second

// dumpIdleFor is the heartbeat without a page that drops the frozen dump,
// at heartbeat interval every: at least dumpKeep, and never fewer
// heartbeats than the Log's default.
func dumpIdleFor(every time.Duration) int {
	n := (dumpKeep + every - 1) / every // intervals in dumpKeep, rounded up
	// The copy outlives its last page by at least n-1 intervals: one more.
	return max(dumpIdleHeartbeats, int(n)+1)
}

// Close stops the heartbeats and the resend responder.
func (p *Publisher) Close() {
	p.cancel()
	<-p.done
	_ = p.serve.Unsubscribe()
}

func (p *Publisher) heartbeats(ctx context.Context) {
	defer close(p.done)
	t := time.NewTicker(p.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.mu.Lock()
		hb := p.log.Heartbeat()
		p.mu.Unlock()
		if err := event.Publish(p.b, p.subject, hb); err != nil {
			p.b.Logger().Debug("kv heartbeat not sent", "worker", p.cfg.WorkerID, "err", err)
		}
	}
}

// Stored announces blocks stored, in prefix order; parent is the first
// block's parent (nil at the start of a prompt).
func (p *Publisher) Stored(hashes []uint64, parent *uint64) error {
	return p.publish(&triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{BlockHashes: hashes, ParentHash: parent}}})
}

// Removed announces blocks evicted.
func (p *Publisher) Removed(hashes []uint64) error {
	return p.publish(&triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: hashes}}})
}

// Cleared announces the whole cache dropped.
func (p *Publisher) Cleared() error {
	return p.publish(&triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}})
}

// publish numbers, keeps and sends one event, as PublishAll does.
func (p *Publisher) publish(e *triplanev1.KvEvent) error {
	return p.PublishAll([]*triplanev1.KvEvent{e})
}

// PublishAll numbers events (as from FromEngine: an engine iteration's),
// applies them to the mirror, keeps them in the ring and sends them as few
// batches as fit in half the server's max payload: usually one message for
// the iteration rather than one per event, each costing every router a
// delivery. An event over half the max payload (a long run of blocks
// against a small server limit) is split into consecutive events with the
// same effect until each fits: an event too large to send would also be
// too large to resend, and refusing it would lose its blocks (and the
// iteration's other events with it) without a gap for routers to repair.
// Only an event that cannot be split (one block, or a clear, over the
// limit) refuses the slice, before any of it is numbered, with an error
// wrapping event.ErrTooLarge. A send that fails (a disconnect, say) leaves
// its events in the ring: consumers repair the gap from there, so that
// error is for logging; the batches after it are still sent. The caller's
// slice is not changed.
func (p *Publisher) PublishAll(events []*triplanev1.KvEvent) error {
	if len(events) == 0 {
		return nil // an iteration that changed no block
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	maxPayload := p.b.MaxPayload()
	// Every event is checked (and split) before any takes an id, so a
	// refused slice leaves no hole in the numbering.
	copied := false
	for i := 0; i < len(events); {
		e, id := events[i], p.log.Last()+1+uint64(i)
		if fitsSurely(events[i:i+1], int(maxPayload/2)-p.log.headerSize(id)) {
			i++ // sized exactly only near the limit
			continue
		}
		n := p.log.sizeAlone(e, id)
		if int64(n) <= maxPayload/2 {
			i++
			continue
		}
		first, second, ok := halves(e)
		if !ok {
			return fmt.Errorf("kvevents: worker %s: %w: an event of %d bytes that cannot be split, more than half the server's max payload of %d bytes",
				p.cfg.WorkerID, event.ErrTooLarge, n, maxPayload)
		}
		if !copied {
			events, copied = slices.Clone(events), true
		}
		events = slices.Replace(events, i, i+1, first, second)
	}
	var errs []error
	for _, b := range p.log.AppendAll(events, int(maxPayload/2)) {
		// Published under the lock so ids go out in order on the
		// connection.
		if err := event.Publish(p.b, p.subject, b); err != nil {
			errs = append(errs, fmt.Errorf("kvevents: worker %s events %d..%d: %w",
				p.cfg.WorkerID, b.Events[0].EventId, b.HeadEventId, err))
		}
	}
	return errors.Join(errs...)
}

// LastEventID is the latest event id.
func (p *Publisher) LastEventID() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.Last()
}

// Blocks is a copy of the worker's blocks as its events describe them.
func (p *Publisher) Blocks() map[uint64]Block {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.Blocks()
}

// resend answers a KvResendRequest from the ring, or with a dump (a page
// of it, to a router that takes pages) when the ring no longer holds the
// start of the range.
func (p *Publisher) resend(_ context.Context, req *triplanev1.KvResendRequest) (*triplanev1.KvResendReply, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	// Keep the reply within half the max payload; the consumer asks again
	// for the rest (events, or a dump's next page). Every event alone is
	// below that (publish).
	return p.log.Resend(req, p.b.MaxPayload()/2), nil
}

// halves splits a stored or removed event of two blocks or more into two
// consecutive events with the same effect: a stored chain's second half
// has the first half's last block as its parent. ok is false for anything
// else. The halves carry the blocks only: fields this code does not know
// (an event made by newer code) are not split along and are dropped,
// which consumers of this version would ignore anyway. The halves share
// e's hashes, and e itself takes no id.
func halves(e *triplanev1.KvEvent) (first, second *triplanev1.KvEvent, ok bool) {
	switch k := e.Kind.(type) {
	case *triplanev1.KvEvent_Stored:
		h := k.Stored.GetBlockHashes()
		if len(h) < 2 {
			return nil, nil, false
		}
		m := len(h) / 2
		parent := h[m-1]
		first = &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{
			BlockHashes: h[:m:m], ParentHash: k.Stored.ParentHash}}}
		second = &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Stored{Stored: &triplanev1.KvBlocksStored{
			BlockHashes: h[m:], ParentHash: &parent}}}
		return first, second, true
	case *triplanev1.KvEvent_Removed:
		h := k.Removed.GetBlockHashes()
		if len(h) < 2 {
			return nil, nil, false
		}
		m := len(h) / 2
		first = &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: h[:m:m]}}}
		second = &triplanev1.KvEvent{Kind: &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: h[m:]}}}
		return first, second, true
	}
	return nil, nil, false
}
