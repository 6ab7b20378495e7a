package kvevents

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"

	"github.com/triplane-dev/triplane/blockmap"
	"github.com/triplane-dev/triplane/fault"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

const (
	defaultMaxPending     = 4096
	defaultMaxWorkers     = 4096
	defaultRepairAttempts = 10
	// defaultMaxBlocks is far above any worker's KV pool.
	defaultMaxBlocks = 1 << 20
)

// SequencerConfig configures a Sequencer; the fields mean what they mean in
// ConsumerConfig, with the same defaults.
type SequencerConfig struct {
	MaxPending, MaxWorkers, RepairAttempts, MaxBlocksPerWorker int
	// OnEvent and OnReset are told every change to the view, in order,
	// from within the call that makes it.
	OnEvent func(worker string, e *triplanev1.KvEvent)
	OnReset func(worker string, blocks map[uint64]Block, last uint64)
	// Follows, when set, says which workers to follow: a batch of a worker
	// without a view starts one only if Follows says so, else it is
	// dropped and counted (Unfollowed). The router follows what discovery
	// lists, so a worker that left (and still heartbeats while it drains)
	// does not come back into the view after Forget.
	Follows func(worker string) bool
	// Faults is nil in production (see FaultPendingFull).
	Faults fault.Points
}

// Stats counts what the consumer saw.
type Stats struct {
	Applied, Duplicates, Gaps, Resends, Dumps, RepairFailures, Malformed, DroppedPending, DroppedWorkers, StaleEpoch, Unfollowed uint64
	// DroppedBlocks are block hashes not kept: past MaxBlocksPerWorker.
	DroppedBlocks uint64
	// DumpPages are pages of paged dumps taken; DumpRestarts paged dumps
	// dropped before their last page (the worker lost the dump or
	// restarted, answered with a new one or a range, late events moved
	// the view past it, or the repair ended);
	// StalePages pages refused as not the one asked for (another dump's,
	// or not following the last page taken) or inconsistent with the pages
	// before them.
	DumpPages, DumpRestarts, StalePages uint64
}

// String summarises the stats for logs and benchmarks.
func (s Stats) String() string {
	return fmt.Sprintf("applied %d, duplicates %d, gaps %d, resends %d, dumps %d (%d pages, %d restarted, %d stale pages), repair failures %d, malformed %d, dropped: %d pending, %d of workers past the limit, %d stale epoch, %d unlisted, %d blocks past the limit",
		s.Applied, s.Duplicates, s.Gaps, s.Resends, s.Dumps, s.DumpPages, s.DumpRestarts, s.StalePages, s.RepairFailures, s.Malformed, s.DroppedPending, s.DroppedWorkers, s.StaleEpoch, s.Unfollowed, s.DroppedBlocks)
}

type workerView struct {
	epoch     uint64
	next      uint64 // next event id to apply
	head      uint64 // highest id known to exist
	blocks    blockmap.Map[Block]
	pending   map[uint64]*triplanev1.KvEvent
	repairing bool
	failures  int    // failed resend requests in a row
	asked     uint64 // next when the last resend request was made
	dump      *pagedDump
	// abandoned counts the paged dumps of this repair dropped before
	// their last page (replaced by another or not adding up), since the
	// view last moved: a page taken puts failures back to it, not to 0,
	// so a worker whose dumps never complete still reaches RepairAttempts.
	abandoned int
}

// pagedDump is a paged dump being assembled: the pages taken so far of the
// dump the worker took at eventID. It is applied only once complete, as one
// dump, so the view never holds part of one; meanwhile live events are
// buffered as during any repair. Bounded by MaxBlocksPerWorker: once that
// many blocks are kept the dump is complete (the rest are dropped and
// counted, as from a one-reply dump that large), and every page moves the
// cursor on by at least one block, so one dump takes at most that many
// pages. A worker cannot make a repair page for ever either: a first page
// that replaces a dump being assembled, and pages that do not add up, are
// failed requests, and a page taken counts failures from the number of
// dumps this repair abandoned, not from 0 (see RepairDone), so a worker
// whose dumps never complete reaches RepairAttempts and the repair gives up.
type pagedDump struct {
	eventID  uint64
	after    uint64 // hash of the last block taken: the next page's cursor
	total    uint64 // blocks of the whole dump, as its first page said
	received uint64 // blocks taken so far, kept or not
	// blocks are kept compact (24 bytes each, not a decoded message of
	// about 80): a router may hold MaxBlocksPerWorker of them for every
	// worker under repair.
	blocks []hashedBlock
}

