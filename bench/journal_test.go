package bench_test

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/bench"
)

// A small run, so the benchmark's code path stays working; the figures are
// meaningless at this size.
func TestJournalBenchSmall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rs, err := bench.Journal(ctx, bench.JournalConfig{Sequential: 20, Actors: 10, PerActor: 4, InFlight: []int{1, 2}, Rounds: 1, RecoveryEvents: 1000, SnapshotTail: 100,
		Dir: t.TempDir()}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 8 {
		t.Fatalf("%d result lines, want 8", len(rs))
	}
	bench.Print(io.Discard, "small", rs)
}
