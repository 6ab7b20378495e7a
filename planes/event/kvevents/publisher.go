package kvevents

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

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

	mu     sync.Mutex
	last   uint64                // latest event id
	ring   []*triplanev1.KvEvent // ring[id % len]
	blocks map[uint64]Block

	serve  *event.Subscription
	cancel context.CancelFunc
	done   chan struct{}
}

// NewPublisher starts answering resend requests and sending heartbeats.
func NewPublisher(b *event.Bus, cfg PublisherConfig) (*Publisher, error) {
	if cfg.Epoch == 0 {
		return nil, errors.New("kvevents: publisher needs an epoch (the worker's start time)")
	}
	if cfg.RingSize <= 0 {
		cfg.RingSize = 4096
	}
	if cfg.MaxResend <= 0 {
		cfg.MaxResend = 1024
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
	p := &Publisher{b: b, cfg: cfg, subject: subject, ring: make([]*triplanev1.KvEvent, cfg.RingSize),
		blocks: map[uint64]Block{}, done: make(chan struct{})}
	p.serve, err = event.Serve(b, resend, "", p.resend)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go p.heartbeats(ctx)
	return p, nil
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
		hb := &triplanev1.KvEventBatch{WorkerId: p.cfg.WorkerID, Epoch: p.cfg.Epoch, HeadEventId: p.last}
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

// publish numbers e, applies it to the mirror, keeps it in the ring and
// sends it. A send that fails (a disconnect, say) leaves the event in the
// ring: consumers repair the gap from there, so the error is for logging.
func (p *Publisher) publish(e *triplanev1.KvEvent) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	e.EventId = p.last + 1
	batch := &triplanev1.KvEventBatch{WorkerId: p.cfg.WorkerID, Epoch: p.cfg.Epoch, Events: []*triplanev1.KvEvent{e}, HeadEventId: e.EventId}
	// An event too large to send would also be too large to resend: refuse
	// it before it takes an id (the caller splits it).
	if n, max := proto.Size(batch), p.b.MaxPayload(); int64(n) > max/2 {
		return fmt.Errorf("kvevents: worker %s: %w: an event of %d bytes, more than half the server's max payload of %d bytes; split it",
			p.cfg.WorkerID, event.ErrTooLarge, n, max)
	}
	p.last = e.EventId
	apply(p.blocks, e)
	p.ring[e.EventId%uint64(len(p.ring))] = e
	// Published under the lock so ids go out in order on the connection.
	err := event.Publish(p.b, p.subject, batch)
	if err != nil {
		return fmt.Errorf("kvevents: worker %s event %d: %w", p.cfg.WorkerID, e.EventId, err)
	}
	return nil
}

// LastEventID is the latest event id.
func (p *Publisher) LastEventID() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

// Blocks is a copy of the worker's blocks as its events describe them.
func (p *Publisher) Blocks() map[uint64]Block {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[uint64]Block, len(p.blocks))
	for h, b := range p.blocks {
		out[h] = b
	}
	return out
}

// resend answers a KvResendRequest from the ring, or with a dump when the
// ring no longer holds the start of the range.
func (p *Publisher) resend(_ context.Context, req *triplanev1.KvResendRequest) (*triplanev1.KvResendReply, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	reply := &triplanev1.KvResendReply{WorkerId: p.cfg.WorkerID, Epoch: p.cfg.Epoch}
	from, to := req.GetFromEventId(), min(req.GetToEventId(), p.last)
	if from == 0 {
		from = 1
	}
	oldest := uint64(1)
	if p.last > uint64(len(p.ring)) {
		oldest = p.last - uint64(len(p.ring)) + 1
	}
	if from > to {
		// Nothing newer than the consumer has: an empty range.
		reply.Reply = &triplanev1.KvResendReply_Range{Range: &triplanev1.KvEventRange{}}
		return reply, nil
	}
	if from >= oldest {
		to = min(to, from+uint64(p.cfg.MaxResend)-1)
		r := &triplanev1.KvEventRange{Events: make([]*triplanev1.KvEvent, 0, to-from+1)}
		// Keep the reply within half the max payload; the consumer asks
		// again for the rest. Every event alone is below that (publish).
		budget, size := p.b.MaxPayload()/2, int64(0)
		for id := from; id <= to; id++ {
			e := p.ring[id%uint64(len(p.ring))]
			size += int64(proto.Size(e)) + 8
			if size > budget && len(r.Events) > 0 {
				break
			}
			r.Events = append(r.Events, e)
		}
		reply.Reply = &triplanev1.KvResendReply_Range{Range: r}
		return reply, nil
	}
	d := &triplanev1.KvDump{EventId: p.last, Blocks: make([]*triplanev1.KvDumpBlock, 0, len(p.blocks))}
	for h, b := range p.blocks {
		db := &triplanev1.KvDumpBlock{Hash: h}
		if b.HasParent {
			db.ParentHash = proto.Uint64(b.Parent)
		}
		d.Blocks = append(d.Blocks, db)
	}
	reply.Reply = &triplanev1.KvResendReply_Dump{Dump: d}
	return reply, nil
}