// Sequencer is the consumer's logic without its goroutines, lock, timers or
// connection, so that the simulator runs the very code production runs: it
// puts each worker's events in order, buffers what arrives early, says when a
// gap needs a repair and applies the repair's answer. The caller does the
// asking, the waiting and the locking (a Sequencer is not safe for
// concurrent use); everything the Sequencer does is decided by its inputs
// and its Faults.
type Sequencer struct {
	cfg     SequencerConfig
	workers map[string]*workerView
	stats   Stats
}

// NewSequencer returns a Sequencer following no worker yet.
func NewSequencer(cfg SequencerConfig) *Sequencer {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	if cfg.MaxWorkers <= 0 {
		cfg.MaxWorkers = defaultMaxWorkers
	}
	if cfg.RepairAttempts <= 0 {
		cfg.RepairAttempts = defaultRepairAttempts
	}
	if cfg.MaxBlocksPerWorker <= 0 {
		cfg.MaxBlocksPerWorker = defaultMaxBlocks
	}
	return &Sequencer{cfg: cfg, workers: map[string]*workerView{}}
}

// Ingest takes one batch. repair says a repair of batch.WorkerId must start
// now: the worker is then marked as being repaired, so a gap is reported
// once however many batches show it, until RepairDone says stop. err is why
// a malformed batch was dropped (counted in Stats.Malformed).
func (s *Sequencer) Ingest(batch *triplanev1.KvEventBatch) (repair bool, err error) {
	if err := ValidateBatch(batch); err != nil {
		s.stats.Malformed++
		return false, err
	}
	v := s.view(batch.WorkerId, batch.Epoch)
	if v == nil {
		return false, nil
	}
	v.head = max(v.head, batch.HeadEventId)
	for _, e := range batch.Events {
		s.ingest(batch.WorkerId, v, e)
	}
	if v.next <= v.head && !v.repairing {
		v.repairing = true
		s.stats.Gaps++
		return true, nil
	}
	return false, nil
}

// view finds or makes the worker's view for epoch; nil drops the batch (an
// old epoch, or no room).
func (s *Sequencer) view(worker string, epoch uint64) *workerView {
	v := s.workers[worker]
	if v == nil {
		if s.cfg.Follows != nil && !s.cfg.Follows(worker) {
			s.stats.Unfollowed++
			return nil
		}
		if len(s.workers) >= s.cfg.MaxWorkers {
			s.stats.DroppedWorkers++
			return nil
		}
		v = &workerView{epoch: epoch, next: 1, pending: map[uint64]*triplanev1.KvEvent{}}
		s.workers[worker] = v
		return v
	}
	switch {
	case epoch < v.epoch:
		s.stats.StaleEpoch++
		return nil
	case epoch > v.epoch:
		// The worker restarted: its ids start again and its cache is new.
		// A repair under way goes on; its answer, of the old epoch, is
		// ignored and the next request asks the new one.
		v.epoch, v.next, v.head = epoch, 1, 0
		v.blocks.Clear()
		clear(v.pending)
		s.dropDump(v) // the old run's dump died with it
		if s.cfg.OnReset != nil {
			s.cfg.OnReset(worker, map[uint64]Block{}, 0)
		}
	}
	return v
}

func (s *Sequencer) ingest(worker string, v *workerView, e *triplanev1.KvEvent) {
	switch {
	case e.EventId < v.next:
		s.stats.Duplicates++
	case e.EventId == v.next:
		s.apply(worker, v, e)
		s.drain(worker, v)
	default:
		// Raised even when the event is dropped below, so the gap it
		// leaves is repaired.
		v.head = max(v.head, e.EventId)
		if _, ok := v.pending[e.EventId]; ok {
			s.stats.Duplicates++
		} else if len(v.pending) < s.cfg.MaxPending && !fault.Fire(s.cfg.Faults, FaultPendingFull) {
			v.pending[e.EventId] = e
		} else {
			s.stats.DroppedPending++
		}
	}
}

// drain applies the buffered events that now follow in order.
func (s *Sequencer) drain(worker string, v *workerView) {
	for len(v.pending) > 0 { // usually empty: events mostly arrive in order
		p, ok := v.pending[v.next]
		if !ok {
			return
		}
		delete(v.pending, v.next)
		s.apply(worker, v, p)
	}
}

