package replay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Status is the outcome of verifying one actor.
type Status string

// The statuses, from good to bad. Every status after StatusSkipped is a
// fault: Verify's report is not OK when any actor has one.
const (
	// StatusOK: every event replays; the newest snapshot, if any, equals
	// the state rebuilt from the journal at its sequence.
	StatusOK Status = "ok"
	// StatusSkipped: something could not be checked, by design: a snapshot
	// of another schema version (recovery ignores it) or a journal whose
	// oldest events were deleted after a snapshot.
	StatusSkipped Status = "skipped"
	// StatusDiverged: the snapshot disagrees with the journal.
	StatusDiverged Status = "diverged"
	// StatusCorrupt: the newest snapshot cannot be read or decoded.
	StatusCorrupt Status = "corrupt"
	// StatusFailed: the journal does not replay (an event that does not
	// decode or apply, a gap).
	StatusFailed Status = "failed"
	// StatusUnknownKind: no state machine of the actor's kind is compiled
	// into this binary.
	StatusUnknownKind Status = "unknown-kind"
)

// Fault says whether the status is a problem to fix.
func (s Status) Fault() bool { return s != StatusOK && s != StatusSkipped }

// FieldDiff is one field on which a snapshot and the journal disagree.
// Values are JSON; "" means the field is absent.
type FieldDiff struct {
	Path     string
	Snapshot string
	Journal  string
}

func (d FieldDiff) String() string {
	show := func(s string) string {
		if s == "" {
			return "(absent)"
		}
		return s
	}
	return fmt.Sprintf("%s: snapshot %s, journal %s", d.Path, show(d.Snapshot), show(d.Journal))
}

// Check is the verification of one actor.
type Check struct {
	Kind, ID string
	Status   Status
	// Highest is the actor's highest sequence in the journal (0: none).
	Highest uint64
	// Replayed counts the events replayed from the journal.
	Replayed uint64
	// HasSnapshot: the store holds a snapshot of the actor, usable or not;
	// SnapshotSeq is its sequence when it could be read.
	HasSnapshot bool
	SnapshotSeq uint64
	// DivergedAt is the first sequence known to disagree (0: none). A
	// snapshot holds only its final state, so for a state mismatch it is
	// the snapshot's sequence: the cause lies at or before it. For a
	// journal shorter than the snapshot it is the first missing event.
	DivergedAt uint64
	// MatchesAt, for a state mismatch, is the sequence at which the
	// journal's state equals the snapshot's (0 with MatchesAtFound false:
	// at no point).
	MatchesAt      uint64
	MatchesAtFound bool
	// Diff lists the fields that differ, for a state mismatch.
	Diff []FieldDiff
	// Notes explain the status, one sentence each.
	Notes []string
}

// Actor is the checked actor as "kind/id".
func (c *Check) Actor() string { return c.Kind + "/" + c.ID }

func (c *Check) note(s Status, format string, args ...any) {
	switch {
	case c.Status == "" || c.Status == StatusOK:
		c.Status = s
	case c.Status == StatusSkipped && s.Fault():
		c.Status = s
	}
	c.Notes = append(c.Notes, fmt.Sprintf(format, args...))
}

// VerifyReport is the outcome of Verify.
type VerifyReport struct {
	Checks []Check
	// Events counts the events replayed; Snapshots the snapshots found.
	Events    uint64
	Snapshots int
	// Faults counts the actors whose status is a fault.
	Faults int
}

// OK says no actor has a fault.
func (r *VerifyReport) OK() bool { return r.Faults == 0 }

