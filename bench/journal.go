// Package bench holds the benchmarks behind `triplane bench`. Each one runs
// its baseline in the same process against the same server and reports the
// ratio, because absolute figures on shared machines are noise.
package bench

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/embedded"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// JournalConfig sizes `triplane bench journal`.
type JournalConfig struct {
	// SyncAlways runs the embedded JetStream with fsync before every
	// acknowledgement (the `triplane up` default).
	SyncAlways bool
	// Sequential is the number of commands sent one after another to one
	// actor.
	Sequential int
	// Actors and PerActor size the concurrent run; InFlight lists how many
	// commands each actor has in flight at once (one run per value).
	Actors, PerActor int
	InFlight         []int
	// Rounds repeats every run and its baseline; medians are reported.
	Rounds int
	// RecoveryEvents is the history of the recovery run; SnapshotTail is
	// how many of them come after the snapshot.
	RecoveryEvents, SnapshotTail int
	// Dir holds the server's store and the snapshots; a temp dir if empty.
	Dir    string
	Logger *slog.Logger
}

// Result is one measured line.
type Result struct {
	Name     string
	Ops      int
	Elapsed  time.Duration
	Baseline string  // name of the baseline line, if any
	Ratio    float64 // this rate / baseline rate
}

// Rate is operations per second.
func (r Result) Rate() float64 { return float64(r.Ops) / r.Elapsed.Seconds() }

