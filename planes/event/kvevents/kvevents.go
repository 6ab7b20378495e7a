// Package kvevents carries workers' KV cache events to the routers over core
// NATS with gap repair: each worker numbers its events (a per-worker
// monotonic id within an epoch), keeps the latest ones in a bounded ring
// buffer and its current blocks in a mirror; a consumer that sees a gap asks
// the worker to resend the missing range and, when the ring no longer holds
// it, gets a dump of the worker's blocks instead, in pages of one frozen
// state when it does not fit one message (see Log.Resend). Heartbeats
// carry the worker's latest id so a lost tail is noticed too.
//
// Subjects (see package event for the scheme):
//
//	<prefix>.<ns>.kv.events.<worker>   KvEventBatch, pub/sub
//	<prefix>.<ns>.kv.resend.<worker>   KvResendRequest -> KvResendReply
package kvevents

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/triplane-dev/triplane/blockmap"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

// ErrInvalid: a batch or reply that decodes but breaks the protocol.
var ErrInvalid = errors.New("kvevents: invalid")

// The package's fault points (see package fault), each a path that
// production takes rarely and that must leave the consumer's view equal to
// the worker's blocks once the repairs are done:
//
//   - FaultPendingFull: Sequencer.Ingest treats the out-of-order buffer as
//     full for this event, which is dropped and counted in
//     Stats.DroppedPending; the repair fetches it again.
//   - FaultDump: Log.Resend answers with a dump though the ring holds the
//     range asked for.
//   - FaultShortResend: Log.Resend answers with only the first event of the
//     range; the consumer asks again for the rest.
//   - FaultDumpLost: Log.Resend drops its frozen dump before answering a
//     request for its next page (as when it expires or a newer dump
//     replaces it); the consumer drops the pages it took and starts over.
const (
	FaultPendingFull = "kvevents.sequencer.pending-full"
	FaultDump        = "kvevents.log.dump"
	FaultShortResend = "kvevents.log.short-resend"
	FaultDumpLost    = "kvevents.log.dump-lost"
)

// FaultPoints lists every fault point of the package, for a simulator to arm.
var FaultPoints = []string{FaultPendingFull, FaultDump, FaultShortResend, FaultDumpLost}

// Block is one cached block: its parent in the prefix chain, if any.
type Block struct {
	Parent    uint64
	HasParent bool
}

// EventsSubject is where worker publishes its events; worker "*" matches
// every worker of the namespace.
func EventsSubject(b *event.Bus, namespace, worker string) (string, error) {
	return workerSubject(b, namespace, "events", worker)
}

// ResendSubject is where worker answers resend requests.
func ResendSubject(b *event.Bus, namespace, worker string) (string, error) {
	return workerSubject(b, namespace, "resend", worker)
}

func workerSubject(b *event.Bus, namespace, kind, worker string) (string, error) {
	if worker == "*" {
		s, err := b.Subject(namespace, "kv", kind, "x")
		if err != nil {
			return "", err
		}
		return s[:len(s)-1] + "*", nil
	}
	return b.Subject(namespace, "kv", kind, worker)
}

// apply changes blocks by one event.
func apply(blocks *blockmap.Map[Block], e *triplanev1.KvEvent) {
	switch k := e.Kind.(type) {
	case *triplanev1.KvEvent_Stored:
		parent, has := k.Stored.GetParentHash(), k.Stored.ParentHash != nil
		for _, h := range k.Stored.BlockHashes {
			blocks.Set(h, Block{Parent: parent, HasParent: has})
			parent, has = h, true
		}
	case *triplanev1.KvEvent_Removed:
		for _, h := range k.Removed.BlockHashes {
			blocks.Delete(h)
		}
	case *triplanev1.KvEvent_Cleared:
		blocks.Clear()
	}
}

// ValidateBatch checks what decoding cannot: a worker id that is one subject
// token, event ids from 1 and consecutive, every event of a known kind, and
// a head not behind the events.
func ValidateBatch(b *triplanev1.KvEventBatch) error {
	if err := event.CheckToken(b.GetWorkerId()); err != nil {
		return fmt.Errorf("%w: batch worker id: %w", ErrInvalid, err)
	}
	if b.Epoch == 0 {
		// Publishers refuse epoch 0 and a saved view cannot hold it: a
		// batch claiming it is not from a real worker.
		return fmt.Errorf("%w: batch of worker %s has epoch 0 (an epoch is the worker's start time)", ErrInvalid, b.WorkerId)
	}
	if err := validateEvents(b.Events); err != nil {
		return fmt.Errorf("%w: batch of worker %s: %w", ErrInvalid, b.WorkerId, err)
	}
	if n := len(b.Events); n > 0 && b.HeadEventId < b.Events[n-1].EventId {
		return fmt.Errorf("%w: batch of worker %s: head %d behind its last event %d", ErrInvalid, b.WorkerId, b.HeadEventId, b.Events[n-1].EventId)
	}
	return nil
}

