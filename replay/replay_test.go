package replay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/all"
	"github.com/triplane-dev/triplane/actors/ledger"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/embedded"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/system"
)

var t0 = time.Date(2025, 3, 14, 9, 26, 53, 0, time.UTC)

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// fixture is a journal with three ledger actors at fixed times:
//
//	ledger/a: 1 +5 @0s, 2 +7 @1s, 3 -3 @2s, 4 +1 and 5 +2 (one command) @3s, 6 interest 10 @4s
//	ledger/b: 1 +100 @0.5s, 2 -40 @2.5s
//	ledger/c: 1 +1 @1.5s
type fixture struct {
	j   *journal.Journal
	r   *Replayer
	pos map[string][]journal.Position // actor -> position after each command
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := ctxT(t)
	n := planetest.StartNATS(t)
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{j: j, r: &Replayer{Journal: j, Registry: all.Registry()}, pos: map[string][]journal.Position{}}
	writeLedgers(t, j, f.pos)
	return f
}

func writeLedgers(t *testing.T, j *journal.Journal, pos map[string][]journal.Position) {
	t.Helper()
	ms := func(d int) time.Time { return t0.Add(time.Duration(d) * time.Millisecond) }
	dep := func(a int64) proto.Message { return &triplanev1.LedgerDeposited{Amount: a} }
	wd := func(a int64) proto.Message { return &triplanev1.LedgerWithdrawn{Amount: a} }
	for _, c := range []struct {
		id  string
		at  time.Time
		evs []proto.Message
	}{
		{"a", ms(0), []proto.Message{dep(5)}},
		{"b", ms(500), []proto.Message{dep(100)}},
		{"a", ms(1000), []proto.Message{dep(7)}},
		{"c", ms(1500), []proto.Message{dep(1)}},
		{"a", ms(2000), []proto.Message{wd(3)}},
		{"b", ms(2500), []proto.Message{wd(40)}},
		{"a", ms(3000), []proto.Message{dep(1), dep(2)}},
		{"a", ms(4000), []proto.Message{&triplanev1.LedgerInterestPaid{Amount: 10}}},
	} {
		var last journal.Position
		if p := pos[c.id]; len(p) > 0 {
			last = p[len(p)-1]
		}
		next := appendBatch(t, j, "ledger", c.id, last, c.at, "cmd-"+c.id, c.evs...)
		pos[c.id] = append(pos[c.id], next)
	}
}

func appendBatch(t *testing.T, j *journal.Journal, kind, id string, after journal.Position, at time.Time, cmd string, evs ...proto.Message) journal.Position {
	t.Helper()
	b, err := actors.NewBatch(cmd, at, evs)
	if err != nil {
		t.Fatal(err)
	}
	p, err := j.Append(context.Background(), kind, id, after, b)
	if err != nil {
		t.Fatalf("append to %s/%s: %v", kind, id, err)
	}
	return p
}

func (f *fixture) events(t *testing.T, id string, flt Filter) []uint64 {
	t.Helper()
	var seqs []uint64
	err := f.r.Events(ctxT(t), "ledger", id, flt, func(e *Event) error {
		seqs = append(seqs, e.Seq)
		return nil
	})
	if err != nil {
		t.Fatalf("events of ledger/%s %+v: %v", id, flt, err)
	}
	return seqs
}

func eq[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestList(t *testing.T) {
	f := newFixture(t)
	list, err := f.r.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		actor   string
		highest uint64
		last    time.Time
	}
	var got []row
	for _, a := range list {
		got = append(got, row{a.Kind + "/" + a.ID, a.Highest, a.LastEvent.UTC()})
	}
	want := []row{
		{"ledger/a", 6, t0.Add(4 * time.Second)},
		{"ledger/b", 2, t0.Add(2500 * time.Millisecond)},
		{"ledger/c", 1, t0.Add(1500 * time.Millisecond)},
	}
	if !eq(got, want) {
		t.Fatalf("list = %+v, want %+v", got, want)
	}

	var buf bytes.Buffer
	if err := WriteActors(&buf, list, false); err != nil {
		t.Fatal(err)
	}
	if out := buf.String(); !strings.Contains(out, "HIGHEST SEQ") || !regexp.MustCompile(`ledger\s+a\s+6\s+2025-03-14T09:26:57Z`).MatchString(out) {
		t.Errorf("table:\n%s", out)
	}
	buf.Reset()
	if err := WriteActors(&buf, list, true); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	var first map[string]any
	if len(lines) != 3 || json.Unmarshal([]byte(lines[0]), &first) != nil ||
		first["kind"] != "ledger" || first["id"] != "a" || first["highest_seq"] != 6.0 || first["last_event_time"] != "2025-03-14T09:26:57Z" {
		t.Errorf("json lines:\n%s", buf.String())
	}
}