// Journal runs the journal benchmark and returns its lines.
func Journal(ctx context.Context, cfg JournalConfig, progress io.Writer) ([]Result, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "triplane-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	srv, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: filepath.Join(dir, "nats"), SyncAlways: cfg.SyncAlways, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	nc, err := nats.Connect(srv.URL())
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		return nil, err
	}
	js, _ := jetstream.New(nc)
	snaps, err := journal.OpenSnapshots(filepath.Join(dir, "snapshots"), cfg.Logger)
	if err != nil {
		return nil, err
	}
	defer snaps.Close()

	payload, err := samplePayload()
	if err != nil {
		return nil, err
	}
	step := func(s string) { fmt.Fprintf(progress, "  %s...\n", s) }

	host, err := actors.NewHost(actors.HostConfig{Journal: j, Snapshots: snaps, Registry: actors.NewRegistry(ledger.Machine{}),
		Logger: cfg.Logger, SnapshotEvery: 1000})
	if err != nil {
		return nil, err
	}
	defer host.Stop(context.Background())
	total := cfg.Actors * cfg.PerActor
	// Recover every actor first so the runs measure persisting only.
	if err := forEachActor(cfg.Actors, 1, func(a actors.Address) error {
		_, err := host.Request(ctx, a, &triplanev1.LedgerGet{})
		return err
	}); err != nil {
		return nil, err
	}

	// Rounds interleave each run with its baseline, so a burst of noise on
	// the shared machine hits both; the median of the rounds is reported.
	rounds := max(cfg.Rounds, 1)
	lines := map[string][]Result{}
	var order []string
	add := func(r Result) {
		if _, ok := lines[r.Name]; !ok {
			order = append(order, r.Name)
		}
		lines[r.Name] = append(lines[r.Name], r)
	}
	for round := range rounds {
		step(fmt.Sprintf("round %d/%d: raw async publish, %d messages", round+1, rounds, total))
		raw, err := rawAsync(ctx, js, fmt.Sprintf("triplane.journal.raw%d", round), cfg.Actors, total, payload, false)
		if err != nil {
			return nil, err
		}
		add(raw)
		step(fmt.Sprintf("round %d/%d: raw async publish with message ids", round+1, rounds))
		rawID, err := rawAsync(ctx, js, fmt.Sprintf("triplane.journal.rawid%d", round), cfg.Actors, total, payload, true)
		if err != nil {
			return nil, err
		}
		rawID.Name += " + msg ids"
		rawID.Baseline = raw.Name
		add(rawID)
		for _, inflight := range cfg.InFlight {
			step(fmt.Sprintf("round %d/%d: %d actors x %d commands, %d in flight per actor", round+1, rounds, cfg.Actors, cfg.PerActor, inflight))
			start := time.Now()
			if err := forEachActor(cfg.Actors, inflight, func(a actors.Address) error {
				for i := range cfg.PerActor / inflight {
					if _, err := host.Request(ctx, a, &triplanev1.LedgerDeposit{Amount: int64(i + 1)}); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				return nil, err
			}
			n := cfg.Actors * (cfg.PerActor / inflight) * inflight
			add(Result{Name: fmt.Sprintf("persist: %d actors, %d in flight each", cfg.Actors, inflight), Ops: n,
				Elapsed: time.Since(start), Baseline: raw.Name})
		}
		step(fmt.Sprintf("round %d/%d: raw sync publish with expected sequence, %d messages", round+1, rounds, cfg.Sequential))
		rawSync, err := rawSequential(ctx, js, fmt.Sprintf("triplane.journal.rawsync%d.one", round), cfg.Sequential, payload)
		if err != nil {
			return nil, err
		}
		add(rawSync)
		step(fmt.Sprintf("round %d/%d: one actor, %d sequential commands", round+1, rounds, cfg.Sequential))
		one := actors.Address{Kind: ledger.Kind, ID: "bench-one"}
		start := time.Now()
		for i := range cfg.Sequential {
			if _, err := host.Request(ctx, one, &triplanev1.LedgerDeposit{Amount: int64(i + 1)}); err != nil {
				return nil, err
			}
		}
		add(Result{Name: "persist: 1 actor, sequential", Ops: cfg.Sequential, Elapsed: time.Since(start), Baseline: rawSync.Name})
	}
	var out []Result
	for _, name := range order {
		out = append(out, median(lines[name]))
	}
	for i := range out {
		if out[i].Baseline == "" {
			continue
		}
		for _, b := range out {
			if b.Name == out[i].Baseline {
				out[i].Ratio = out[i].Rate() / b.Rate()
			}
		}
	}

	step(fmt.Sprintf("recovery of %d events", cfg.RecoveryEvents))
	rec, err := recovery(ctx, js, j, snaps, cfg.RecoveryEvents, cfg.SnapshotTail)
	if err != nil {
		return nil, err
	}
	return append(out, rec...), nil
}

// median returns the round with the median rate.
func median(rs []Result) Result {
	sorted := append([]Result(nil), rs...)
	slices.SortFunc(sorted, func(a, b Result) int { return cmp.Compare(a.Rate(), b.Rate()) })
	return sorted[len(sorted)/2]
}

func samplePayload() ([]byte, error) {
	b, err := actors.NewBatch("c1", time.Now(), []proto.Message{&triplanev1.LedgerDeposited{Amount: 12345}})
	if err != nil {
		return nil, err
	}
	b.Kind, b.ActorId, b.HighestSeq = ledger.Kind, "bench-00001", 1
	b.Events[0].Seq = 1
	return proto.Marshal(b)
}

// forEachActor runs fn for n actors, each with inflight goroutines.
func forEachActor(n, inflight int, fn func(actors.Address) error) error {
	var wg sync.WaitGroup
	var first atomic.Value
	for i := range n {
		for range inflight {
			wg.Go(func() {
				if err := fn(actors.Address{Kind: ledger.Kind, ID: fmt.Sprintf("bench-%05d", i)}); err != nil {
					first.CompareAndSwap(nil, err)
				}
			})
		}
	}
	wg.Wait()
	if err, ok := first.Load().(error); ok {
		return err
	}
	return nil
}

func rawAsync(ctx context.Context, js jetstream.JetStream, prefix string, subjects, n int, payload []byte, msgIDs bool) (Result, error) {
	start := time.Now()
	var futs []jetstream.PubAckFuture
	for i := range n {
		opts := []jetstream.PublishOpt{jetstream.WithStallWait(time.Minute)}
		if msgIDs {
			opts = append(opts, jetstream.WithMsgID(fmt.Sprintf("%s.%d", prefix, i)))
		}
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: fmt.Sprintf("%s.s%05d", prefix, i%subjects), Data: payload}, opts...)
		if err != nil {
			return Result{}, fmt.Errorf("raw async publish: %w", err)
		}
		futs = append(futs, f)
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
	el := time.Since(start)
	for _, f := range futs {
		select {
		case err := <-f.Err():
			return Result{}, fmt.Errorf("raw async publish: %w", err)
		default:
		}
	}
	return Result{Name: "raw JetStream async publish", Ops: n, Elapsed: el}, nil
}

