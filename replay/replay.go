// Package replay reads the actor journal and snapshots back for a person
// debugging a Triplane system: it lists the actors, prints an actor's events,
// rebuilds an actor's state at a sequence or a time with the same state
// machines the host runs, verifies snapshots against the journal, and draws
// timelines of several actors as Mermaid or self-contained HTML.
//
// It is the logic behind `triplane replay`; the command only parses flags and
// prints. A Session opens the journal of a running cluster (NATS URL) or of a
// stopped `triplane up` data dir (locked, with an embedded NATS server over
// its JetStream store), and the snapshot store when there is one.
//
// Replay never writes events. Opening the journal of a running cluster
// leaves its stream configuration as it is (see Open).
package replay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Errors callers branch on. Those marked "input" name a problem with what
// the user asked for; the CLI reports them as usage errors.
var (
	// ErrNoActor: the journal has no events of the actor.
	ErrNoActor = errors.New("replay: no such actor in the journal")
	// ErrUnknownKind (input): no state machine of that kind is compiled in.
	ErrUnknownKind = errors.New("replay: unknown actor kind")
	// ErrUnknownType (input): no protobuf message of that name is compiled in.
	ErrUnknownType = errors.New("replay: unknown event type")
	// ErrNoJournal: the server has no journal stream (nothing journaled yet,
	// or another stream name or prefix).
	ErrNoJournal = errors.New("replay: no journal")
	// ErrNoData: the data dir or the store asked for does not exist.
	ErrNoData = errors.New("replay: no data")
)

// Replayer reads one journal (and optionally one snapshot store) with the
// machines of one registry.
type Replayer struct {
	Journal *journal.Journal
	// Snapshots may be nil: then Verify only replays the journal.
	Snapshots *journal.Snapshots
	Registry  *actors.Registry
	// Log receives warnings; nil discards them.
	Log *slog.Logger
	// Progress, when not nil, is told how far long replays got.
	Progress Progress
}

func (r *Replayer) log() *slog.Logger {
	if r.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Log
}

func (r *Replayer) progress() Progress {
	if r.Progress == nil {
		return noProgress{}
	}
	return r.Progress
}

// Event is one decoded journal event.
type Event struct {
	Kind, ID  string
	Seq       uint64
	Time      time.Time // when the command that produced it was handled
	Type      string    // protobuf full name, e.g. triplane.v1.LedgerDeposited
	CommandID string
	StreamSeq uint64 // stream sequence of the journal message holding it
	Msg       proto.Message
}

// Actor is the event's actor as "kind/id".
func (e *Event) Actor() string { return e.Kind + "/" + e.ID }

// ShortType is the type's name without its package, e.g. LedgerDeposited.
func (e *Event) ShortType() string { return shortName(e.Type) }

// Fields is the event as compact protojson, e.g. {"amount":"5"}.
func (e *Event) Fields() string { return CompactJSON(e.Msg) }

// MarshalJSON encodes the event as one JSON object with the event's
// fields under "event".
func (e *Event) MarshalJSON() ([]byte, error) {
	fields, err := marshalProto(e.Msg, false)
	if err != nil {
		return nil, fmt.Errorf("replay: encode %s event %d: %w", e.Actor(), e.Seq, err)
	}
	return json.Marshal(struct {
		Kind      string          `json:"kind"`
		ID        string          `json:"id"`
		Seq       uint64          `json:"seq"`
		Time      string          `json:"time"`
		Type      string          `json:"type"`
		CommandID string          `json:"command_id,omitempty"`
		StreamSeq uint64          `json:"stream_seq"`
		Event     json.RawMessage `json:"event"`
	}{e.Kind, e.ID, e.Seq, FormatTime(e.Time), e.Type, e.CommandID, e.StreamSeq, fields})
}

func shortName(full string) string {
	if i := strings.LastIndexByte(full, '.'); i >= 0 {
		return full[i+1:]
	}
	return full
}

