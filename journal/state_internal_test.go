package journal

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// A stored state reads back; a damaged one is an error naming it and what
// is wrong, never a half-decoded message.
func TestStateRoundTripAndCorruption(t *testing.T) {
	s, err := OpenSnapshots(filepath.Join(t.TempDir(), "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.LoadState("view", &triplanev1.LedgerState{}); !errors.Is(err, ErrNoState) {
		t.Fatalf("nothing stored: %v, want ErrNoState", err)
	}
	if err := s.SaveState("view", &triplanev1.LedgerState{Balance: 42, Applied: 7}); err != nil {
		t.Fatal(err)
	}
	got := &triplanev1.LedgerState{}
	if err := s.LoadState("view", got); err != nil || got.Balance != 42 || got.Applied != 7 {
		t.Fatalf("round trip: %v %v", got, err)
	}
	good := seal([]byte("x"))
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)-1] ^= 1
	for _, c := range []struct {
		name string
		val  []byte
		want string
	}{
		{"short", []byte{1, 2}, "too short"},
		{"flipped", flipped, "checksum mismatch"},
	} {
		if err := s.db.Set([]byte("state/view"), c.val, pebble.Sync); err != nil {
			t.Fatal(err)
		}
		err := s.LoadState("view", &triplanev1.LedgerState{})
		if err == nil || !strings.Contains(err.Error(), "state view is corrupt") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s value: %v, want it corrupt: %s", c.name, err, c.want)
		}
	}
}