func rawSequential(ctx context.Context, js jetstream.JetStream, subject string, n int, payload []byte) (Result, error) {
	start := time.Now()
	var last uint64
	for range n {
		ack, err := js.Publish(ctx, subject, payload, jetstream.WithExpectLastSequencePerSubject(last))
		if err != nil {
			return Result{}, fmt.Errorf("raw sync publish: %w", err)
		}
		last = ack.Sequence
	}
	return Result{Name: "raw JetStream sync publish, expected seq", Ops: n, Elapsed: time.Since(start)}, nil
}

// recovery writes a history of n events for one actor, one event per
// journal message (the worst case for recovery), and times recovering it
// without and with a snapshot taken tail events before the end. The history
// is written with raw async publishes of well-formed batches: it is a
// fixture, not the measurement.
func recovery(ctx context.Context, js jetstream.JetStream, j *journal.Journal, snaps *journal.Snapshots, n, tail int) ([]Result, error) {
	m := ledger.Machine{}
	id := "bench-recovery"
	state := m.Initial(id)
	subject := j.Subject(m.Kind(), id)
	now := time.Now()
	var snapFut jetstream.PubAckFuture
	var snapState proto.Message
	for seq := 1; seq <= n; seq++ {
		ev := &triplanev1.LedgerDeposited{Amount: int64(seq)}
		b, err := actors.NewBatch(fmt.Sprint("fill-", seq), now, []proto.Message{ev})
		if err != nil {
			return nil, err
		}
		b.Kind, b.ActorId, b.HighestSeq, b.Events[0].Seq = m.Kind(), id, uint64(seq), uint64(seq)
		data, err := proto.Marshal(b)
		if err != nil {
			return nil, err
		}
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: subject, Data: data}, jetstream.WithStallWait(time.Minute))
		if err != nil {
			return nil, fmt.Errorf("write recovery history: %w", err)
		}
		_ = m.Apply(state, ev)
		if seq == n-tail {
			snapFut, snapState = f, proto.Clone(state)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case ack := <-snapFut.Ok():
		s, err := actors.NewSnapshot(m, id, snapState, journal.Position{Seq: uint64(n - tail), Stream: ack.Sequence}, now)
		if err != nil {
			return nil, err
		}
		if err := snaps.Save(s); err != nil {
			return nil, err
		}
	case err := <-snapFut.Err():
		return nil, fmt.Errorf("write recovery history: %w", err)
	}

	start := time.Now()
	full, err := actors.Recover(ctx, j, nil, m, id, nil)
	if err != nil {
		return nil, err
	}
	fullEl := time.Since(start)
	start = time.Now()
	fast, err := actors.Recover(ctx, j, snaps, m, id, nil)
	if err != nil {
		return nil, err
	}
	fastEl := time.Since(start)
	if !proto.Equal(full.State, fast.State) || fast.FromSnapshot == 0 || full.Replayed != uint64(n) {
		return nil, fmt.Errorf("recovery with a snapshot differs from the full replay (from snapshot %d)", fast.FromSnapshot)
	}
	rFull := Result{Name: fmt.Sprintf("recover %d events, no snapshot", n), Ops: n, Elapsed: fullEl}
	rFast := Result{Name: fmt.Sprintf("recover %d events, snapshot + %d tail", n, fast.Replayed), Ops: n, Elapsed: fastEl,
		Baseline: rFull.Name, Ratio: fullEl.Seconds() / fastEl.Seconds()}
	return []Result{rFull, rFast}, nil
}

// Print writes results as an aligned table.
func Print(w io.Writer, title string, rs []Result) {
	fmt.Fprintf(w, "%s\n", title)
	fmt.Fprintf(w, "  %-52s %10s %10s %14s  %s\n", "what", "ops", "elapsed", "ops/s", "vs baseline")
	for _, r := range rs {
		vs := ""
		if r.Baseline != "" {
			vs = fmt.Sprintf("%.2fx of %q", r.Ratio, r.Baseline)
		}
		fmt.Fprintf(w, "  %-52s %10d %10s %14.0f  %s\n", r.Name, r.Ops, r.Elapsed.Round(time.Millisecond), r.Rate(), vs)
	}
}
