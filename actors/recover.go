package actors

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Recovered is an actor's state rebuilt from storage.
type Recovered struct {
	State proto.Message
	Pos   journal.Position
	// FromSnapshot is the sequence of the snapshot recovery started from
	// (0: none, the whole journal was replayed).
	FromSnapshot uint64
	// Replayed counts the journal events applied on top.
	Replayed uint64
	// LastTime is the time of the last applied event's command.
	LastTime time.Time
	// SnapshotSkipped says why a snapshot was not used though there may
	// be one: "unreadable" (the store failed), "undecodable"
	// (its state does not decode), "past_journal_end" (it belongs to
	// another journal); empty when none was skipped.
	SnapshotSkipped string
}

// Recover rebuilds an actor: the newest usable snapshot (if snaps is not
// nil), then every later event from the journal. A snapshot that cannot be
// decoded into the machine's state is logged and the journal replayed from
// the start instead.
func Recover(ctx context.Context, j *journal.Journal, snaps *journal.Snapshots, m Machine, id string, log *slog.Logger) (*Recovered, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Recovered{State: m.Initial(id)}
	// The journal's end, read once: the next append is conditional on it
	// (it may be a deletion marker after the last event), and a snapshot
	// must lie inside it.
	end, err := j.Highest(ctx, m.Kind(), id)
	if err != nil {
		return nil, err
	}
	if snaps != nil {
		// A snapshot whose sequence or stream position lies past the
		// journal's end belongs to another journal (a wiped or different
		// NATS store).
		snap, err := snaps.Load(m.Kind(), id, m.SchemaVersion())
		if err == nil && (snap.Seq > end.Seq || snap.JournalPosition > end.Stream) {
			log.Warn("snapshot lies past the journal's end, ignoring it", "actor", m.Kind()+"/"+id,
				"snapshot_seq", snap.Seq, "snapshot_position", snap.JournalPosition, "journal_seq", end.Seq, "journal_position", end.Stream)
			err = journal.ErrNoSnapshot
			r.SnapshotSkipped = "past_journal_end"
		}
		switch {
		case errors.Is(err, journal.ErrNoSnapshot):
		case err != nil:
			log.Warn("snapshot store unreadable, replaying the journal", "actor", m.Kind()+"/"+id, "err", err)
			r.SnapshotSkipped = "unreadable"
		default:
			st := m.Initial(id)
			if uerr := snap.State.UnmarshalTo(st); uerr != nil {
				log.Warn("snapshot state does not decode, replaying the journal", "actor", m.Kind()+"/"+id, "seq", snap.Seq, "err", uerr)
				r.SnapshotSkipped = "undecodable"
			} else {
				Upgrade(m, st)
				r.State = st
				r.Pos = journal.Position{Seq: snap.Seq, Stream: snap.JournalPosition}
				r.FromSnapshot = snap.Seq
				r.LastTime = time.Unix(0, snap.TimeUnixNanos)
			}
		}
	}
	// Read only the tail up to that end (none when the snapshot is current).
	if end.Seq > r.Pos.Seq {
		q := journal.Query{FromSeq: r.Pos.Seq + 1, ToSeq: end.Seq, AfterStream: r.Pos.Stream}
		if err := applyRange(ctx, j, m, id, q, r); err != nil {
			return nil, err
		}
	}
	if end.Seq != r.Pos.Seq {
		return nil, fmt.Errorf("actors: recover %s/%s: journal highest is %d but events end at %d (events deleted past the newest snapshot?)",
			m.Kind(), id, end.Seq, r.Pos.Seq)
	}
	r.Pos = end
	return r, nil
}

// Rebuild folds an actor's events selected by q into a fresh state, for
// replay at a sequence or a time. It does not use snapshots.
func Rebuild(ctx context.Context, j *journal.Journal, m Machine, id string, q journal.Query) (*Recovered, error) {
	r := &Recovered{State: m.Initial(id)}
	q.FromSeq = 0
	if err := applyRange(ctx, j, m, id, q, r); err != nil {
		return nil, err
	}
	return r, nil
}

func applyRange(ctx context.Context, j *journal.Journal, m Machine, id string, q journal.Query, r *Recovered) error {
	return j.Read(ctx, m.Kind(), id, q, func(rec *journal.Record) error {
		if rec.Seq != r.Pos.Seq+1 {
			return fmt.Errorf("actors: %s: event seq %d follows %d (gap in the journal)", rec.Subject, rec.Seq, r.Pos.Seq)
		}
		ev, err := rec.Decode()
		if err != nil {
			return err
		}
		if err := applyGuarded(m, r.State, ev); err != nil {
			return &journal.DecodeError{Subject: rec.Subject, StreamSeq: rec.StreamSeq, Seq: rec.Seq, Err: err}
		}
		r.Pos = journal.Position{Seq: rec.Seq, Stream: rec.StreamSeq}
		r.Replayed++
		r.LastTime = rec.Time
		return nil
	})
}

// NewBatch wraps events for the journal.
func NewBatch(commandID string, now time.Time, events []proto.Message) (*triplanev1.EventBatch, error) {
	b := &triplanev1.EventBatch{CommandId: commandID, TimeUnixNanos: now.UnixNano()}
	for _, e := range events {
		a, err := anypb.New(e)
		if err != nil {
			return nil, fmt.Errorf("actors: wrap event %T: %w", e, err)
		}
		b.Events = append(b.Events, &triplanev1.Event{Payload: a})
	}
	return b, nil
}

// NewSnapshot wraps a state for the snapshot store.
func NewSnapshot(m Machine, id string, state proto.Message, pos journal.Position, now time.Time) (*triplanev1.Snapshot, error) {
	a, err := anypb.New(state)
	if err != nil {
		return nil, fmt.Errorf("actors: wrap state of %s/%s: %w", m.Kind(), id, err)
	}
	return &triplanev1.Snapshot{Kind: m.Kind(), ActorId: id, Seq: pos.Seq, JournalPosition: pos.Stream,
		SchemaVersion: m.SchemaVersion(), State: a, TimeUnixNanos: now.UnixNano()}, nil
}