func (s *Sequencer) apply(worker string, v *workerView, e *triplanev1.KvEvent) {
	v.next = e.EventId + 1
	v.head = max(v.head, e.EventId)
	if st := e.GetStored(); st != nil && v.blocks.Len()+len(st.BlockHashes) > s.cfg.MaxBlocksPerWorker {
		// More than any worker's pool holds: the event is taken in order
		// but its blocks are not kept (here or in the index).
		s.stats.DroppedBlocks += uint64(len(st.BlockHashes))
		return
	}
	apply(&v.blocks, e)
	s.stats.Applied++
	if s.cfg.OnEvent != nil {
		s.cfg.OnEvent(worker, e)
	}
}

// dumpBlocks fills blocks from a dump's, at most MaxBlocksPerWorker.
func (s *Sequencer) dumpBlocks(blocks *blockmap.Map[Block], d []*triplanev1.KvDumpBlock) {
	if n := len(d) - s.cfg.MaxBlocksPerWorker; n > 0 {
		s.stats.DroppedBlocks += uint64(n)
		d = d[:s.cfg.MaxBlocksPerWorker]
	}
	for _, b := range d {
		blocks.Set(b.Hash, Block{Parent: b.GetParentHash(), HasParent: b.ParentHash != nil})
	}
}

// RepairRequest is the resend request that asks worker for what its view
// misses, and the epoch to hand back to RepairDone with the answer; ok is
// false when the worker is no longer followed (Forget), and the repair ends.
func (s *Sequencer) RepairRequest(worker string) (req *triplanev1.KvResendRequest, epoch uint64, ok bool) {
	v := s.workers[worker]
	if v == nil {
		return nil, 0, false
	}
	if d := v.dump; d != nil && d.eventID < v.next {
		// Events that came late moved the view past the dump being
		// assembled while a gap remains: the dump would fill none of it,
		// so ask for what is missing now (a range, or a newer dump).
		s.dropDump(v)
	}
	v.asked = v.next
	req = &triplanev1.KvResendRequest{WorkerId: worker, FromEventId: v.next, ToEventId: v.head, DumpPages: true}
	if d := v.dump; d != nil {
		after := d.after
		req.DumpEventId, req.DumpAfter = d.eventID, &after
	}
	return req, v.epoch, true
}

// RepairNext is what a repair does after one resend request.
type RepairNext int

const (
	// RepairStop: the view has no gap left (or the worker is no longer
	// followed); the repair is over.
	RepairStop RepairNext = iota
	// RepairAgain: a gap remains (a partial answer, or one of an old
	// epoch); ask again now.
	RepairAgain
	// RepairAfterBackoff: the request failed and a gap remains; ask again
	// after a wait.
	RepairAfterBackoff
	// RepairGaveUp: RepairAttempts requests in a row failed; the repair is
	// over until the worker's next batch or heartbeat starts another, so a
	// worker that died stops costing requests.
	RepairGaveUp
)

func (n RepairNext) String() string {
	switch n {
	case RepairStop:
		return "stop"
	case RepairAgain:
		return "again"
	case RepairAfterBackoff:
		return "after backoff"
	case RepairGaveUp:
		return "gave up"
	}
	return fmt.Sprintf("RepairNext(%d)", int(n))
}

// RepairResult is what became of one resend request, with what the caller
// logs.
type RepairResult struct {
	Next RepairNext
	// Err is why the request counted as failed: the caller's error or the
	// reply's invalidity; nil when it did not.
	Err error
	// Failures is the number of failed requests in a row, this one
	// included (0 when it did not fail): the attempt number to log.
	Failures int
	// Missing and Head are the first event id the view still misses and
	// the highest id known to exist, after the answer.
	Missing, Head uint64
}