// Verify replays every actor of the journal (and every actor with a
// snapshot) with its state machine. Each actor's whole journal must decode
// and apply. Each newest snapshot must be readable and equal the state
// rebuilt from the whole journal up to the snapshot's sequence, and name
// the journal message of that sequence as its position. The error is for
// failures to read at all; what is wrong with actors is in the report.
func (r *Replayer) Verify(ctx context.Context) (*VerifyReport, error) {
	infos, err := r.Journal.Actors(ctx)
	if err != nil {
		return nil, fmt.Errorf("replay: verify: %w", err)
	}
	// Which actors have snapshots; each one's record is read when its
	// actor is checked, so that memory holds one state at a time, not the
	// whole store's.
	snaps := map[actors.Address]bool{}
	if r.Snapshots != nil {
		err := r.Snapshots.Newest(func(kind, id string, _ *triplanev1.Snapshot, _ error) error {
			snaps[actors.Address{Kind: kind, ID: id}] = true
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("replay: verify: read snapshots: %w", err)
		}
	}
	byActor := map[actors.Address]*journal.ActorInfo{}
	var total uint64
	for i := range infos {
		byActor[actors.Address{Kind: infos[i].Kind, ID: infos[i].ID}] = &infos[i]
		total += infos[i].Highest
	}
	all := make([]actors.Address, 0, len(byActor)+len(snaps))
	for a := range byActor {
		all = append(all, a)
	}
	for a := range snaps {
		if byActor[a] == nil {
			all = append(all, a)
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].Kind != all[j].Kind {
			return all[i].Kind < all[j].Kind
		}
		return all[i].ID < all[j].ID
	})

	p := r.progress()
	p.Begin(fmt.Sprintf("verifying %d actors", len(all)), int64(total))
	defer p.End()
	rep := &VerifyReport{Snapshots: len(snaps)}
	for _, a := range all {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("replay: verify: %w", err)
		}
		var snap *triplanev1.Snapshot
		var snapErr error
		hasSnap := snaps[a]
		if hasSnap {
			snap, snapErr = r.Snapshots.NewestRecord(a.Kind, a.ID)
		}
		c := r.verifyActor(ctx, a.Kind, a.ID, byActor[a], hasSnap, snap, snapErr)
		if c.Status == "" {
			c.Status = StatusOK
		}
		if c.Status.Fault() {
			rep.Faults++
		}
		rep.Events += c.Replayed
		if info := byActor[a]; info != nil {
			p.Add(int64(info.Highest))
		}
		r.log().Debug("verified", "actor", c.Actor(), "status", c.Status, "replayed", c.Replayed)
		rep.Checks = append(rep.Checks, c)
	}
	return rep, nil
}