func TestEventsFilters(t *testing.T) {
	f := newFixture(t)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	for _, tc := range []struct {
		name string
		flt  Filter
		want []uint64
	}{
		{"all", Filter{}, []uint64{1, 2, 3, 4, 5, 6}},
		{"range", Filter{From: 2, To: 4}, []uint64{2, 3, 4}},
		{"from only", Filter{From: 5}, []uint64{5, 6}},
		{"to only", Filter{To: 2}, []uint64{1, 2}},
		{"from after to", Filter{From: 5, To: 2}, nil},
		{"from past the end", Filter{From: 7}, nil},
		{"since until", Filter{Since: at(1000), Until: at(3000)}, []uint64{2, 3}},
		{"since", Filter{Since: at(2500)}, []uint64{4, 5, 6}},
		{"until", Filter{Until: at(1)}, []uint64{1}},
		{"type", Filter{Type: "triplane.v1.LedgerDeposited"}, []uint64{1, 2, 4, 5}},
		{"type and range", Filter{Type: "triplane.v1.LedgerDeposited", From: 3, To: 4}, []uint64{4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := f.events(t, "a", tc.flt); !eq(got, tc.want) {
				t.Errorf("seqs = %v, want %v", got, tc.want)
			}
		})
	}

	// Short and full type names; unknown ones are refused.
	for name, want := range map[string]string{
		"LedgerWithdrawn":                        "triplane.v1.LedgerWithdrawn",
		"triplane.v1.LedgerWithdrawn":            "triplane.v1.LedgerWithdrawn",
		"type.googleapis.com/triplane.v1.Health": "triplane.v1.Health",
	} {
		if got, err := ResolveType(name); err != nil || got != want {
			t.Errorf("ResolveType(%q) = %q, %v; want %q", name, got, err, want)
		}
	}
	for _, bad := range []string{"LedgerWithdrawnn", "triplane.v1.Nope"} {
		if _, err := ResolveType(bad); !errors.Is(err, ErrUnknownType) || !strings.Contains(err.Error(), bad) {
			t.Errorf("ResolveType(%q) = %v, want ErrUnknownType naming it", bad, err)
		}
	}

	err := f.r.Events(ctxT(t), "ledger", "nobody", Filter{}, func(*Event) error { return nil })
	if !errors.Is(err, ErrNoActor) || !strings.Contains(err.Error(), "ledger/nobody") {
		t.Errorf("events of a missing actor: %v", err)
	}
	err = f.r.Events(ctxT(t), "ledger", "bad.id", Filter{}, func(*Event) error { return nil })
	if !errors.Is(err, journal.ErrBadName) {
		t.Errorf("events of a bad id: %v", err)
	}

	// Text and JSON forms of one event.
	var evs []*Event
	if err := f.r.Events(ctxT(t), "ledger", "a", Filter{From: 3, To: 3}, func(e *Event) error {
		evs = append(evs, e)
		return nil
	}); err != nil || len(evs) != 1 {
		t.Fatalf("event 3: %v %v", evs, err)
	}
	var buf bytes.Buffer
	if err := WriteEvent(&buf, evs[0], false); err != nil {
		t.Fatal(err)
	}
	if line := buf.String(); !regexp.MustCompile(`^3\s+2025-03-14T09:26:55Z\s+LedgerWithdrawn\s+\{"amount":"3"\}\s+command=cmd-a\n$`).MatchString(line) {
		t.Errorf("text line %q", line)
	}
	buf.Reset()
	if err := WriteEvent(&buf, evs[0], true); err != nil {
		t.Fatal(err)
	}
	want := `{"kind":"ledger","id":"a","seq":3,"time":"2025-03-14T09:26:55Z","type":"triplane.v1.LedgerWithdrawn","command_id":"cmd-a","stream_seq":` +
		itoa(f.pos["a"][2].Stream) + `,"event":{"amount":"3"}}` + "\n"
	if buf.String() != want {
		t.Errorf("json line\n%s\nwant\n%s", buf.String(), want)
	}
}

func itoa(u uint64) string { b, _ := json.Marshal(u); return string(b) }

func ledgerState(t *testing.T, s *State) *triplanev1.LedgerState {
	t.Helper()
	ls, ok := s.Msg.(*triplanev1.LedgerState)
	if !ok {
		t.Fatalf("state is %T", s.Msg)
	}
	return ls
}

