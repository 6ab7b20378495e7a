package kvevents

import (
	"context"
	"sync"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

// ConsumerConfig configures a Consumer.
type ConsumerConfig struct {
	Namespace string
	// Subject overrides the subscribed subject (default: every worker's
	// events subject in the namespace).
	Subject string
	// MaxPending bounds the out-of-order events buffered per worker while a
	// gap is repaired; beyond it they are dropped (and fetched again by the
	// repair). Default 4096.
	MaxPending int
	// MaxWorkers bounds the workers tracked; batches of further workers are
	// dropped and counted. Default 4096.
	MaxWorkers int
	// MaxBlocksPerWorker bounds the blocks kept per worker (default 1<<20,
	// far above any KV pool); more are dropped and counted.
	MaxBlocksPerWorker int
	// RepairTimeout bounds one resend request; default 2 s.
	RepairTimeout time.Duration
	// RepairBackoff is the wait before retrying a failed resend; default
	// 100 ms.
	RepairBackoff time.Duration
	// Repairers is the number of concurrent repairs; default 4.
	Repairers int
	// RepairAttempts is how many failed resend requests in a row a repair
	// makes before it waits for the worker's next batch or heartbeat to
	// start again (a worker that died stops costing requests); default 10.
	RepairAttempts int
	// OnEvent and OnReset, when set, are told every change to the view, in
	// order (the router's index follows them). They run under the
	// consumer's lock: keep them short.
	OnEvent func(worker string, e *triplanev1.KvEvent)
	// Initial, when set, is a saved view (View) restored before the
	// subscription starts, so no batch can race it.
	Initial *triplanev1.KvView
	// OnReset gives the whole view and the id of the last event it
	// reflects (0 after a worker restart).
	OnReset func(worker string, blocks map[uint64]Block, last uint64)
	// Follows: see SequencerConfig (it runs under the consumer's lock).
	Follows func(worker string) bool
}

// Consumer follows every worker's events and keeps each worker's blocks,
// repairing gaps from the workers.
type Consumer struct {
	b      *event.Bus
	cfg    ConsumerConfig
	sub    *event.Subscription
	repair chan string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu  sync.Mutex
	seq *Sequencer
}

// NewConsumer subscribes and starts the repairers.
func NewConsumer(b *event.Bus, cfg ConsumerConfig) (*Consumer, error) {
	if cfg.MaxWorkers <= 0 {
		cfg.MaxWorkers = defaultMaxWorkers // also the repair queue's size (the Sequencer defaults the rest)
	}
	if cfg.RepairTimeout <= 0 {
		cfg.RepairTimeout = 2 * time.Second
	}
	if cfg.RepairBackoff <= 0 {
		cfg.RepairBackoff = 100 * time.Millisecond
	}
	if cfg.Repairers <= 0 {
		cfg.Repairers = 4
	}
	subject := cfg.Subject
	if subject == "" {
		s, err := EventsSubject(b, cfg.Namespace, "*")
		if err != nil {
			return nil, err
		}
		subject = s
	}
	c := &Consumer{b: b, cfg: cfg,
		seq: NewSequencer(SequencerConfig{MaxPending: cfg.MaxPending, MaxWorkers: cfg.MaxWorkers,
			RepairAttempts: cfg.RepairAttempts, MaxBlocksPerWorker: cfg.MaxBlocksPerWorker, OnEvent: cfg.OnEvent, OnReset: cfg.OnReset, Follows: cfg.Follows}),
		// Each worker is queued at most once (the Sequencer reports a gap
		// once per repair), so this never blocks.
		repair: make(chan string, cfg.MaxWorkers)}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	for range cfg.Repairers {
		c.wg.Add(1)
		go c.repairLoop()
	}
	if cfg.Initial != nil {
		c.Restore(cfg.Initial)
	}
	sub, err := event.Subscribe(b, subject, c.Ingest)
	if err != nil {
		c.Close()
		return nil, err
	}
	c.sub = sub
	return c, nil
}

// View returns the consumer's whole view, to be saved (Restore).
func (c *Consumer) View() *triplanev1.KvView {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq.View()
}

// Restore seeds the view of workers not heard of yet from a saved view
// (a restarted router), telling OnReset. Batches that follow continue from
// each worker's saved event id; a worker that restarted since (a newer
// epoch) starts afresh. Invalid entries are skipped and counted as
// malformed.
func (c *Consumer) Restore(view *triplanev1.KvView) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq.Restore(view)
}

// Close stops the subscription and the repairs.
func (c *Consumer) Close() {
	if c.sub != nil {
		_ = c.sub.Unsubscribe()
	}
	c.cancel()
	c.wg.Wait()
}

// Ingest takes one batch, as the subscription delivers it.
func (c *Consumer) Ingest(batch *triplanev1.KvEventBatch) {
	c.mu.Lock()
	repair, err := c.seq.Ingest(batch)
	c.mu.Unlock()
	if err != nil {
		c.b.Logger().Debug("dropping invalid kv event batch", "err", err)
	}
	if repair {
		c.repair <- batch.WorkerId
	}
}

func (c *Consumer) repairLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case w := <-c.repair:
			c.repairOne(w)
		}
	}
}

// repairOne asks the worker for what the view misses, applies the answer
// and queues the worker again while a gap remains.
func (c *Consumer) repairOne(worker string) {
	c.mu.Lock()
	req, epoch, ok := c.seq.RepairRequest(worker)
	c.mu.Unlock()
	if !ok {
		return
	}

	subject, err := ResendSubject(c.b, c.cfg.Namespace, worker)
	var reply *triplanev1.KvResendReply
	if err == nil {
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RepairTimeout)
		reply, err = event.Request[*triplanev1.KvResendRequest, *triplanev1.KvResendReply](ctx, c.b, subject, req)
		cancel()
	}

	c.mu.Lock()
	res := c.seq.RepairDone(worker, epoch, reply, err)
	c.mu.Unlock()
	if res.Err != nil {
		c.b.Logger().Debug("kv event repair failed", "worker", worker, "from", req.FromEventId, "to", req.ToEventId, "attempt", res.Failures, "err", res.Err)
	}
	switch res.Next {
	case RepairAgain:
		c.repair <- worker
	case RepairAfterBackoff:
		go func() {
			t := time.NewTimer(c.cfg.RepairBackoff)
			defer t.Stop()
			select {
			case <-c.ctx.Done():
			case <-t.C:
				c.repair <- worker
			}
		}()
	case RepairGaveUp:
		c.b.Logger().Warn("kv event repair gave up until the worker's next batch", "worker", worker, "missing_from", res.Missing, "head", res.Head)
	}
}

// Blocks is a copy of the consumer's view of worker's blocks and the id of
// the last event it reflects.
func (c *Consumer) Blocks(worker string) (map[uint64]Block, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq.Blocks(worker)
}

// LastEventID is the id of the last event of worker the view reflects.
func (c *Consumer) LastEventID(worker string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq.LastEventID(worker)
}

// Workers lists the workers followed.
func (c *Consumer) Workers() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq.Workers()
}

// Forget stops following a worker (it left the deployment).
func (c *Consumer) Forget(worker string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq.Forget(worker)
}

// Stats returns the counters.
func (c *Consumer) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.seq.Stats()
	if c.sub != nil {
		s.Malformed += c.sub.Malformed()
	}
	return s
}