func validateEvents(es []*triplanev1.KvEvent) error {
	for i, e := range es {
		if e.GetEventId() == 0 {
			return fmt.Errorf("event %d has id 0", i)
		}
		if e.EventId == math.MaxUint64 {
			// The next id would wrap to 0: the view would wait forever.
			return fmt.Errorf("event %d has the largest id, %d", i, e.EventId)
		}
		if i > 0 && e.EventId != es[i-1].EventId+1 {
			return fmt.Errorf("event ids %d then %d are not consecutive", es[i-1].EventId, e.EventId)
		}
		if e.Kind == nil {
			return fmt.Errorf("event %d has no kind", e.EventId)
		}
	}
	return nil
}

// ValidateReply checks a resend reply the same way.
func ValidateReply(r *triplanev1.KvResendReply) error {
	switch k := r.GetReply().(type) {
	case *triplanev1.KvResendReply_Range:
		if k.Range == nil {
			// Decoding never makes one (an empty range decodes as one
			// without events); a reply built in process can.
			return fmt.Errorf("%w: resend reply of worker %s: a nil range", ErrInvalid, r.WorkerId)
		}
		if err := validateEvents(k.Range.Events); err != nil {
			return fmt.Errorf("%w: resend reply of worker %s: %w", ErrInvalid, r.WorkerId, err)
		}
	case *triplanev1.KvResendReply_Dump:
		if k.Dump == nil {
			return fmt.Errorf("%w: resend reply of worker %s: a nil dump", ErrInvalid, r.WorkerId)
		}
		if k.Dump.EventId == math.MaxUint64 {
			return fmt.Errorf("%w: resend reply of worker %s: a dump at the largest event id", ErrInvalid, r.WorkerId)
		}
		if err := validatePage(k.Dump); err != nil {
			return fmt.Errorf("%w: resend reply of worker %s: %w", ErrInvalid, r.WorkerId, err)
		}
	default:
		return fmt.Errorf("%w: resend reply of worker %s holds neither events nor a dump", ErrInvalid, r.GetWorkerId())
	}
	return nil
}

// validatePage checks a dump: no nil block (only a reply built in process
// can hold one), and a one-reply dump's total, when set, its number of
// blocks (an older worker leaves it 0). A page of a paged dump (one with
// more pages or a cursor) must also hold its blocks in increasing hash
// order after its cursor, at least one unless it is the last (each page
// moves the cursor on, so paging ends), and no more than the dump's total.
func validatePage(d *triplanev1.KvDump) error {
	if i := slices.Index(d.Blocks, nil); i >= 0 {
		return fmt.Errorf("a dump's block %d is nil", i)
	}
	if !d.More && d.After == nil {
		if d.TotalBlocks != 0 && d.TotalBlocks != uint64(len(d.Blocks)) {
			return fmt.Errorf("a dump of one reply has %d blocks, its total says %d", len(d.Blocks), d.TotalBlocks)
		}
		return nil
	}
	if d.More && len(d.Blocks) == 0 {
		return errors.New("a dump page without blocks says more follow")
	}
	if uint64(len(d.Blocks)) > d.TotalBlocks {
		return fmt.Errorf("a dump page of %d blocks, the dump has %d", len(d.Blocks), d.TotalBlocks)
	}
	for i, b := range d.Blocks {
		if i == 0 && d.After != nil && b.GetHash() <= *d.After {
			return fmt.Errorf("a dump page after hash %d starts at hash %d", *d.After, b.GetHash())
		}
		if i > 0 && b.GetHash() <= d.Blocks[i-1].GetHash() {
			return fmt.Errorf("a dump page's hashes %d then %d are not increasing", d.Blocks[i-1].GetHash(), b.GetHash())
		}
	}
	return nil
}

// toMap is a copy of a worker's blocks as a map.
func toMap(blocks *blockmap.Map[Block]) map[uint64]Block {
	out := make(map[uint64]Block, blocks.Len())
	blocks.Each(func(h uint64, b Block) { out[h] = b })
	return out
}