// FormatTime formats times the way every replay output does: UTC,
// RFC 3339 with as many fractional digits as needed.
func FormatTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// marshalProto encodes m as protojson with proto field names, normalised
// (protojson varies its whitespace on purpose) and either compact or
// indented. Indented output also shows fields at their zero value, so a
// state always shows all its fields.
func marshalProto(m proto.Message, indent bool) ([]byte, error) {
	raw, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: indent}.Marshal(m)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if indent {
		err = json.Indent(&buf, raw, "", "  ")
	} else {
		err = json.Compact(&buf, raw)
	}
	if err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// CompactJSON is m as one line of protojson; an encoding failure is shown
// in place of the fields.
func CompactJSON(m proto.Message) string {
	b, err := marshalProto(m, false)
	if err != nil {
		return fmt.Sprintf("<cannot encode %T: %v>", m, err)
	}
	return string(b)
}

// IndentJSON is m as indented protojson, zero-valued fields included.
func IndentJSON(m proto.Message) (string, error) {
	b, err := marshalProto(m, true)
	if err != nil {
		return "", fmt.Errorf("replay: encode %T: %w", m, err)
	}
	return string(b), nil
}

// Filter selects events. Zero values select everything.
type Filter struct {
	From, To     uint64    // event sequences, inclusive; To 0: to the end
	Since, Until time.Time // command time: Since inclusive; Until ends the read at the first command at or after it
	// Type is a protobuf full name; use ResolveType to accept short names.
	Type string
}

// ResolveType turns an event type given as a full protobuf name
// (triplane.v1.LedgerDeposited) or a short one (LedgerDeposited) into the
// full name, checking that this binary knows the message.
func ResolveType(name string) (string, error) {
	name = strings.TrimSpace(strings.TrimPrefix(name, "type.googleapis.com/"))
	if name == "" {
		return "", nil
	}
	if strings.Contains(name, ".") {
		if _, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(name)); err != nil {
			return "", fmt.Errorf("%w %q: no protobuf message of that full name in this binary", ErrUnknownType, name)
		}
		return name, nil
	}
	var matches []string
	protoregistry.GlobalTypes.RangeMessages(func(mt protoreflect.MessageType) bool {
		if string(mt.Descriptor().Name()) == name {
			matches = append(matches, string(mt.Descriptor().FullName()))
		}
		return true
	})
	sort.Strings(matches)
	switch len(matches) {
	case 0:
		return "", fmt.Errorf("%w %q: no protobuf message of that name in this binary (give a name like LedgerDeposited or triplane.v1.LedgerDeposited)", ErrUnknownType, name)
	case 1:
		return matches[0], nil
	}
	return "", fmt.Errorf("%w %q is ambiguous: %s; give the full name", ErrUnknownType, name, strings.Join(matches, ", "))
}

// CheckActor validates an actor kind and id as the journal does.
func CheckActor(kind, id string) error {
	if err := journal.CheckName(kind, id); err != nil {
		return fmt.Errorf("actor %s/%s: %w", kind, id, err)
	}
	return nil
}

// ParseActor splits "kind/id".
func ParseActor(s string) (actors.Address, error) {
	kind, id, ok := strings.Cut(s, "/")
	if !ok {
		return actors.Address{}, fmt.Errorf("actor %q: want KIND/ID, for example ledger/acct-1", s)
	}
	if err := CheckActor(kind, id); err != nil {
		return actors.Address{}, err
	}
	return actors.Address{Kind: kind, ID: id}, nil
}

// Actor summarises one actor of the journal.
type Actor struct {
	journal.ActorInfo
	// SnapshotSeq is the sequence of the actor's newest snapshot (0: none,
	// or no snapshot store). SnapshotErr says why the newest is unusable.
	SnapshotSeq uint64
	SnapshotErr error
}