// RepairDone takes the outcome of the request RepairRequest made for epoch:
// the reply, or err when there was none (a timeout, no responder).
func (s *Sequencer) RepairDone(worker string, epoch uint64, reply *triplanev1.KvResendReply, err error) RepairResult {
	v := s.workers[worker]
	if v == nil {
		return RepairResult{Next: RepairStop}
	}
	if err == nil {
		err = ValidateReply(reply)
	}
	// Progress is counted from the request: events that came live meanwhile
	// and filled part of the gap count too.
	before, reset := min(v.asked, v.next), v.epoch != epoch
	var page pageTaken // what became of a dump page in the reply
	switch {
	case err != nil:
		// A paged dump being assembled stays: the next request asks for
		// the same page again.
	case reply.Epoch != epoch || reset:
		// The worker restarted meanwhile; the new epoch's events decide.
		// A paged dump of the old run is of no use any more.
		s.dropDump(v)
	default:
		switch r := reply.Reply.(type) {
		case *triplanev1.KvResendReply_Range:
			// The ring holds the gap again (the worker lost the dump the
			// view was paging, and live events filled the start of the
			// gap meanwhile): events repair it, the dump is not needed.
			s.dropDump(v)
			s.stats.Resends++
			if len(r.Range.GetEvents()) == 0 {
				// The worker has nothing past what the view holds: the
				// head that asked for more was not its own (a forged or
				// corrupt heartbeat). The worker's log is the truth.
				v.head = min(v.head, v.next-1)
			}
			for _, e := range r.Range.GetEvents() {
				s.ingest(worker, v, e)
			}
		case *triplanev1.KvResendReply_Dump:
			if r.Dump.More || r.Dump.After != nil {
				page, err = s.dumpPage(worker, v, r.Dump)
				break
			}
			// A whole dump (one page) replaces any paged one being
			// assembled: the worker lost that and started afresh.
			s.dropDump(v)
			s.stats.Dumps++
			s.applyDump(worker, v, r.Dump)
		}
	}
	gap, moved := v.next <= v.head, v.next > before
	if err == nil && gap && !moved && !reset && page == pageNone {
		// An answer that filled nothing while the gap stays (one of
		// another epoch, a dump older than the view) counts as a failed
		// request: else a peer answering that way forever keeps the
		// repair asking forever, with no pause.
		err = errNoProgress
	}
	switch {
	case err != nil:
		s.stats.RepairFailures++
		v.failures++
	case moved || reset:
		// The view moved (events, or a dump applied), or the worker
		// restarted: failures count afresh.
		v.failures, v.abandoned = 0, 0
	case page == pageNext:
		// A page that follows the last one is progress on this dump, but
		// not on the dumps abandoned before it: else a worker whose dumps
		// never add up would page for ever.
		v.failures = v.abandoned
	}
	// pageFirst (a first page, no dump being assembled) leaves failures as
	// they are: starting a dump is no progress yet, else a worker answering
	// every request with a first page would never be given up on.
	res := RepairResult{Err: err, Failures: v.failures, Missing: v.next, Head: v.head}
	if gap && v.failures < s.cfg.RepairAttempts {
		if err != nil {
			res.Next = RepairAfterBackoff
		} else {
			res.Next = RepairAgain
		}
		return res
	}
	res.Next = RepairStop
	if v.failures >= s.cfg.RepairAttempts {
		res.Next = RepairGaveUp
	}
	// The next repair counts its failures from 0.
	v.failures, v.abandoned = 0, 0
	v.repairing = false
	// The repair is over (no gap left, or given up): a paged dump half
	// taken is not kept (the next repair starts a new one if it must).
	s.dropDump(v)
	return res
}

// errStalePage is a dump page that is not the one asked for, or that
// contradicts the pages before it.
var errStalePage = errors.New("a dump page that does not continue the dump being taken")

// dropDump drops the paged dump being assembled, if any.
func (s *Sequencer) dropDump(v *workerView) {
	if v.dump != nil {
		s.stats.DumpRestarts++
		v.dump = nil
	}
}

// pageTaken is what became of a dump page.
type pageTaken int

const (
	pageNone  pageTaken = iota // none taken (none in the reply, or refused)
	pageFirst                  // a first page, no dump being assembled: a dump starts
	pageNext                   // a page following the last one taken (or the last page)
)

// errDumpReplaced is a first page that replaces a dump being assembled:
// taken (the worker no longer holds the old one), but a failed request, so
// that the next one backs off and a worker answering every request so
// reaches RepairAttempts.
var errDumpReplaced = errors.New("a new dump replaced the one being taken")

