package kvevents

import (
	"context"
	"fmt"
	"maps"
	"slices"
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
}

// Stats counts what the consumer saw.
type Stats struct {
	Applied, Duplicates, Gaps, Resends, Dumps, RepairFailures, Malformed, DroppedPending, DroppedWorkers, StaleEpoch uint64
}

type workerView struct {
	epoch     uint64
	next      uint64 // next event id to apply
	head      uint64 // highest id known to exist
	blocks    map[uint64]Block
	pending   map[uint64]*triplanev1.KvEvent
	repairing bool
	failures  int // failed resend requests in a row
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

	mu      sync.Mutex
	workers map[string]*workerView
	stats   Stats
}

// NewConsumer subscribes and starts the repairers.
func NewConsumer(b *event.Bus, cfg ConsumerConfig) (*Consumer, error) {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 4096
	}
	if cfg.MaxWorkers <= 0 {
		cfg.MaxWorkers = 4096
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
	if cfg.RepairAttempts <= 0 {
		cfg.RepairAttempts = 10
	}
	subject := cfg.Subject
	if subject == "" {
		s, err := EventsSubject(b, cfg.Namespace, "*")
		if err != nil {
			return nil, err
		}
		subject = s
	}
	c := &Consumer{b: b, cfg: cfg, workers: map[string]*workerView{},
		// Each worker is queued at most once (its repairing flag), so
		// this never blocks.
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
	out := &triplanev1.KvView{}
	for _, w := range slices.Sorted(maps.Keys(c.workers)) {
		v := c.workers[w]
		d := &triplanev1.KvDump{EventId: v.next - 1, Blocks: make([]*triplanev1.KvDumpBlock, 0, len(v.blocks))}
		for _, h := range slices.Sorted(maps.Keys(v.blocks)) {
			b := &triplanev1.KvDumpBlock{Hash: h}
			if v.blocks[h].HasParent {
				p := v.blocks[h].Parent
				b.ParentHash = &p
			}
			d.Blocks = append(d.Blocks, b)
		}
		out.Workers = append(out.Workers, &triplanev1.KvWorkerView{WorkerId: w, Epoch: v.epoch, Dump: d})
	}
	return out
}

// Restore seeds the view of workers not heard of yet from a saved view
// (a restarted router), telling OnReset. Batches that follow continue from
// each worker's saved event id; a worker that restarted since (a newer
// epoch) starts afresh. Invalid entries are skipped and counted as
// malformed.
func (c *Consumer) Restore(view *triplanev1.KvView) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, wv := range view.GetWorkers() {
		w := wv.GetWorkerId()
		if event.CheckToken(w) != nil || wv.GetEpoch() == 0 || wv.GetDump() == nil {
			c.stats.Malformed++
			continue
		}
		if c.workers[w] != nil || len(c.workers) >= c.cfg.MaxWorkers {
			continue
		}
		v := &workerView{epoch: wv.Epoch, next: wv.Dump.EventId + 1, head: wv.Dump.EventId,
			blocks: make(map[uint64]Block, len(wv.Dump.Blocks)), pending: map[uint64]*triplanev1.KvEvent{}}
		for _, b := range wv.Dump.Blocks {
			v.blocks[b.Hash] = Block{Parent: b.GetParentHash(), HasParent: b.ParentHash != nil}
		}
		c.workers[w] = v
		if c.cfg.OnReset != nil {
			c.cfg.OnReset(w, copyBlocks(v.blocks), wv.Dump.EventId)
		}
	}
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
	defer c.mu.Unlock()
	if err := ValidateBatch(batch); err != nil {
		c.stats.Malformed++
		c.b.Logger().Debug("dropping invalid kv event batch", "err", err)
		return
	}
	v := c.viewLocked(batch.WorkerId, batch.Epoch)
	if v == nil {
		return
	}
	v.head = max(v.head, batch.HeadEventId)
	for _, e := range batch.Events {
		c.ingestLocked(batch.WorkerId, v, e)
	}
	c.checkGapLocked(batch.WorkerId, v)
}

// viewLocked finds or makes the worker's view for epoch; nil drops the
// batch (an old epoch, or no room).
func (c *Consumer) viewLocked(worker string, epoch uint64) *workerView {
	v := c.workers[worker]
	if v == nil {
		if len(c.workers) >= c.cfg.MaxWorkers {
			c.stats.DroppedWorkers++
			return nil
		}
		v = &workerView{epoch: epoch, next: 1, blocks: map[uint64]Block{}, pending: map[uint64]*triplanev1.KvEvent{}}
		c.workers[worker] = v
		return v
	}
	switch {
	case epoch < v.epoch:
		c.stats.StaleEpoch++
		return nil
	case epoch > v.epoch:
		// The worker restarted: its ids start again and its cache is new.
		v.epoch, v.next, v.head = epoch, 1, 0
		clear(v.blocks)
		clear(v.pending)
		if c.cfg.OnReset != nil {
			c.cfg.OnReset(worker, map[uint64]Block{}, 0)
		}
	}
	return v
}

func (c *Consumer) ingestLocked(worker string, v *workerView, e *triplanev1.KvEvent) {
	switch {
	case e.EventId < v.next:
		c.stats.Duplicates++
	case e.EventId == v.next:
		c.applyLocked(worker, v, e)
		c.drainLocked(worker, v)
	default:
		v.head = max(v.head, e.EventId)
		if _, ok := v.pending[e.EventId]; ok {
			c.stats.Duplicates++
		} else if len(v.pending) < c.cfg.MaxPending {
			v.pending[e.EventId] = e
		} else {
			c.stats.DroppedPending++
		}
	}
}

