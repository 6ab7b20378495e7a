package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// TestReplayDataDir writes ledger events into a `triplane up`'s journal,
// stops it, and replays its data dir.
func TestReplayDataDir(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Date(2025, 3, 14, 9, 26, 53, 0, time.UTC)

	u := startUp(t, dir)
	nc, err := nats.Connect(u.nats)
	if err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	appendTo := func(id string, after journal.Position, at time.Time, evs ...proto.Message) journal.Position {
		t.Helper()
		b, err := actors.NewBatch("cmd-"+id, at, evs)
		if err != nil {
			t.Fatal(err)
		}
		p, err := j.Append(ctx, "ledger", id, after, b)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	p1 := appendTo("acct-1", journal.Position{}, t0, &triplanev1.LedgerDeposited{Amount: 5})
	appendTo("acct-2", journal.Position{}, t0.Add(time.Second), &triplanev1.LedgerDeposited{Amount: 100})
	p1 = appendTo("acct-1", p1, t0.Add(2*time.Second), &triplanev1.LedgerWithdrawn{Amount: 2}, &triplanev1.LedgerDeposited{Amount: 4})

	// While up runs, its data dir is locked; its NATS can be read.
	p := start(t, nil, "replay", "list", "--data-dir", dir)
	if code, _ := p.wait(30 * time.Second); code != 1 ||
		!strings.Contains(p.stderr.String(), "is in use by another triplane process (pid") || !strings.Contains(p.stderr.String(), "--nats") {
		t.Errorf("replay of a running up's data dir: exit %d\n%s", code, p.stderr.String())
	}
	p = start(t, nil, "replay", "list", "--nats", u.nats)
	if code, out := p.wait(30 * time.Second); code != 0 || !strings.Contains(out, "acct-2") {
		t.Errorf("replay list --nats: exit %d\n%s%s", code, out, p.stderr.String())
	}
	nc.Close()
	u.stop(syscall.SIGTERM)

	p = start(t, nil, "replay", "list", "--data-dir", dir)
	code, out := p.wait(30 * time.Second)
	if code != 0 {
		t.Fatalf("replay list: exit %d\n%s", code, p.stderr.String())
	}
	for _, re := range []string{
		`(?m)^KIND\s+ID\s+HIGHEST SEQ\s+LAST EVENT\s+SNAPSHOT$`,
		`(?m)^ledger\s+acct-1\s+3\s+2025-03-14T09:26:55Z\s+-$`,
		`(?m)^ledger\s+acct-2\s+1\s+2025-03-14T09:26:54Z\s+-$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("replay list output lacks %s:\n%s", re, out)
		}
	}

	p = start(t, nil, "replay", "events", "ledger", "acct-1", "--data-dir", dir, "--json")
	code, out = p.wait(30 * time.Second)
	if code != 0 {
		t.Fatalf("replay events: exit %d\n%s", code, p.stderr.String())
	}
	type event struct {
		Kind, ID, Time, Type string
		Seq                  uint64
		Event                map[string]string
	}
	var got []event
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var e event
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("not a JSON line: %q: %v", line, err)
		}
		got = append(got, e)
	}
	want := []event{
		{"ledger", "acct-1", "2025-03-14T09:26:53Z", "triplane.v1.LedgerDeposited", 1, map[string]string{"amount": "5"}},
		{"ledger", "acct-1", "2025-03-14T09:26:55Z", "triplane.v1.LedgerWithdrawn", 2, map[string]string{"amount": "2"}},
		{"ledger", "acct-1", "2025-03-14T09:26:55Z", "triplane.v1.LedgerDeposited", 3, map[string]string{"amount": "4"}},
	}
	if len(got) != len(want) {
		t.Fatalf("events:\n%s", out)
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Kind != w.Kind || g.ID != w.ID || g.Time != w.Time || g.Type != w.Type || g.Seq != w.Seq || g.Event["amount"] != w.Event["amount"] {
			t.Errorf("event %d = %+v, want %+v", i, g, w)
		}
	}

	p = start(t, nil, "replay", "state", "ledger", "acct-1", "--at-seq", "2", "--data-dir", dir)
	if code, out := p.wait(30 * time.Second); code != 0 || !strings.Contains(out, "ledger/acct-1 at seq 2 of 3") || !strings.Contains(out, `"balance": "3"`) {
		t.Errorf("replay state: exit %d\n%s%s", code, out, p.stderr.String())
	}
	p = start(t, nil, "replay", "--verify", "--data-dir", dir)
	if code, out := p.wait(30 * time.Second); code != 0 || !strings.Contains(out, "verify: 2 actors, 4 events replayed") {
		t.Errorf("replay --verify: exit %d\n%s%s", code, out, p.stderr.String())
	}
	page := filepath.Join(t.TempDir(), "timeline.html")
	p = start(t, nil, "replay", "timeline", "ledger/acct-1", "ledger/acct-2", "--format", "html", "-o", page, "--data-dir", dir)
	if code, _ := p.wait(30 * time.Second); code != 0 {
		t.Errorf("replay timeline: exit %d\n%s", code, p.stderr.String())
	} else if b, err := os.ReadFile(page); err != nil || !strings.Contains(string(b), "ledger/acct-2") || strings.Count(string(b), `<a class="ev`) != 4 {
		t.Errorf("timeline page (%v):\n%s", err, b)
	}

	// Schema drift: an event type this binary does not know is an error
	// naming the subject and sequence, exit code 1.
	u = startUp(t, dir)
	nc, err = nats.Connect(u.nats)
	if err != nil {
		t.Fatal(err)
	}
	if j, err = journal.Open(ctx, nc, journal.Config{}); err != nil {
		t.Fatal(err)
	}
	drift := &triplanev1.EventBatch{TimeUnixNanos: t0.Add(3 * time.Second).UnixNano(),
		Events: []*triplanev1.Event{{Payload: &anypb.Any{TypeUrl: "type.googleapis.com/triplane.v1.NoSuchEvent"}}}}
	if _, err := j.Append(ctx, "ledger", "acct-1", p1, drift); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	u.stop(syscall.SIGTERM)
	for _, args := range [][]string{
		{"replay", "events", "ledger", "acct-1", "--data-dir", dir},
		{"replay", "state", "ledger", "acct-1", "--data-dir", dir},
		{"replay", "verify", "--data-dir", dir},
	} {
		p = start(t, nil, args...)
		code, out := p.wait(30 * time.Second)
		all := out + p.stderr.String()
		if code != 1 || !strings.Contains(all, "triplane.journal.ledger.acct-1 event seq 4") || !strings.Contains(all, "triplane.v1.NoSuchEvent") {
			t.Errorf("%v after schema drift: exit %d, want 1 and the subject and seq named:\n%s", args, code, all)
		}
	}
}

func TestReplayUsageErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope")
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"events missing id", []string{"replay", "events", "ledger"}, []string{"KIND and ID", "got 1 argument"}},
		{"events bad id", []string{"replay", "events", "ledger", "a.b"}, []string{"a.b"}},
		{"bad since", []string{"replay", "events", "ledger", "a", "--since", "yesterday"}, []string{"--since", "RFC 3339"}},
		{"since after until", []string{"replay", "events", "ledger", "a", "--since", "2025-01-02T00:00:00Z", "--until", "2025-01-01T00:00:00Z"}, []string{"not before --until"}},
		{"unknown type", []string{"replay", "events", "ledger", "a", "--type", "LedgerDepositd"}, []string{"LedgerDepositd", "unknown event type"}},
		{"bad from", []string{"replay", "events", "ledger", "a", "--from", "-1"}, []string{"from"}},
		{"state both points", []string{"replay", "state", "ledger", "a", "--at-seq", "1", "--at-time", "2025-01-01T00:00:00Z"}, []string{"not both"}},
		{"state seq 0", []string{"replay", "state", "ledger", "a", "--at-seq", "0"}, []string{"start at 1"}},
		{"timeline no actors", []string{"replay", "timeline"}, []string{"at least one actor"}},
		{"timeline not kind/id", []string{"replay", "timeline", "ledger"}, []string{"KIND/ID"}},
		{"timeline bad format", []string{"replay", "timeline", "ledger/a", "--format", "svg"}, []string{"format", "svg"}},
		{"timeline html to terminal", []string{"replay", "timeline", "ledger/a", "--format", "html"}, []string{"-o FILE"}},
		{"timeline limit", []string{"replay", "timeline", "ledger/a", "--limit", "0"}, []string{"limit"}},
		{"unknown replay command", []string{"replay", "lst"}, []string{`unknown replay command "lst"`}},
		{"list extra argument", []string{"replay", "list", "x"}, []string{"no arguments"}},
		{"nats and data dir", []string{"replay", "list", "--nats", "nats://127.0.0.1:1", "--data-dir", missing}, []string{"not both"}},
		{"bad nats url", []string{"replay", "list", "--nats", "localhost"}, []string{`"nats"`, "nats://"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, nil, tc.args...)
			code, _ := p.wait(30 * time.Second)
			stderr := p.stderr.String()
			if code != 2 {
				t.Errorf("exit code %d, want 2; stderr:\n%s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
		})
	}

	// --nats from the environment is named as such, next to --data-dir.
	p := start(t, []string{"TRIPLANE_NATS=nats://127.0.0.1:1"}, "replay", "list", "--data-dir", missing)
	if code, _ := p.wait(30 * time.Second); code != 2 || !strings.Contains(p.stderr.String(), "$TRIPLANE_NATS") {
		t.Errorf("nats from the environment and --data-dir: exit %d\n%s", code, p.stderr.String())
	}

	// Runtime problems exit 1 and name the problem.
	p = start(t, nil, "replay", "list", "--data-dir", missing)
	if code, _ := p.wait(30 * time.Second); code != 1 || !strings.Contains(p.stderr.String(), missing+" does not exist") {
		t.Errorf("missing data dir: exit %d\n%s", code, p.stderr.String())
	}
	if _, err := os.Stat(missing); err == nil {
		t.Errorf("replay created the missing data dir")
	}

	for _, cmd := range [][]string{{"replay", "--help"}, {"replay", "events", "--help"}, {"replay", "timeline", "--help"}} {
		p := start(t, nil, cmd...)
		code, out := p.wait(30 * time.Second)
		if code != 0 || !strings.Contains(out, "Usage:") || !strings.Contains(out, "Examples:") || !strings.Contains(out, "--data-dir") {
			t.Errorf("%v: exit %d\n%s", cmd, code, out)
		}
	}
}