func TestState(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	for _, tc := range []struct {
		name    string
		at      At
		seq     uint64
		when    time.Time
		balance int64
		applied uint64
	}{
		{"latest", At{}, 6, t0.Add(4 * time.Second), 22, 6},
		{"at seq", At{Seq: 3}, 3, t0.Add(2 * time.Second), 9, 3},
		{"mid-batch seq", At{Seq: 4}, 4, t0.Add(3 * time.Second), 10, 4},
		{"seq past the end", At{Seq: 99}, 6, t0.Add(4 * time.Second), 22, 6},
		{"at the time of an event", At{Time: t0.Add(3 * time.Second)}, 5, t0.Add(3 * time.Second), 12, 5},
		{"between events", At{Time: t0.Add(1500 * time.Millisecond)}, 2, t0.Add(time.Second), 12, 2},
		{"before the first", At{Time: t0.Add(-time.Second)}, 0, time.Time{}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := f.r.State(ctx, "ledger", "a", tc.at)
			if err != nil {
				t.Fatal(err)
			}
			ls := ledgerState(t, s)
			if s.Seq != tc.seq || !s.Time.Equal(tc.when) || ls.Balance != tc.balance || ls.Applied != tc.applied || s.Highest != 6 {
				t.Errorf("state = seq %d at %v %v (highest %d), want seq %d at %v balance %d applied %d",
					s.Seq, s.Time, ls, s.Highest, tc.seq, tc.when, tc.balance, tc.applied)
			}
		})
	}

	s, err := f.r.State(ctx, "ledger", "a", At{Seq: 3})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteState(&buf, s, false); err != nil {
		t.Fatal(err)
	}
	want := "ledger/a at seq 3 of 6, command time 2025-03-14T09:26:55Z: triplane.v1.LedgerState\n" +
		"{\n  \"balance\": \"9\",\n  \"applied\": \"3\",\n  \"interest_payments\": \"0\"\n}\n"
	if buf.String() != want {
		t.Errorf("state text:\n%s\nwant:\n%s", buf.String(), want)
	}
	buf.Reset()
	if err := WriteState(&buf, s, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"seq":3`) || !strings.Contains(buf.String(), `"state":{"balance":"9","applied":"3"}`) {
		t.Errorf("state json: %s", buf.String())
	}

	if _, err := f.r.State(ctx, "nosuchkind", "a", At{}); !errors.Is(err, ErrUnknownKind) || !strings.Contains(err.Error(), "ledger") {
		t.Errorf("unknown kind: %v", err)
	}
	if _, err := f.r.State(ctx, "ledger", "zz", At{}); !errors.Is(err, ErrNoActor) {
		t.Errorf("missing actor: %v", err)
	}
}

func openSnaps(t *testing.T) *journal.Snapshots {
	t.Helper()
	s, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func saveSnap(t *testing.T, s *journal.Snapshots, id string, state proto.Message, pos journal.Position) {
	t.Helper()
	snap, err := actors.NewSnapshot(ledger.Machine{}, id, state, pos, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(snap); err != nil {
		t.Fatal(err)
	}
}

func findCheck(t *testing.T, rep *VerifyReport, actor string) Check {
	t.Helper()
	for _, c := range rep.Checks {
		if c.Actor() == actor {
			return c
		}
	}
	t.Fatalf("no check of %s in %+v", actor, rep.Checks)
	return Check{}
}

func TestVerifyOK(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	f.r.Snapshots = openSnaps(t)
	// Correct snapshots: ledger/a after its third command (seq 3), ledger/b
	// at its end.
	saveSnap(t, f.r.Snapshots, "a", &triplanev1.LedgerState{Balance: 9, Applied: 3}, f.pos["a"][2])
	saveSnap(t, f.r.Snapshots, "b", &triplanev1.LedgerState{Balance: 60, Applied: 2}, f.pos["b"][1])

	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || rep.Events != 9 || rep.Snapshots != 2 || len(rep.Checks) != 3 {
		t.Fatalf("report not OK: %+v\n%s", rep, buf.String())
	}
	for _, c := range rep.Checks {
		if c.Status != StatusOK {
			t.Errorf("%s: %s %v", c.Actor(), c.Status, c.Notes)
		}
	}
	if c := findCheck(t, rep, "ledger/a"); c.SnapshotSeq != 3 || c.Replayed != 6 {
		t.Errorf("ledger/a check: %+v", c)
	}
	if !strings.Contains(buf.String(), "verify: 3 actors, 9 events replayed, 2 snapshots checked: no divergence") {
		t.Errorf("report:\n%s", buf.String())
	}
}

func TestVerifyDivergence(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	snaps := openSnaps(t)
	f.r.Snapshots = snaps
	// ledger/a: the state at seq 2 saved as seq 3.
	saveSnap(t, snaps, "a", &triplanev1.LedgerState{Balance: 12, Applied: 2}, f.pos["a"][2])
	// ledger/b: a state the journal never had.
	saveSnap(t, snaps, "b", &triplanev1.LedgerState{Balance: 999, Applied: 2}, f.pos["b"][1])
	// ledger/c: corrupt.
	saveSnap(t, snaps, "c", &triplanev1.LedgerState{Balance: 1, Applied: 1}, f.pos["c"][0])
	if err := snaps.Corrupt("ledger", "c"); err != nil {
		t.Fatal(err)
	}
	// ledger/ghost: a snapshot without a journal.
	saveSnap(t, snaps, "ghost", &triplanev1.LedgerState{Balance: 1, Applied: 1}, journal.Position{Seq: 1, Stream: 1})

	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if rep.OK() || rep.Faults != 4 {
		t.Fatalf("want 4 faults:\n%s", out)
	}

	a := findCheck(t, rep, "ledger/a")
	if a.Status != StatusDiverged || a.DivergedAt != 3 || !a.MatchesAtFound || a.MatchesAt != 2 {
		t.Errorf("ledger/a: %+v", a)
	}
	b := findCheck(t, rep, "ledger/b")
	wantDiff := []FieldDiff{{Path: "balance", Snapshot: `"999"`, Journal: `"60"`}}
	if b.Status != StatusDiverged || b.DivergedAt != 2 || !eq(b.Diff, wantDiff) || b.MatchesAtFound {
		t.Errorf("ledger/b: %+v", b)
	}
	if c := findCheck(t, rep, "ledger/c"); c.Status != StatusCorrupt || !strings.Contains(strings.Join(c.Notes, " "), "checksum") {
		t.Errorf("ledger/c: %+v", c)
	}
	if g := findCheck(t, rep, "ledger/ghost"); g.Status != StatusDiverged || g.DivergedAt != 1 {
		t.Errorf("ledger/ghost: %+v", g)
	}
	for _, want := range []string{
		"ledger/a", "DIVERGED", "equals the journal's state at seq 2",
		`balance: snapshot "999", journal "60"`, "at or before seq 2",
		"CORRUPT", "unreadable", "no events of this actor",
		"4 actor(s) with problems",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestVerifyJournalShorterAndWrongPosition(t *testing.T) {
	f := newFixture(t)
	snaps := openSnaps(t)
	f.r.Snapshots = snaps
	// ledger/c has one event; its snapshot claims seq 5.
	saveSnap(t, snaps, "c", &triplanev1.LedgerState{Balance: 1, Applied: 1}, journal.Position{Seq: 5, Stream: f.pos["c"][0].Stream})
	// ledger/b: right state, wrong journal position.
	saveSnap(t, snaps, "b", &triplanev1.LedgerState{Balance: 60, Applied: 2}, journal.Position{Seq: 2, Stream: f.pos["b"][0].Stream})
	rep, err := f.r.Verify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if c := findCheck(t, rep, "ledger/c"); c.Status != StatusDiverged || c.DivergedAt != 2 ||
		!strings.Contains(strings.Join(c.Notes, " "), "the journal is shorter than the snapshot") {
		t.Errorf("ledger/c: %+v", c)
	}
	if b := findCheck(t, rep, "ledger/b"); b.Status != StatusDiverged || !strings.Contains(strings.Join(b.Notes, " "), "journal position") {
		t.Errorf("ledger/b: %+v", b)
	}
	if a := findCheck(t, rep, "ledger/a"); a.Status != StatusOK || a.HasSnapshot {
		t.Errorf("ledger/a: %+v", a)
	}
}

func TestUnknownEventType(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	last := f.pos["c"][0]
	bad := &triplanev1.EventBatch{CommandId: "drift", TimeUnixNanos: t0.Add(5 * time.Second).UnixNano(),
		Events: []*triplanev1.Event{{Payload: &anypb.Any{TypeUrl: "type.googleapis.com/triplane.v1.NoSuchEvent", Value: []byte{8, 1}}}}}
	if _, err := f.j.Append(ctx, "ledger", "c", last, bad); err != nil {
		t.Fatal(err)
	}
	check := func(what string, err error) {
		t.Helper()
		var de *journal.DecodeError
		if !errors.As(err, &de) || de.Seq != 2 || de.Subject != "triplane.journal.ledger.c" ||
			!strings.Contains(err.Error(), "triplane.journal.ledger.c event seq 2") || !strings.Contains(err.Error(), "triplane.v1.NoSuchEvent") {
			t.Errorf("%s: want a DecodeError naming the subject and seq 2, got %v", what, err)
		}
	}
	n := 0
	err := f.r.Events(ctx, "ledger", "c", Filter{}, func(*Event) error { n++; return nil })
	check("events", err)
	if n != 1 {
		t.Errorf("events before the bad one: %d, want 1", n)
	}
	// A type filter that leaves the bad event out does not trip on it.
	if got := f.events(t, "c", Filter{Type: "triplane.v1.LedgerDeposited"}); !eq(got, []uint64{1}) {
		t.Errorf("filtered events = %v", got)
	}
	_, err = f.r.State(ctx, "ledger", "c", At{})
	check("state", err)
	if s, err := f.r.State(ctx, "ledger", "c", At{Seq: 1}); err != nil || s.Seq != 1 {
		t.Errorf("state before the bad event: %v %v", s, err)
	}
	_, err = f.r.Timeline(ctx, []actors.Address{{Kind: "ledger", ID: "c"}}, Filter{}, 0)
	check("timeline", err)

	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := findCheck(t, rep, "ledger/c")
	if c.Status != StatusFailed || c.DivergedAt != 2 || !strings.Contains(strings.Join(c.Notes, " "), "triplane.journal.ledger.c event seq 2") || rep.OK() {
		t.Errorf("verify: %+v", c)
	}
}

func TestTimeline(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	addrs := []actors.Address{{Kind: "ledger", ID: "a"}, {Kind: "ledger", ID: "b"}}
	tl, err := f.r.Timeline(ctx, addrs, Filter{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, e := range tl.Events {
		order = append(order, e.ID+itoa(e.Seq))
	}
	if want := []string{"a1", "b1", "a2", "a3", "b2", "a4", "a5", "a6"}; !eq(order, want) {
		t.Fatalf("order = %v, want %v", order, want)
	}
	if tl.Truncated() || !tl.Start.Equal(t0) || !tl.End.Equal(t0.Add(4*time.Second)) {
		t.Errorf("timeline %+v", tl)
	}

	var buf bytes.Buffer
	if err := tl.WriteMermaid(&buf); err != nil {
		t.Fatal(err)
	}
	mm := buf.String()
	for _, want := range []string{
		"sequenceDiagram\n",
		"participant A0 as ledger/a\n",
		"participant A1 as ledger/b\n",
		"Note over A0,A1: 2025-03-14 (UTC)\n",
		`Note over A0: seq 1, 09:26:53.000, LedgerDeposited {"amount":"5"}` + "\n",
		`Note over A1: seq 2, 09:26:55.500, LedgerWithdrawn {"amount":"40"}` + "\n",
		`Note over A0: seq 6, 09:26:57.000, LedgerInterestPaid {"amount":"10"}` + "\n",
	} {
		if !strings.Contains(mm, want) {
			t.Errorf("mermaid lacks %q:\n%s", want, mm)
		}
	}
	if strings.Index(mm, "seq 2, 09:26:55.500") < strings.Index(mm, "seq 3, 09:26:55.000") {
		t.Errorf("mermaid notes are not in time order:\n%s", mm)
	}

	// The limit cuts each actor and says so.
	tl, err = f.r.Timeline(ctx, addrs, Filter{}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(tl.Events) != 4 || !tl.Lanes[0].Truncated || tl.Lanes[0].LastSeq != 2 || tl.Lanes[1].Truncated {
		t.Errorf("limited timeline: %d events, lanes %+v", len(tl.Events), tl.Lanes)
	}
	buf.Reset()
	if err := tl.WriteMermaid(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "truncated: the first 2 events (up to seq 2 of 6)") {
		t.Errorf("no truncation note:\n%s", buf.String())
	}
	buf.Reset()
	if err := tl.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "truncated to the first 2 events") {
		t.Errorf("HTML does not say it is truncated")
	}

	if _, err := f.r.Timeline(ctx, []actors.Address{{Kind: "ledger", ID: "nobody"}}, Filter{}, 0); !errors.Is(err, ErrNoActor) {
		t.Errorf("timeline of a missing actor: %v", err)
	}
}

func TestTimelineHTMLEscapesAndIsSelfContained(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	// A field and a command id that would be markup if not escaped.
	appendBatch(t, f.j, "probe", "p1", journal.Position{}, t0.Add(1200*time.Millisecond), `<script>alert("cmd")</script>`,
		&triplanev1.Health{State: triplanev1.HealthState_HEALTH_STATE_DRAINING, Reason: `<script>alert("x")</script> & "quotes"`})
	tl, err := f.r.Timeline(ctx, []actors.Address{{Kind: "ledger", ID: "a"}, {Kind: "probe", ID: "p1"}}, Filter{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := tl.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	page := buf.String()
	low := strings.ToLower(page)
	for _, bad := range []string{"<script", "<link", "src=", "http://", "https://", "@import", "url("} {
		if strings.Contains(low, bad) {
			t.Errorf("HTML contains %q: not self-contained or not escaped", bad)
		}
	}
	for _, want := range []string{
		"<!DOCTYPE html>", "<style>", "&lt;script&gt;alert(", "ledger/a", "probe/p1",
		"LedgerDeposited", "triplane.v1.Health", "HEALTH_STATE_DRAINING", `class="ev c`, "left: 0.000%", "left: 100.000%",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("HTML lacks %q", want)
		}
	}
	if n := strings.Count(page, `<a class="ev`); n != 7 {
		t.Errorf("HTML has %d event marks, want 7", n)
	}

	buf.Reset()
	if err := tl.WriteMermaid(&buf); err != nil {
		t.Fatal(err)
	}
	if mm := buf.String(); strings.Contains(mm, "<script") || !strings.Contains(mm, "#lt;script#gt;") {
		t.Errorf("mermaid does not escape markup:\n%s", mm)
	}
}