// drainLocked applies the buffered events that now follow in order.
func (c *Consumer) drainLocked(worker string, v *workerView) {
	for {
		p, ok := v.pending[v.next]
		if !ok {
			return
		}
		delete(v.pending, v.next)
		c.applyLocked(worker, v, p)
	}
}

func (c *Consumer) applyLocked(worker string, v *workerView, e *triplanev1.KvEvent) {
	apply(v.blocks, e)
	v.next = e.EventId + 1
	v.head = max(v.head, e.EventId)
	c.stats.Applied++
	if c.cfg.OnEvent != nil {
		c.cfg.OnEvent(worker, e)
	}
}

func (c *Consumer) checkGapLocked(worker string, v *workerView) {
	if v.next <= v.head && !v.repairing {
		v.repairing = true
		c.stats.Gaps++
		c.repair <- worker
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
	v := c.workers[worker]
	if v == nil {
		c.mu.Unlock()
		return
	}
	epoch, from, to := v.epoch, v.next, v.head
	c.mu.Unlock()

	subject, err := ResendSubject(c.b, c.cfg.Namespace, worker)
	var reply *triplanev1.KvResendReply
	if err == nil {
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RepairTimeout)
		reply, err = event.Request[*triplanev1.KvResendRequest, *triplanev1.KvResendReply](ctx, c.b, subject,
			&triplanev1.KvResendRequest{WorkerId: worker, FromEventId: from, ToEventId: to})
		cancel()
	}
	if err == nil {
		err = ValidateReply(reply)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	v = c.workers[worker]
	if v == nil {
		return
	}
	if err == nil {
		v.failures = 0
	}
	switch {
	case err != nil:
		c.stats.RepairFailures++
		v.failures++
		c.b.Logger().Debug("kv event repair failed", "worker", worker, "from", from, "to", to, "attempt", v.failures, "err", err)
	case reply.Epoch != epoch || v.epoch != epoch:
		// The worker restarted meanwhile; the new epoch's events decide.
	default:
		switch r := reply.Reply.(type) {
		case *triplanev1.KvResendReply_Range:
			c.stats.Resends++
			for _, e := range r.Range.Events {
				c.ingestLocked(worker, v, e)
			}
		case *triplanev1.KvResendReply_Dump:
			c.stats.Dumps++
			c.applyDumpLocked(worker, v, r.Dump)
		}
	}
	if v.next <= v.head && v.failures < c.cfg.RepairAttempts {
		if err != nil {
			// Back off outside the lock, then try again.
			go func() {
				t := time.NewTimer(c.cfg.RepairBackoff)
				defer t.Stop()
				select {
				case <-c.ctx.Done():
				case <-t.C:
					c.repair <- worker
				}
			}()
			return
		}
		c.repair <- worker
		return
	}
	if v.failures >= c.cfg.RepairAttempts {
		v.failures = 0
		c.b.Logger().Warn("kv event repair gave up until the worker's next batch", "worker", worker, "missing_from", v.next, "head", v.head)
	}
	v.repairing = false
}

// applyDumpLocked replaces the view with a dump taken at dump.EventId and
// then applies the buffered events that follow it.
func (c *Consumer) applyDumpLocked(worker string, v *workerView, d *triplanev1.KvDump) {
	if d.EventId+1 < v.next {
		return // older than what the view already has
	}
	clear(v.blocks)
	for _, b := range d.Blocks {
		v.blocks[b.Hash] = Block{Parent: b.GetParentHash(), HasParent: b.ParentHash != nil}
	}
	v.next = d.EventId + 1
	v.head = max(v.head, d.EventId)
	for id := range v.pending {
		if id < v.next {
			delete(v.pending, id)
		}
	}
	if c.cfg.OnReset != nil {
		c.cfg.OnReset(worker, copyBlocks(v.blocks), d.EventId)
	}
	c.drainLocked(worker, v)
}

func copyBlocks(m map[uint64]Block) map[uint64]Block {
	out := make(map[uint64]Block, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Blocks is a copy of the consumer's view of worker's blocks and the id of
// the last event it reflects.
func (c *Consumer) Blocks(worker string) (map[uint64]Block, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.workers[worker]
	if v == nil {
		return map[uint64]Block{}, 0
	}
	return copyBlocks(v.blocks), v.next - 1
}

// LastEventID is the id of the last event of worker the view reflects.
func (c *Consumer) LastEventID(worker string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v := c.workers[worker]; v != nil {
		return v.next - 1
	}
	return 0
}

// Workers lists the workers followed.
func (c *Consumer) Workers() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.workers))
	for w := range c.workers {
		out = append(out, w)
	}
	return out
}

// Forget stops following a worker (it left the deployment).
func (c *Consumer) Forget(worker string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.workers, worker)
}

// Stats returns the counters.
func (c *Consumer) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	if c.sub != nil {
		s.Malformed += c.sub.Malformed()
	}
	return s
}

// String summarises the stats for logs and benchmarks.
func (s Stats) String() string {
	return fmt.Sprintf("applied %d, duplicates %d, gaps %d, resends %d, dumps %d, repair failures %d, malformed %d, dropped pending %d",
		s.Applied, s.Duplicates, s.Gaps, s.Resends, s.Dumps, s.RepairFailures, s.Malformed, s.DroppedPending)
}
