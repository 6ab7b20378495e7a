package sim_test

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/sim"
)

// commands draws a seeded mix of ledger commands, including rejected ones.
func commands(seed uint64, n int) []proto.Message {
	r := rand.New(rand.NewPCG(seed, 1))
	var out []proto.Message
	for range n {
		switch r.IntN(4) {
		case 0, 1:
			out = append(out, &triplanev1.LedgerDeposit{Amount: r.Int64N(100) - 5})
		case 2:
			out = append(out, &triplanev1.LedgerWithdraw{Amount: r.Int64N(150)})
		case 3:
			out = append(out, &triplanev1.LedgerSplit{Amounts: []int64{r.Int64N(9) + 1, r.Int64N(9) + 1}})
		}
	}
	return out
}

func TestHarnessIsDeterministic(t *testing.T) {
	run := func(seed uint64) (proto.Message, time.Time) {
		h := sim.NewHarness(ledger.Machine{}, "a", seed)
		for _, c := range commands(seed, 300) {
			_, _ = h.Command(c)
			if err := h.CheckReplay(); err != nil {
				t.Fatal(err)
			}
		}
		return h.State(), h.Now()
	}
	s1, t1 := run(42)
	s2, t2 := run(42)
	if !proto.Equal(s1, s2) || !t1.Equal(t2) {
		t.Fatalf("same seed, different runs: %v@%v vs %v@%v", s1, t1, s2, t2)
	}
}

func TestHarnessTimers(t *testing.T) {
	h := sim.NewHarness(ledger.Machine{}, "a", 1)
	if _, err := h.Command(&triplanev1.LedgerScheduleInterest{Amount: 3, DelayMillis: 1000}); err != nil {
		t.Fatal(err)
	}
	h.Advance(999 * time.Millisecond)
	if h.State().(*triplanev1.LedgerState).Balance != 0 {
		t.Fatal("timer fired early")
	}
	h.Advance(time.Second)
	if s := h.State().(*triplanev1.LedgerState); s.Balance != 3 || s.InterestPayments != 1 {
		t.Fatalf("after the timer: %v", s)
	}
}

// The harness and the protoactor host reach the same state, and journal the
// same events, from the same commands.
func TestHarnessMatchesHost(t *testing.T) {
	n := planetest.StartNATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snaps"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer snaps.Close()
	const seed = 7
	host, err := actors.NewHost(actors.HostConfig{Journal: j, Snapshots: snaps, Registry: actors.NewRegistry(ledger.Machine{}),
		Seed: seed, SnapshotEvery: 50})
	if err != nil {
		t.Fatal(err)
	}
	harness := sim.NewHarness(ledger.Machine{}, "eq", seed)
	addr := actors.Address{Kind: ledger.Kind, ID: "eq"}
	for i, c := range commands(seed, 200) {
		hr, herr := host.Request(ctx, addr, c)
		sr, serr := harness.Command(c)
		if (herr == nil) != (serr == nil) || !proto.Equal(hr, sr) {
			t.Fatalf("command %d %v: host %v/%v, harness %v/%v", i, c, hr, herr, sr, serr)
		}
	}
	if err := host.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// The host's state, as recovered from its journal, equals the harness's.
	r, err := actors.Recover(ctx, j, nil, ledger.Machine{}, "eq", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r.State, harness.State()) {
		t.Fatalf("host state %v, harness state %v", r.State, harness.State())
	}
	var journaled []proto.Message
	err = j.Read(ctx, addr.Kind, addr.ID, journal.Query{}, func(rec *journal.Record) error {
		ev, err := rec.Decode()
		journaled = append(journaled, ev)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(journaled) != len(harness.Events()) {
		t.Fatalf("host journaled %d events, harness %d", len(journaled), len(harness.Events()))
	}
	for i := range journaled {
		if !proto.Equal(journaled[i], harness.Events()[i]) {
			t.Fatalf("event %d: host %v, harness %v", i+1, journaled[i], harness.Events()[i])
		}
	}
}