// MarshalJSON encodes the actor as one JSON object.
func (a Actor) MarshalJSON() ([]byte, error) {
	v := struct {
		Kind        string `json:"kind"`
		ID          string `json:"id"`
		Highest     uint64 `json:"highest_seq"`
		LastEvent   string `json:"last_event_time"`
		Messages    uint64 `json:"messages"`
		SnapshotSeq uint64 `json:"snapshot_seq,omitempty"`
		SnapshotErr string `json:"snapshot_error,omitempty"`
		JournalErr  string `json:"journal_error,omitempty"`
	}{Kind: a.Kind, ID: a.ID, Highest: a.Highest, LastEvent: FormatTime(a.LastEvent), Messages: a.Messages, SnapshotSeq: a.SnapshotSeq}
	if a.Err != nil {
		v.JournalErr = a.Err.Error()
	}
	if a.SnapshotErr != nil {
		v.SnapshotErr = a.SnapshotErr.Error()
	}
	return json.Marshal(v)
}

// List returns every actor with events, sorted by kind and id, with its
// newest snapshot when there is a snapshot store.
func (r *Replayer) List(ctx context.Context) ([]Actor, error) {
	infos, err := r.Journal.Actors(ctx)
	if err != nil {
		return nil, fmt.Errorf("replay: list actors: %w", err)
	}
	type snapInfo struct {
		seq uint64
		err error
	}
	snaps := map[string]snapInfo{}
	if r.Snapshots != nil {
		err := r.Snapshots.Newest(func(kind, id string, snap *triplanev1.Snapshot, err error) error {
			si := snapInfo{err: err}
			if snap != nil {
				si.seq = snap.Seq
			}
			snaps[kind+"/"+id] = si
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("replay: list snapshots: %w", err)
		}
	}
	out := make([]Actor, 0, len(infos))
	for _, in := range infos {
		s := snaps[in.Kind+"/"+in.ID]
		out = append(out, Actor{ActorInfo: in, SnapshotSeq: s.seq, SnapshotErr: s.err})
	}
	return out, nil
}

// highest returns the actor's position, or ErrNoActor.
func (r *Replayer) highest(ctx context.Context, kind, id string) (journal.Position, error) {
	if err := CheckActor(kind, id); err != nil {
		return journal.Position{}, err
	}
	pos, err := r.Journal.Highest(ctx, kind, id)
	if err != nil {
		return journal.Position{}, fmt.Errorf("replay: %s/%s: %w", kind, id, err)
	}
	if pos.Stream == 0 {
		cfg := r.Journal.Config()
		return journal.Position{}, fmt.Errorf("%w: %s/%s has no events in stream %s (subject %s); `triplane replay list` shows the actors",
			ErrNoActor, kind, id, cfg.Stream, r.Journal.Subject(kind, id))
	}
	return pos, nil
}

// errStop ends a journal read early without an error.
var errStop = errors.New("stop")

// Events calls fn with each of the actor's events selected by f, in
// sequence order. An event type this binary does not know stops the read
// with a *journal.DecodeError naming the subject and sequence; events the
// type filter leaves out are not decoded.
func (r *Replayer) Events(ctx context.Context, kind, id string, f Filter, fn func(*Event) error) error {
	pos, err := r.highest(ctx, kind, id)
	if err != nil {
		return err
	}
	if f.To != 0 && f.From > f.To {
		return nil
	}
	p := r.progress()
	p.Begin("reading "+kind+"/"+id, int64(pos.Seq))
	defer p.End()
	q := journal.Query{FromSeq: f.From, ToSeq: f.To, Since: f.Since, Until: f.Until}
	err = r.Journal.Read(ctx, kind, id, q, func(rec *journal.Record) error {
		p.Add(1)
		if f.Type != "" && rec.Type() != f.Type {
			return nil
		}
		msg, err := rec.Decode()
		if err != nil {
			return err
		}
		return fn(&Event{Kind: kind, ID: id, Seq: rec.Seq, Time: rec.Time, Type: rec.Type(),
			CommandID: rec.CommandID, StreamSeq: rec.StreamSeq, Msg: msg})
	})
	if err != nil && !errors.Is(err, errStop) {
		return fmt.Errorf("replay: events of %s/%s: %w", kind, id, err)
	}
	return nil
}

// At is the point a state is rebuilt at. The zero value is the latest
// state; otherwise the state after event Seq, or after every event of a
// command handled at or before Time.
type At struct {
	Seq  uint64
	Time time.Time
}

// State is an actor's state rebuilt from the journal.
type State struct {
	Kind, ID string
	// Seq is the last event applied (0: none); Time its command time.
	Seq  uint64
	Time time.Time
	// Highest is the actor's highest sequence in the journal.
	Highest uint64
	Msg     proto.Message
}

// MarshalJSON encodes the state as one JSON object with the state's fields
// under "state".
func (s *State) MarshalJSON() ([]byte, error) {
	fields, err := marshalProto(s.Msg, false)
	if err != nil {
		return nil, fmt.Errorf("replay: encode state of %s/%s: %w", s.Kind, s.ID, err)
	}
	return json.Marshal(struct {
		Kind    string          `json:"kind"`
		ID      string          `json:"id"`
		Seq     uint64          `json:"seq"`
		Time    string          `json:"time"`
		Highest uint64          `json:"highest_seq"`
		Type    string          `json:"type"`
		State   json.RawMessage `json:"state"`
	}{s.Kind, s.ID, s.Seq, FormatTime(s.Time), s.Highest, string(s.Msg.ProtoReflect().Descriptor().FullName()), fields})
}

func (r *Replayer) machine(kind string) (actors.Machine, error) {
	m, err := r.Registry.Machine(kind)
	if err != nil {
		return nil, fmt.Errorf("%w %q: this binary has machines for %s", ErrUnknownKind, kind, strings.Join(r.Registry.Kinds(), ", "))
	}
	return m, nil
}

// State rebuilds the actor's state at the given point from its events,
// with actors.Rebuild (no snapshots).
func (r *Replayer) State(ctx context.Context, kind, id string, at At) (*State, error) {
	if err := CheckActor(kind, id); err != nil {
		return nil, err
	}
	m, err := r.machine(kind)
	if err != nil {
		return nil, err
	}
	pos, err := r.highest(ctx, kind, id)
	if err != nil {
		return nil, err
	}
	q := journal.Query{ToSeq: at.Seq}
	if !at.Time.IsZero() {
		// The journal's Until is exclusive; the state "at" a time includes
		// the commands handled at that very time.
		q.Until = at.Time.Add(time.Nanosecond)
	}
	total := pos.Seq
	if at.Seq != 0 {
		total = min(total, at.Seq)
	}
	// Rebuild reports no steps: the bar is a spinner with the elapsed time.
	p := r.progress()
	p.Begin(fmt.Sprintf("rebuilding %s/%s (up to %d events)", kind, id, total), -1)
	rec, err := actors.Rebuild(ctx, r.Journal, m, id, q)
	p.End()
	if err == nil && rec.Pos.Seq == 0 && pos.Seq > 0 && at.Time.IsZero() {
		err = fmt.Errorf("no event replays although the journal's highest sequence is %d", pos.Seq)
	}
	if err != nil {
		var de *journal.DecodeError
		if !errors.As(err, &de) {
			if first, ferr := r.firstSeq(ctx, kind, id); ferr == nil && (first > 1 || first == 0) {
				return nil, fmt.Errorf("replay: rebuild %s/%s: its oldest events were deleted (compacted after a snapshot), so its journal no longer replays from the start: %w", kind, id, err)
			}
		}
		return nil, fmt.Errorf("replay: rebuild %s/%s: %w", kind, id, err)
	}
	return &State{Kind: kind, ID: id, Seq: rec.Pos.Seq, Time: rec.LastTime, Highest: pos.Seq, Msg: rec.State}, nil
}