func (r *Replayer) verifyActor(ctx context.Context, kind, id string, info *journal.ActorInfo, hasSnap bool, snap *triplanev1.Snapshot, snapErr error) Check {
	c := Check{Kind: kind, ID: id, HasSnapshot: hasSnap}
	if info != nil {
		c.Highest = info.Highest
	}
	m, err := r.Registry.Machine(kind)
	if err != nil {
		c.note(StatusUnknownKind, "no state machine of kind %q in this binary (it has %s): its events cannot be replayed",
			kind, strings.Join(r.Registry.Kinds(), ", "))
		return c
	}

	// The whole journal must replay, unless its oldest events were deleted
	// after a snapshot (compaction): then recovery from the snapshot is
	// checked instead.
	var full *actors.Recovered
	replayedTo := uint64(0)  // events 1..replayedTo replay
	compactedTo := uint64(0) // events 1..compactedTo were deleted
	if info != nil {
		// Up to the highest listed: on a running system the actor may
		// have gone on since, which is not a loss.
		full, err = actors.Rebuild(ctx, r.Journal, m, id, journal.Query{ToSeq: info.Highest})
		var de *journal.DecodeError
		switch {
		case errors.As(err, &de):
			c.DivergedAt = de.Seq
			c.note(StatusFailed, "the journal does not replay: %v", de)
			if de.Seq > 1 {
				replayedTo = de.Seq - 1
			}
		case err != nil || full.Pos.Seq != info.Highest:
			first, ferr := r.firstSeq(ctx, kind, id)
			switch {
			case ferr != nil:
				c.note(StatusFailed, "the journal does not replay: %v", cmp.Or(err, ferr))
			case first > 1:
				compactedTo = first - 1
			case first == 0 && info.Highest > 0:
				compactedTo = info.Highest
			case err != nil:
				c.note(StatusFailed, "the journal does not replay: %v", err)
			default:
				c.Replayed, replayedTo = full.Replayed, full.Pos.Seq
				c.DivergedAt = full.Pos.Seq + 1
				c.note(StatusFailed, "the journal's highest sequence is %d but its events end at %d (events lost past seq %d)",
					info.Highest, full.Pos.Seq, full.Pos.Seq)
			}
		default:
			c.Replayed, replayedTo = full.Replayed, full.Pos.Seq
		}
	}

	if !hasSnap {
		switch {
		case compactedTo > 0 && r.Snapshots == nil:
			c.note(StatusSkipped, "events up to seq %d were deleted (compacted after a snapshot) and no snapshot store is read (--snapshots): recovery not checked", compactedTo)
		case compactedTo > 0:
			c.note(StatusFailed, "events up to seq %d were deleted but the actor has no snapshot: it cannot be recovered", compactedTo)
		case c.Status == "":
			c.note(StatusOK, "no snapshot; %d events replay", c.Replayed)
		}
		return c
	}
	if snapErr != nil {
		c.note(StatusCorrupt, "newest snapshot unreadable: %v (recovery falls back to an older snapshot or the whole journal)", snapErr)
		return c
	}
	c.SnapshotSeq = snap.Seq
	if snap.Kind != kind || snap.ActorId != id {
		c.note(StatusCorrupt, "newest snapshot, stored under %s/%s, holds actor %s/%s", kind, id, snap.Kind, snap.ActorId)
		return c
	}
	if v := m.SchemaVersion(); snap.SchemaVersion != v {
		if compactedTo > 0 {
			c.note(StatusFailed, "newest snapshot (seq %d) has schema version %d, the machine has %d, and events up to seq %d were deleted: recovery ignores the snapshot and cannot replay the journal",
				snap.Seq, snap.SchemaVersion, v, compactedTo)
			return c
		}
		c.note(StatusSkipped, "newest snapshot (seq %d) has schema version %d, the machine has %d: recovery ignores it, so it was not compared",
			snap.Seq, snap.SchemaVersion, v)
		return c
	}
	snapState := m.Initial(id)
	if err := snap.State.UnmarshalTo(snapState); err != nil {
		c.note(StatusCorrupt, "newest snapshot (seq %d) holds a %s that does not decode as %s: %v",
			snap.Seq, snap.State.GetTypeUrl(), snapState.ProtoReflect().Descriptor().FullName(), err)
		return c
	}
	actors.Upgrade(m, snapState)
	if info == nil {
		c.DivergedAt = 1
		c.note(StatusDiverged, "the journal has no events of this actor but its snapshot is at seq %d (a wiped or different journal?)", snap.Seq)
		return c
	}
	if compactedTo > 0 {
		if snap.Seq < compactedTo {
			c.DivergedAt = snap.Seq + 1
			c.note(StatusFailed, "events up to seq %d were deleted, past the snapshot's seq %d: events %d to %d are lost and the actor cannot be recovered",
				compactedTo, snap.Seq, snap.Seq+1, compactedTo)
			return c
		}
		rec, err := actors.Recover(ctx, r.Journal, r.Snapshots, m, id, r.log())
		if err != nil {
			c.note(StatusFailed, "recovery from the snapshot at seq %d fails: %v", snap.Seq, err)
			return c
		}
		c.Replayed = rec.Replayed
		c.note(StatusSkipped, "events up to seq %d were deleted (compacted), so the snapshot at seq %d cannot be compared; recovery from it applies %d later events, to seq %d",
			compactedTo, snap.Seq, rec.Replayed, rec.Pos.Seq)
		return c
	}
	if snap.Seq > replayedTo && replayedTo < info.Highest {
		c.note(StatusSkipped, "snapshot (seq %d) not compared: the journal does not replay up to it", snap.Seq)
		return c
	}

	at := full
	if at == nil || snap.Seq != at.Pos.Seq {
		at, err = actors.Rebuild(ctx, r.Journal, m, id, journal.Query{ToSeq: snap.Seq})
		if err != nil {
			c.note(StatusFailed, "rebuilding to the snapshot's seq %d: %v", snap.Seq, err)
			return c
		}
	}
	if at.Pos.Seq < snap.Seq {
		c.DivergedAt = at.Pos.Seq + 1
		c.note(StatusDiverged, "the journal ends at seq %d but the snapshot is at seq %d: the journal is shorter than the snapshot (a wiped or different journal?); recovery ignores the snapshot",
			at.Pos.Seq, snap.Seq)
		return c
	}
	if !proto.Equal(at.State, snapState) {
		c.DivergedAt = snap.Seq
		diff, err := DiffStates(snapState, at.State)
		if err != nil {
			c.note(StatusDiverged, "snapshot state at seq %d differs from the journal's (no field diff: %v)", snap.Seq, err)
		} else {
			c.Diff = diff
			c.note(StatusDiverged, "snapshot state at seq %d differs from the journal replayed to seq %d in %d field(s); a snapshot holds only its final state, so the first difference is at or before seq %d",
				snap.Seq, snap.Seq, len(diff), snap.Seq)
		}
		seq, found, err := r.matchingSeq(ctx, m, id, snapState, snap.Seq, info.Highest)
		switch {
		case err != nil:
			r.log().Warn("looking for the sequence the snapshot matches", "actor", c.Actor(), "err", err)
		case found:
			c.MatchesAt, c.MatchesAtFound = seq, true
			c.note(StatusDiverged, "the snapshot equals the journal's state at seq %d: it was saved with the wrong sequence", seq)
		default:
			c.note(StatusDiverged, "the snapshot equals the journal's state at no sequence from 0 to %d: its state was changed outside the events (a non-deterministic Apply?)", info.Highest)
		}
	}
	if snap.JournalPosition != at.Pos.Stream {
		if c.DivergedAt == 0 {
			c.DivergedAt = snap.Seq + 1
		}
		c.note(StatusDiverged, "the snapshot's journal position is stream seq %d but event seq %d is in stream message %d: recovery would resume reading at the wrong message",
			snap.JournalPosition, snap.Seq, at.Pos.Stream)
	}
	if c.Status == "" {
		c.note(StatusOK, "snapshot at seq %d equals the journal's state; %d events replay", snap.Seq, c.Replayed)
	}
	return c
}

