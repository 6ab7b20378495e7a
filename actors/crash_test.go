package actors_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

// The crash test re-executes the test binary as a writer process.
const (
	crashChildEnv = "TRIPLANE_CRASH_CHILD"
	crashNATSEnv  = "TRIPLANE_CRASH_NATS"
	crashSnapsEnv = "TRIPLANE_CRASH_SNAPS"
)

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) == "1" {
		os.Exit(crashChild())
	}
	os.Exit(m.Run())
}

// crashChild recovers the ledger actor and deposits amount = applied+1 in a
// loop, printing "ack <seq> <amount>" after each acknowledged command, until
// it is killed.
func crashChild() int {
	ctx := context.Background()
	nc, err := nats.Connect(os.Getenv(crashNATSEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	snaps, err := journal.OpenSnapshots(os.Getenv(crashSnapsEnv), nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	h, err := actors.NewHost(actors.HostConfig{Journal: j, Snapshots: snaps, Registry: actors.NewRegistry(ledger.Machine{}),
		SnapshotEvery: 7})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	out := bufio.NewWriter(os.Stdout)
	r, err := h.Request(ctx, acct, &triplanev1.LedgerGet{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	applied := r.(*triplanev1.LedgerReply).Applied
	fmt.Fprintf(out, "start %d\n", applied)
	out.Flush()
	for {
		amount := int64(applied + 1)
		msg := proto.Message(&triplanev1.LedgerDeposit{Amount: amount})
		if amount%5 == 0 { // some commands write two events at once
			msg = &triplanev1.LedgerSplit{Amounts: []int64{amount, amount + 1}}
		}
		r, err := h.Request(ctx, acct, msg)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		applied = r.(*triplanev1.LedgerReply).Applied
		fmt.Fprintf(out, "ack %d\n", applied)
		out.Flush()
	}
}

// TestCrashSafety kills a persisting process with SIGKILL at random points
// many times. After every restart the recovered state must equal the fold
// of exactly the events in the journal, every acknowledged event must be
// there, and no command may be applied twice.
func TestCrashSafety(t *testing.T) {
	n := planetest.StartNATS(t)
	snapDir := filepath.Join(t.TempDir(), "snapshots")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2026, 11))
	const kills = 12
	var acked uint64
	for round := range kills {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"=1", crashNATSEnv+"="+n.URL(), crashSnapsEnv+"="+snapDir)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill after a random number of acknowledgements: mid-persist,
		// mid-snapshot or between commands, wherever that falls.
		target := 1 + rng.IntN(40)
		sc := bufio.NewScanner(out)
		seen := 0
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			v, _ := strconv.ParseUint(f[1], 10, 64)
			switch f[0] {
			case "start":
				if v < acked {
					t.Fatalf("round %d: recovered applied=%d but %d were acknowledged", round, v, acked)
				}
			case "ack":
				acked = v
				seen++
			}
			if seen >= target {
				break
			}
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if seen < target {
			t.Fatalf("round %d: child ended after %d acks:\n%s", round, seen, stderr.String())
		}
		checkJournal(t, ctx, j, snapDir, acked, round)
	}
	t.Logf("%d kills, %d events acknowledged", kills, acked)
}

func checkJournal(t *testing.T, ctx context.Context, j *journal.Journal, snapDir string, acked uint64, round int) {
	t.Helper()
	// Recovery as the next process will do it: from the snapshots the
	// killed process left (possibly mid-write) plus the journal. A publish
	// the child sent just before it died may still land after this (the
	// server reads what was already in its socket), so the comparison is
	// made against exactly the journal prefix recovery saw.
	snaps, err := journal.OpenSnapshots(snapDir, nil)
	if err != nil {
		t.Fatalf("round %d: snapshots after kill: %v", round, err)
	}
	defer snaps.Close()
	r, err := actors.Recover(ctx, j, snaps, ledger.Machine{}, acct.ID, nil)
	if err != nil {
		t.Fatalf("round %d: recover: %v", round, err)
	}
	if r.Pos.Seq < acked {
		t.Fatalf("round %d: recovered up to event %d, %d were acknowledged", round, r.Pos.Seq, acked)
	}
	var events []proto.Message
	amounts := map[int64]bool{}
	err = j.Read(ctx, acct.Kind, acct.ID, journal.Query{ToSeq: r.Pos.Seq}, func(rec *journal.Record) error {
		ev, err := rec.Decode()
		if err != nil {
			return err
		}
		a := ev.(*triplanev1.LedgerDeposited).Amount
		if amounts[a] {
			return fmt.Errorf("amount %d journaled twice (a command applied twice)", a)
		}
		amounts[a] = true
		events = append(events, ev)
		return nil
	})
	if err != nil {
		t.Fatalf("round %d: %v", round, err)
	}
	if uint64(len(events)) != r.Pos.Seq {
		t.Fatalf("round %d: journal prefix has %d events, recovery reached %d", round, len(events), r.Pos.Seq)
	}
	fold, err := actors.Fold(ledger.Machine{}, acct.ID, events...)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r.State, fold) {
		t.Fatalf("round %d: recovered %v (from snapshot %d), fold of the journal %v", round, r.State, r.FromSnapshot, fold)
	}
}