// dumpPage takes one page of a paged dump (validated: blocks in increasing
// hash order after its cursor, at least one unless it is the last, no more
// than its total). A first page starts the dump (replacing one being
// assembled, which counts as a failed request: errDumpReplaced); a page
// that does not follow the last one taken (another dump's, a cursor going
// backwards or skipping, a total that changed) is refused and counted; the
// last page, or reaching MaxBlocksPerWorker, applies the whole dump.
func (s *Sequencer) dumpPage(worker string, v *workerView, d *triplanev1.KvDump) (pageTaken, error) {
	taken := pageNext
	var replaced error
	if d.After == nil {
		if d.EventId < v.next {
			// Not newer than what the view already has: it would fill
			// none of the gap (RepairRequest drops such a dump too).
			return pageNone, nil
		}
		taken = pageFirst
		if a := v.dump; a != nil {
			replaced = fmt.Errorf("%w: a dump at event %d replaced the one at %d after %d of its %d blocks",
				errDumpReplaced, d.EventId, a.eventID, a.received, a.total)
			s.dropDump(v)
			v.abandoned++
		}
		v.dump = &pagedDump{eventID: d.EventId, total: d.TotalBlocks}
	} else if a := v.dump; a == nil || d.EventId != a.eventID || *d.After != a.after || d.TotalBlocks != a.total {
		// Not the page asked for: the request names the dump and the
		// cursor, and a worker answers either with that page or with a
		// first page. The dump being assembled stays: asking again gets
		// the right page, or a new dump.
		s.stats.StalePages++
		if a == nil {
			return pageNone, fmt.Errorf("%w: a page at event %d after hash %d, no dump being taken", errStalePage, d.EventId, *d.After)
		}
		return pageNone, fmt.Errorf("%w: a page at event %d after hash %d of %d blocks, asked for event %d after %d of %d",
			errStalePage, d.EventId, *d.After, d.TotalBlocks, a.eventID, a.after, a.total)
	}
	a := v.dump
	if a.received += uint64(len(d.Blocks)); a.received > a.total || (!d.More && a.received != a.total) {
		// The pages do not add up to the dump they announce: not one
		// state. Start over; this dump counts as abandoned.
		s.stats.StalePages++
		received, total := a.received, a.total
		s.dropDump(v)
		v.abandoned++
		return pageNone, fmt.Errorf("%w: dump at event %d: %d blocks in its pages so far, %d announced", errStalePage, d.EventId, received, total)
	}
	s.stats.DumpPages++
	if n := len(d.Blocks); n > 0 {
		a.after = d.Blocks[n-1].Hash
		keep := min(n, s.cfg.MaxBlocksPerWorker-len(a.blocks))
		for _, b := range d.Blocks[:keep] {
			a.blocks = append(a.blocks, hashedBlock{b.Hash, Block{Parent: b.GetParentHash(), HasParent: b.ParentHash != nil}})
		}
		// Received and not kept: past MaxBlocksPerWorker. Only what
		// came counts, not the total the worker claims.
		s.stats.DroppedBlocks += uint64(n - keep)
	}
	if d.More && len(a.blocks) < s.cfg.MaxBlocksPerWorker {
		return taken, replaced
	}
	// Complete (or as much as the view keeps: the rest, in hash order,
	// would be dropped anyway, as from a one-reply dump that large).
	v.dump = nil
	s.stats.Dumps++
	s.resetView(worker, v, a.eventID, func(m *blockmap.Map[Block]) {
		for _, b := range a.blocks {
			m.Set(b.hash, b.Block)
		}
	})
	// A dump applied is progress, even one that replaced another (it
	// completed on its first page, at MaxBlocksPerWorker).
	return pageNext, nil
}

// errNoProgress is a resend answer that filled none of the gap.
var errNoProgress = errors.New("the answer filled none of the gap")

// applyDump replaces the view with a dump taken at dump.EventId and then
// applies the buffered events that follow it.
func (s *Sequencer) applyDump(worker string, v *workerView, d *triplanev1.KvDump) {
	s.resetView(worker, v, d.EventId, func(m *blockmap.Map[Block]) { s.dumpBlocks(m, d.Blocks) })
}

// resetView replaces the view with the blocks fill sets, as of eventID, and
// then applies the buffered events that follow it.
func (s *Sequencer) resetView(worker string, v *workerView, eventID uint64, fill func(*blockmap.Map[Block])) {
	if eventID+1 < v.next {
		return // older than what the view already has
	}
	v.blocks.Clear()
	fill(&v.blocks)
	v.next = eventID + 1
	v.head = max(v.head, eventID)
	for id := range v.pending {
		if id < v.next {
			delete(v.pending, id)
		}
	}
	if s.cfg.OnReset != nil {
		s.cfg.OnReset(worker, toMap(&v.blocks), eventID)
	}
	s.drain(worker, v)
}

