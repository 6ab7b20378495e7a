package journal_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

func snap(t *testing.T, id string, seq uint64, balance int64, schema uint32) *triplanev1.Snapshot {
	t.Helper()
	st, err := anypb.New(&triplanev1.LedgerState{Balance: balance, Applied: seq})
	if err != nil {
		t.Fatal(err)
	}
	return &triplanev1.Snapshot{Kind: "ledger", ActorId: id, Seq: seq, JournalPosition: seq, SchemaVersion: schema, State: st}
}

func TestSnapshotsNewestValidWins(t *testing.T) {
	var logs bytes.Buffer
	dir := filepath.Join(t.TempDir(), "snapshots")
	s, err := journal.OpenSnapshots(dir, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("ledger", "a", 1); !errors.Is(err, journal.ErrNoSnapshot) {
		t.Fatalf("load with no snapshot: %v", err)
	}
	for i, seq := range []uint64{10, 20, 30} {
		if err := s.Save(snap(t, "a", seq, int64(i+1), 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Save(snap(t, "b", 5, 50, 1)); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load("ledger", "a", 1)
	if err != nil || got.Seq != 30 {
		t.Fatalf("newest = %v %v, want seq 30", got, err)
	}
	// A corrupt newest snapshot falls back to the one before it (20; 10 was
	// pruned, Keep is 2).
	if err := s.Corrupt("ledger", "a"); err != nil {
		t.Fatal(err)
	}
	got, err = s.Load("ledger", "a", 1)
	if err != nil || got.Seq != 20 {
		t.Fatalf("after corrupting the newest: %v %v, want seq 20", got, err)
	}
	if !bytes.Contains(logs.Bytes(), []byte("checksum mismatch")) {
		t.Errorf("corruption not logged:\n%s", logs.String())
	}
	// Another schema version is not used.
	if _, err := s.Load("ledger", "b", 2); !errors.Is(err, journal.ErrNoSnapshot) {
		t.Fatalf("old-schema snapshot used: %v", err)
	}
	var listed []string
	err = s.Newest(func(kind, id string, sn *triplanev1.Snapshot, err error) error {
		listed = append(listed, kind+"/"+id)
		if id == "a" && err == nil {
			t.Errorf("newest of a should be reported corrupt")
		}
		if id == "b" && (err != nil || sn.Seq != 5) {
			t.Errorf("newest of b = %v %v", sn, err)
		}
		return nil
	})
	if err != nil || len(listed) != 2 {
		t.Fatalf("Newest listed %v, %v", listed, err)
	}
	// Survives a reopen.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = journal.OpenSnapshots(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err = s.Load("ledger", "b", 1)
	want := snap(t, "b", 5, 50, 1)
	if err != nil || !proto.Equal(got, want) {
		t.Fatalf("after reopen: %v %v", got, err)
	}
}

// After Close every operation returns ErrClosed rather than reaching the
// closed database (which panics): an actor's late final snapshot, after a
// stop that timed out, must not end the process.
func TestSnapshotsAfterClose(t *testing.T) {
	s, err := journal.OpenSnapshots(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	snap := &triplanev1.Snapshot{Kind: "k", ActorId: "a", Seq: 1}
	if err := s.Save(snap); err != nil {
		t.Fatalf("save before close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if err := s.Save(snap); !errors.Is(err, journal.ErrClosed) {
		t.Fatalf("save after close: %v", err)
	}
	if _, err := s.Load("k", "a", 0); !errors.Is(err, journal.ErrClosed) {
		t.Fatalf("load after close: %v", err)
	}
	if err := s.SaveState("x", snap); !errors.Is(err, journal.ErrClosed) {
		t.Fatalf("save state after close: %v", err)
	}
	if err := s.Newest(func(string, string, *triplanev1.Snapshot, error) error { return nil }); !errors.Is(err, journal.ErrClosed) {
		t.Fatalf("newest after close: %v", err)
	}
}

// Damaged store files give errors, never a panic: `triplane replay` reads
// stores that may have been cut off mid-write.
func TestSnapshotsCorruptFilesAreErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snapshots")
	s, err := journal.OpenSnapshots(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := s.Save(snap(t, fmt.Sprintf("a%d", i), 1, int64(i), 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ssts, _ := filepath.Glob(filepath.Join(dir, "*.sst"))
	if len(ssts) == 0 {
		t.Fatal("no table written")
	}
	for _, f := range ssts {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i := range min(len(b), 4096) {
			b[i] ^= 0x5a
		}
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, err = journal.OpenSnapshots(dir, nil)
	if err != nil {
		if !errors.Is(err, journal.ErrCorrupt) {
			t.Fatalf("opening a damaged store: %v, want ErrCorrupt", err)
		}
		return // refused at open
	}
	defer s.Close()
	err = s.Newest(func(string, string, *triplanev1.Snapshot, error) error { return nil })
	_, lerr := s.Load("ledger", "a1", 1)
	if !errors.Is(err, journal.ErrCorrupt) && !errors.Is(lerr, journal.ErrCorrupt) {
		t.Fatalf("a damaged table read: %v / %v, want ErrCorrupt", err, lerr)
	}
}

// A read-only open reads the store and changes none of its files.
func TestSnapshotsReadOnlyChangesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snapshots[1]") // not a pattern
	s, err := journal.OpenSnapshots(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(snap(t, "a", 3, 30, 1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	listing := func() string {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		for _, e := range entries {
			if e.Name() == "LOCK" {
				continue // taken and released: its time moves
			}
			info, _ := e.Info()
			fmt.Fprintf(&b, "%s %d %d\n", e.Name(), info.Size(), info.ModTime().UnixNano())
		}
		return b.String()
	}
	before := listing()
	ro, err := journal.OpenSnapshotsReadOnly(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ro.Load("ledger", "a", 1); err != nil || got.Seq != 3 {
		t.Fatalf("read-only load: %v %v", got, err)
	}
	if err := ro.Save(snap(t, "b", 1, 1, 1)); err == nil {
		t.Fatal("a read-only store took a write")
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if after := listing(); after != before {
		t.Fatalf("a read-only open changed the store:\nbefore\n%s\nafter\n%s", before, after)
	}
	// Nothing there: an error, and no store is created.
	empty := filepath.Join(t.TempDir(), "none")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := journal.OpenSnapshotsReadOnly(empty, nil); !errors.Is(err, journal.ErrNoStore) {
		t.Fatalf("a read-only open of an empty directory: %v, want ErrNoStore", err)
	}
	if entries, _ := os.ReadDir(empty); len(entries) != 0 {
		t.Fatalf("a read-only open wrote %d files into an empty directory", len(entries))
	}
}

// An id may hold '/': actor x/0's snapshots lie under actor x's key
// prefix, and must neither be pruned by x's saves nor read as x's, nor
// listed as another actor's. A kind may not hold '/'.
func TestSnapshotsOfIdsWithSlashes(t *testing.T) {
	s, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Save(snap(t, "x/0", 5, 50, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("ledger", "x", 1); !errors.Is(err, journal.ErrNoSnapshot) {
		t.Fatalf("x read x/0's snapshot: %v", err)
	}
	for seq := range uint64(4) {
		if err := s.Save(snap(t, "x", seq+1, 1, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := s.Load("ledger", "x/0", 1); err != nil || got.Seq != 5 {
		t.Fatalf("x/0 after x's saves pruned: %v %v", got, err)
	}
	if got, err := s.Load("ledger", "x", 1); err != nil || got.Seq != 4 {
		t.Fatalf("x: %v %v", got, err)
	}
	var listed []string
	err = s.Newest(func(kind, id string, snap *triplanev1.Snapshot, err error) error {
		listed = append(listed, fmt.Sprintf("%s|%s@%d", kind, id, snap.GetSeq()))
		return err
	})
	if err != nil || strings.Join(listed, " ") != "ledger|x/0@5 ledger|x@4" {
		t.Fatalf("newest: %v %v", listed, err)
	}
	bad := snap(t, "0", 1, 1, 1)
	bad.Kind = "w/x"
	if err := s.Save(bad); !errors.Is(err, journal.ErrBadName) {
		t.Fatalf("a kind with '/': %v", err)
	}
}
