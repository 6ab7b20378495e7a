package sim

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
)

// Journal is the simulated event plane's journal, with the real one's
// semantics: one subject per actor, appends conditional on the subject's
// last stream sequence (journal.ErrConflict otherwise), a retried batch
// recognised by its content, atomic batches, and a highest sequence. Its
// fault: an append that fails with an unknown outcome, written or not.
type Journal struct {
	w         *World
	streamSeq uint64
	subjects  map[actors.Address][]simBatch
	// FailAppend is the probability that an append fails; WrittenOnFailure
	// the probability that such a failed append was written all the same.
	FailAppend, WrittenOnFailure float64
	// Counters.
	Appends, Failures, Conflicts uint64
}

type simBatch struct {
	stream  uint64
	first   uint64
	events  []proto.Message
	command string
}

// same reports whether b is the batch a command would write: the retry
// of an append that was written is recognised by its content.
func (b simBatch) same(commandID string, first uint64, events []proto.Message) bool {
	if b.command != commandID || b.first != first || len(b.events) != len(events) {
		return false
	}
	for i := range events {
		if !proto.Equal(b.events[i], events[i]) {
			return false
		}
	}
	return true
}

// ErrAppendFault is the injected append failure.
var ErrAppendFault = errors.New("sim journal: injected append failure (outcome unknown)")

// NewJournal creates an empty simulated journal in w.
func NewJournal(w *World) *Journal {
	return &Journal{w: w, subjects: map[actors.Address][]simBatch{}}
}

// Highest is the actor's position.
func (j *Journal) Highest(a actors.Address) journal.Position {
	bs := j.subjects[a]
	if len(bs) == 0 {
		return journal.Position{}
	}
	last := bs[len(bs)-1]
	return journal.Position{Seq: last.first + uint64(len(last.events)) - 1, Stream: last.stream}
}

// Append writes events after expect, atomically.
func (j *Journal) Append(a actors.Address, expect journal.Position, commandID string, events []proto.Message) (journal.Position, error) {
	if len(events) == 0 {
		return expect, nil
	}
	if j.w.Chance(j.FailAppend) {
		j.Failures++
		if j.w.Chance(j.WrittenOnFailure) && j.Highest(a).Stream == expect.Stream {
			j.write(a, expect, events, commandID)
			j.w.Tracef("journal %s append seq %d: written, then failed", a, expect.Seq+1)
		} else {
			j.w.Tracef("journal %s append seq %d: failed", a, expect.Seq+1)
		}
		return journal.Position{}, ErrAppendFault
	}
	cur := j.Highest(a)
	if cur.Stream != expect.Stream {
		// A retry of a batch that was written is recognised by content.
		if bs := j.subjects[a]; len(bs) > 0 && bs[len(bs)-1].same(commandID, expect.Seq+1, events) {
			return cur, nil
		}
		j.Conflicts++
		return journal.Position{}, fmt.Errorf("%w: %s expected stream seq %d, last is %d", journal.ErrConflict, a, expect.Stream, cur.Stream)
	}
	return j.write(a, expect, events, commandID), nil
}

func (j *Journal) write(a actors.Address, expect journal.Position, events []proto.Message, commandID string) journal.Position {
	j.streamSeq++
	j.Appends++
	// The batch keeps the host's messages: nothing modifies a machine's
	// events in place once Decide returned (actors.Machine), and cloning
	// them was a tenth of a serving run.
	j.subjects[a] = append(j.subjects[a], simBatch{stream: j.streamSeq, first: expect.Seq + 1, events: slices.Clone(events), command: commandID})
	return journal.Position{Seq: expect.Seq + uint64(len(events)), Stream: j.streamSeq}
}

// Events returns the actor's events with sequence above after.
func (j *Journal) Events(a actors.Address, after uint64) []proto.Message {
	bs := j.subjects[a]
	// Batches are in sequence order: skip those wholly at or below after
	// (a recovery from a recent snapshot reads only the tail).
	k := sort.Search(len(bs), func(i int) bool { return bs[i].first+uint64(len(bs[i].events))-1 > after })
	n := 0
	for _, b := range bs[k:] {
		n += len(b.events)
	}
	if n == 0 {
		return nil
	}
	out := make([]proto.Message, 0, n)
	for _, b := range bs[k:] {
		for i, e := range b.events {
			if b.first+uint64(i) > after {
				out = append(out, e)
			}
		}
	}
	return out
}

// Actors lists every actor with events, in a deterministic order.
func (j *Journal) Actors() []actors.Address { return sortedAddrs(maps.Keys(j.subjects)) }