// View returns the whole view, to be saved (Restore), workers and blocks in
// sorted order.
func (s *Sequencer) View() *triplanev1.KvView {
	out := &triplanev1.KvView{}
	for _, w := range slices.Sorted(maps.Keys(s.workers)) {
		v := s.workers[w]
		out.Workers = append(out.Workers, &triplanev1.KvWorkerView{WorkerId: w, Epoch: v.epoch, Dump: dump(&v.blocks, v.next-1)})
	}
	return out
}

// Restore seeds the view of workers not heard of yet from a saved view,
// telling OnReset. Invalid entries are skipped and counted as malformed;
// it returns how many were.
func (s *Sequencer) Restore(view *triplanev1.KvView) (malformed int) {
	for _, wv := range view.GetWorkers() {
		w := wv.GetWorkerId()
		if event.CheckToken(w) != nil || wv.GetEpoch() == 0 || wv.GetDump() == nil || wv.Dump.EventId == math.MaxUint64 {
			s.stats.Malformed++
			malformed++
			continue
		}
		if s.workers[w] != nil || len(s.workers) >= s.cfg.MaxWorkers {
			continue
		}
		v := &workerView{epoch: wv.Epoch, next: wv.Dump.EventId + 1, head: wv.Dump.EventId,
			pending: map[uint64]*triplanev1.KvEvent{}}
		s.dumpBlocks(&v.blocks, wv.Dump.Blocks)
		s.workers[w] = v
		if s.cfg.OnReset != nil {
			s.cfg.OnReset(w, toMap(&v.blocks), wv.Dump.EventId)
		}
	}
	return malformed
}

// Blocks is a copy of the view of worker's blocks and the id of the last
// event it reflects.
func (s *Sequencer) Blocks(worker string) (map[uint64]Block, uint64) {
	v := s.workers[worker]
	if v == nil {
		return map[uint64]Block{}, 0
	}
	return toMap(&v.blocks), v.next - 1
}

// LastEventID is the id of the last event of worker the view reflects.
func (s *Sequencer) LastEventID(worker string) uint64 {
	if v := s.workers[worker]; v != nil {
		return v.next - 1
	}
	return 0
}

// Workers lists the workers followed, sorted.
func (s *Sequencer) Workers() []string {
	return slices.Sorted(maps.Keys(s.workers))
}

// Forget stops following a worker (it left the deployment). A repair of it
// under way ends at its next RepairRequest or RepairDone, unless the worker
// is followed again by then.
func (s *Sequencer) Forget(worker string) {
	delete(s.workers, worker)
}

// Stats returns the counters.
func (s *Sequencer) Stats() Stats { return s.stats }

// dump lists blocks sorted by hash, so that the same blocks always give the
// same message (the simulator compares runs).
func dump(blocks *blockmap.Map[Block], last uint64) *triplanev1.KvDump {
	return &triplanev1.KvDump{EventId: last, Blocks: dumpBlocksOf(sortedBlocks(blocks))}
}

// hashedBlock is a block with its hash, compact (24 bytes, against about 80
// for a decoded KvDumpBlock): what a worker's frozen dump and a router's
// dump being assembled keep, up to a whole pool of them.
type hashedBlock struct {
	hash uint64
	Block
}

// sortedBlocks copies blocks, sorted by hash.
func sortedBlocks(blocks *blockmap.Map[Block]) []hashedBlock {
	out := make([]hashedBlock, 0, blocks.Len())
	blocks.Each(func(h uint64, b Block) { out = append(out, hashedBlock{h, b}) })
	slices.SortFunc(out, func(a, b hashedBlock) int { return cmp.Compare(a.hash, b.hash) })
	return out
}

// dumpBlocksOf is the dump message's blocks for bs, in order: the blocks
// and their parents in one allocation each.
func dumpBlocksOf(bs []hashedBlock) []*triplanev1.KvDumpBlock {
	blocks := make([]triplanev1.KvDumpBlock, len(bs))
	parents := make([]uint64, len(bs))
	out := make([]*triplanev1.KvDumpBlock, len(bs))
	for i, b := range bs {
		blocks[i].Hash = b.hash
		if b.HasParent {
			parents[i] = b.Parent
			blocks[i].ParentHash = &parents[i]
		}
		out[i] = &blocks[i]
	}
	return out
}
