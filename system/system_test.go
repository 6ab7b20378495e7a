package system_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/system"
)

func start(t *testing.T, dir string) *system.System {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := system.Start(ctx, system.Config{DataDir: dir, AdminAddr: "127.0.0.1:0", SnapshotEvery: 3})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A node hosts the built-in actors: their events survive a restart of the
// whole node, and the clean stop leaves a snapshot.
func TestNodeHostsActorsAcrossRestarts(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	addr := actors.Address{Kind: ledger.Kind, ID: "n1"}

	s := start(t, dir)
	for range 4 {
		if _, err := s.Host.Request(ctx, addr, &triplanev1.LedgerDeposit{Amount: 5}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := system.Start(ctx, system.Config{DataDir: dir, AdminAddr: "127.0.0.1:0"}); !errors.As(err, new(*system.DataDirInUseError)) {
		t.Fatalf("second node on the same data dir: %v", err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	s = start(t, dir)
	defer s.Close(ctx)
	snap, err := s.Snapshots.Load(addr.Kind, addr.ID, ledger.Machine{}.SchemaVersion())
	if err != nil || snap.Seq != 4 {
		t.Fatalf("snapshot after a clean stop: %v %v", snap, err)
	}
	r, err := s.Host.Request(ctx, addr, &triplanev1.LedgerGet{})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.(*triplanev1.LedgerReply); got.Balance != 20 || got.Applied != 4 {
		t.Fatalf("after restart: %v", got)
	}
}

// A wanted singleton goes to one placement group: the first of the node's,
// or the one it names.
func TestParseWant(t *testing.T) {
	for _, tc := range []struct {
		w      string
		groups []string
		want   string // group kind id, or the error's words
	}{
		{"router/main", nil, "default router main"},
		{"router/main", []string{"a", "b"}, "a router main"},
		{"b:router/main", []string{"a", "b"}, "b router main"},
		{"router/x/y", []string{"a"}, "expected kind/id"},
		{"c:router/main", []string{"a", "b"}, `not in placement group "c"`},
		{"router", nil, "expected kind/id"},
		{"router/", nil, "expected kind/id"},
		{"a:router main/x", []string{"a"}, "expected kind/id"},
	} {
		g, k, id, err := system.ParseWant(tc.w, tc.groups)
		got := g + " " + k + " " + id
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, tc.want) {
			t.Errorf("%q in %v: %s, want %s", tc.w, tc.groups, got, tc.want)
		}
	}
}