func TestDiffStates(t *testing.T) {
	a := &triplanev1.NodeInfo{
		Identity:  &triplanev1.NodeIdentity{NodeId: "n1", Namespace: "prod"},
		Endpoints: []*triplanev1.Endpoint{{Address: "a:1"}, {Address: "b:2"}},
	}
	b := proto.Clone(a).(*triplanev1.NodeInfo)
	b.Identity.NodeId = "n2"
	b.Endpoints[1].Address = "c:3"
	b.Endpoints = append(b.Endpoints, &triplanev1.Endpoint{Address: "d:4"})
	b.Health = &triplanev1.Health{Reason: "x"}
	d, err := DiffStates(a, b)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, x := range d {
		got = append(got, x.String())
	}
	want := []string{
		`endpoints[1].address: snapshot "b:2", journal "c:3"`,
		`endpoints[2].address: snapshot (absent), journal "d:4"`,
		`endpoints[2].protocol: snapshot (absent), journal "PROTOCOL_UNSPECIFIED"`,
		`health: snapshot null, journal (absent)`,
		`health.reason: snapshot (absent), journal "x"`,
		`health.since_unix_nanos: snapshot (absent), journal "0"`,
		`health.state: snapshot (absent), journal "HEALTH_STATE_UNSPECIFIED"`,
		`identity.node_id: snapshot "n1", journal "n2"`,
	}
	if !eq(got, want) {
		t.Errorf("diff:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestOpenDataDir reads a stopped node's data dir: its JetStream store
// through an embedded server, its snapshot store, under its lock.
func TestOpenDataDir(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: filepath.Join(dir, "nats")})
	if err != nil {
		t.Fatal(err)
	}
	n := planetest.NATS{NATS: srv}
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string][]journal.Position{}
	writeLedgers(t, j, pos)
	srv.Close()
	snaps, err := journal.OpenSnapshots(filepath.Join(dir, "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	saveSnap(t, snaps, "b", &triplanev1.LedgerState{Balance: 60, Applied: 2}, pos["b"][1])
	if err := snaps.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := Open(ctx, Options{DataDir: dir, Registry: all.Registry()})
	if err != nil {
		t.Fatal(err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 3 || list[1].SnapshotSeq != 2 {
		t.Fatalf("list: %+v %v", list, err)
	}
	rep, err := s.Verify(ctx)
	if err != nil || !rep.OK() || rep.Snapshots != 1 {
		t.Fatalf("verify: %+v %v", rep, err)
	}
	// The session holds the lock: a `triplane up` cannot start on it.
	var inUse *system.DataDirInUseError
	if _, err := system.LockDataDir(dir); !errors.As(err, &inUse) {
		t.Errorf("lock while a session is open: %v", err)
	}
	s.Close()

	// A running node's lock stops a session, with the node's error.
	unlock, err := system.LockDataDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctx, Options{DataDir: dir, Registry: all.Registry()})
	unlock()
	if !errors.As(err, &inUse) || !strings.Contains(err.Error(), "--nats") {
		t.Errorf("open a locked data dir: %v", err)
	}

	if _, err := Open(ctx, Options{DataDir: filepath.Join(dir, "nope")}); !errors.Is(err, ErrNoData) {
		t.Errorf("missing data dir: %v", err)
	}
	if _, err := Open(ctx, Options{DataDir: t.TempDir()}); !errors.Is(err, ErrNoData) || !strings.Contains(err.Error(), "JetStream store") {
		t.Errorf("data dir without a store: %v", err)
	}
	if _, err := Open(ctx, Options{DataDir: dir, Journal: journal.Config{Stream: "OTHER"}}); !errors.Is(err, ErrNoJournal) || !strings.Contains(err.Error(), "OTHER") {
		t.Errorf("missing stream: %v", err)
	}
	if _, err := Open(ctx, Options{DataDir: dir, Journal: journal.Config{Prefix: "other"}}); !errors.Is(err, ErrNoJournal) || !strings.Contains(err.Error(), "--journal-prefix") {
		t.Errorf("wrong prefix: %v", err)
	}
}

// TestOpenNATSKeepsStreamConfig opens a running system's journal without
// changing its stream.
func TestOpenNATSKeepsStreamConfig(t *testing.T) {
	ctx := ctxT(t)
	n := planetest.StartNATS(t)
	if _, err := journal.Open(ctx, n.Connect(t), journal.Config{Duplicates: 5 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, Options{NATSURL: n.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if d := s.Journal.Config().Duplicates; d != 5*time.Minute {
		t.Errorf("duplicates window = %v, want the stream's 5m", d)
	}
	if s.Snapshots != nil {
		t.Errorf("snapshots opened without being asked for")
	}
}

// Opening a journal whose stream an operator changed (another subject,
// limits, a description) changes nothing of it.
func TestOpenLeavesTheStreamAsItIs(t *testing.T) {
	ctx := ctxT(t)
	n := planetest.StartNATS(t)
	js, err := jetstream.New(n.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	want := jetstream.StreamConfig{Name: DefaultJournalStream, Subjects: []string{"triplane.journal.>", "ops.other"},
		MaxBytes: 1 << 30, MaxAge: 720 * time.Hour, Discard: jetstream.DiscardNew, Storage: jetstream.FileStorage, Description: "ops"}
	if _, err := js.CreateStream(ctx, want); err != nil {
		t.Fatal(err)
	}
	before, err := js.Stream(ctx, DefaultJournalStream)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, Options{NATSURL: n.URL()})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	after, err := js.Stream(ctx, DefaultJournalStream)
	if err != nil {
		t.Fatal(err)
	}
	if b, a := before.CachedInfo().Config, after.CachedInfo().Config; !reflect.DeepEqual(a, b) {
		t.Fatalf("stream config changed by opening:\nbefore %+v\nafter  %+v", b, a)
	}
}

// TestVerifyCompacted: a journal whose oldest events were deleted after a
// snapshot cannot be replayed from the start; recovery from the snapshot is
// checked instead.
func TestVerifyCompacted(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	snaps := openSnaps(t)
	f.r.Snapshots = snaps
	// ledger/a: snapshot at seq 3, events up to 3 deleted: fine.
	saveSnap(t, snaps, "a", &triplanev1.LedgerState{Balance: 9, Applied: 3}, f.pos["a"][2])
	if err := f.j.DeleteTo(ctx, "ledger", "a", 3); err != nil {
		t.Fatal(err)
	}
	// ledger/b: snapshot at seq 1, events up to 2 deleted: seq 2 is lost.
	saveSnap(t, snaps, "b", &triplanev1.LedgerState{Balance: 100, Applied: 1}, f.pos["b"][0])
	if err := f.j.DeleteTo(ctx, "ledger", "b", 2); err != nil {
		t.Fatal(err)
	}
	// ledger/c: no snapshot, its only event deleted.
	if err := f.j.DeleteTo(ctx, "ledger", "c", 1); err != nil {
		t.Fatal(err)
	}
	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	_ = rep.WriteText(&buf)
	if a := findCheck(t, rep, "ledger/a"); a.Status != StatusSkipped || a.Replayed != 3 ||
		!strings.Contains(strings.Join(a.Notes, " "), "recovery from it applies 3 later events, to seq 6") {
		t.Errorf("ledger/a: %+v", a)
	}
	if b := findCheck(t, rep, "ledger/b"); b.Status != StatusFailed || !strings.Contains(strings.Join(b.Notes, " "), "events 2 to 2 are lost") {
		t.Errorf("ledger/b: %+v", b)
	}
	if c := findCheck(t, rep, "ledger/c"); c.Status != StatusFailed || !strings.Contains(strings.Join(c.Notes, " "), "no snapshot: it cannot be recovered") {
		t.Errorf("ledger/c: %+v", c)
	}
	if rep.Faults != 2 {
		t.Errorf("faults = %d, want 2:\n%s", rep.Faults, buf.String())
	}
	for _, id := range []string{"a", "c"} {
		if _, err := f.r.State(ctx, "ledger", id, At{}); err == nil || !strings.Contains(err.Error(), "oldest events were deleted") {
			t.Errorf("state of compacted ledger/%s: %v", id, err)
		}
	}
}

// One actor whose last message is not the journal's (garbage on its
// subject) is reported as that actor's failure; list and verify still
// cover the others.
func TestDamagedActorDoesNotHideTheOthers(t *testing.T) {
	ctx := ctxT(t)
	n := planetest.StartNATS(t)
	nc := n.Connect(t)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{j: j, r: &Replayer{Journal: j, Registry: all.Registry()}, pos: map[string][]journal.Position{}}
	writeLedgers(t, j, f.pos)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, j.Subject("ledger", "c"), []byte{0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	// And a subject no actor of this journal can have.
	if _, err := js.Publish(ctx, "triplane.journal.x/y.z", nil); err != nil {
		t.Fatal(err)
	}
	list, err := f.r.List(ctx)
	if err != nil || len(list) != 4 || list[2].Err == nil || list[3].Err == nil || list[0].Err != nil || list[0].Highest != 6 {
		t.Fatalf("list: %+v %v", list, err)
	}
	var out bytes.Buffer
	if err := WriteActors(&out, list, false); err != nil || !strings.Contains(out.String(), "unreadable") {
		t.Errorf("list text: %v\n%s", err, out.String())
	}
	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Faults != 2 || rep.Checks[2].Status != StatusFailed || rep.Checks[0].Status != StatusOK {
		t.Fatalf("verify: %+v", rep.Checks)
	}
}

// Verify on a running system checks each actor up to the highest sequence
// it listed: events appended meanwhile are not "lost".
func TestVerifyWhileTheJournalGrows(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	infos, err := f.j.Actors(ctx)
	if err != nil {
		t.Fatal(err)
	}
	info := infos[2] // ledger/c, one event
	appendBatch(t, f.j, "ledger", "c", f.pos["c"][0], t0.Add(time.Hour), "late", &triplanev1.LedgerDeposited{Amount: 1})
	if c := f.r.verifyActor(ctx, "ledger", "c", &info, false, nil, nil); c.Status != StatusOK || c.Replayed != 1 {
		t.Fatalf("an actor that went on during verify: %s %v", c.Status, c.Notes)
	}
}

// A router snapshot taken before RouterState.workers holds its counters in
// the per_worker map. Verify upgrades it before comparing, and recovery
// from it goes on counting; a snapshot in that form with a wrong counter
// still diverges.
func TestVerifyUpgradesOldRouterSnapshots(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	f.r.Snapshots = openSnaps(t)
	var pos journal.Position
	for i, w := range []string{"b", "a", "b"} {
		pos = appendBatch(t, f.j, routerm.Kind, "r", pos, t0.Add(time.Duration(i)*time.Second), "route-"+w,
			&triplanev1.RouteDecided{RequestId: "q" + w, Worker: w, Blocks: 1})
	}
	old := func(b uint64) *triplanev1.RouterState {
		return &triplanev1.RouterState{Id: "r", Decisions: 3, Blocks: 3, PerWorker: map[string]uint64{"a": 1, "b": b}}
	}
	save := func(st *triplanev1.RouterState) {
		snap, err := actors.NewSnapshot(routerm.Machine{}, "r", st, pos, t0)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.r.Snapshots.Save(snap); err != nil {
			t.Fatal(err)
		}
	}
	save(old(2))
	rep, err := f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c := findCheck(t, rep, "router/r"); c.Status != StatusOK || c.SnapshotSeq != 3 {
		t.Fatalf("old-form snapshot: %s %v", c.Status, c.Notes)
	}
	rec, err := actors.Recover(ctx, f.j, f.r.Snapshots, routerm.Machine{}, "r", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := &triplanev1.RouterState{Id: "r", Decisions: 3, Blocks: 3,
		Workers: []*triplanev1.WorkerDecisions{{Worker: "a", Decisions: 1}, {Worker: "b", Decisions: 2}}}
	if rec.FromSnapshot != 3 || !proto.Equal(rec.State, want) {
		t.Fatalf("recovered from seq %d: %v, want %v", rec.FromSnapshot, rec.State, want)
	}

	save(old(5))
	rep, err = f.r.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c := findCheck(t, rep, "router/r"); c.Status != StatusDiverged {
		t.Fatalf("old-form snapshot with a wrong counter: %s %v", c.Status, c.Notes)
	}
}