// firstSeq returns the sequence of the actor's oldest event in the journal
// (0: none).
func (r *Replayer) firstSeq(ctx context.Context, kind, id string) (uint64, error) {
	var first uint64
	err := r.Journal.Read(ctx, kind, id, journal.Query{}, func(rec *journal.Record) error {
		first = rec.Seq
		return errStop
	})
	if err != nil && !errors.Is(err, errStop) {
		return 0, err
	}
	return first, nil
}

// matchingSeq folds the actor's events one by one and returns the sequence
// (from 0, the initial state, to highest) at which the state equals want,
// the one nearest to near when there are several.
func (r *Replayer) matchingSeq(ctx context.Context, m actors.Machine, id string, want proto.Message, near, highest uint64) (uint64, bool, error) {
	state := m.Initial(id)
	best, found := uint64(0), proto.Equal(state, want)
	dist := func(s uint64) uint64 {
		if s > near {
			return s - near
		}
		return near - s
	}
	err := r.Journal.Read(ctx, m.Kind(), id, journal.Query{ToSeq: highest}, func(rec *journal.Record) error {
		ev, err := rec.Decode()
		if err != nil {
			return err
		}
		if err := m.Apply(state, ev); err != nil {
			return &journal.DecodeError{Subject: rec.Subject, StreamSeq: rec.StreamSeq, Seq: rec.Seq, Err: err}
		}
		if proto.Equal(state, want) && (!found || dist(rec.Seq) < dist(best)) {
			best, found = rec.Seq, true
		}
		return nil
	})
	if err != nil {
		return 0, false, err
	}
	return best, found, nil
}
