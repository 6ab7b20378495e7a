package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strings"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/logging"
)

func newBenchCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Run Triplane's benchmarks (each against a baseline in the same run)",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newBenchJournalCmd(g), newBenchEventCmd(g), newBenchTransferCmd(g))
	cmd.AddCommand(newBenchRouteCmd())
	cmd.AddCommand(newBenchServeCmd(g))
	return cmd
}

func newBenchJournalCmd(g *globalFlags) *cobra.Command {
	var (
		syncs      []string
		cfg        bench.JournalConfig
		cpuprofile string
	)
	cmd := &cobra.Command{
		Use:   "journal",
		Short: "Persist throughput and recovery speed of the actor journal",
		Long: `Starts an embedded NATS server with JetStream in a temporary directory and
measures, in one run:
  - raw JetStream async publish of the journal's payloads (the baseline),
  - raw sync publish with an expected sequence (baseline of one actor),
  - persist throughput of one actor sending commands one after another,
  - persist throughput of many actors at once,
  - recovery of one actor's long history without and with a snapshot.
Each is repeated for every --sync policy.`,
		Example: `  triplane bench journal
  triplane bench journal --sync interval --actors 100 --per-actor 50`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			for _, s := range syncs {
				if s != "always" && s != "interval" {
					return usageError{&config.Error{Key: "sync", Err: fmt.Errorf("%q is not always or interval", s)}}
				}
			}
			if cfg.Sequential <= 0 || cfg.Actors <= 0 || cfg.PerActor <= 0 || cfg.RecoveryEvents < 2 ||
				cfg.SnapshotTail < 0 || cfg.SnapshotTail >= cfg.RecoveryEvents {
				return usageError{fmt.Errorf("sizes must be positive, --recovery-events at least 2 and --snapshot-tail below it")}
			}
			for _, n := range cfg.InFlight {
				if n < 1 || n > cfg.PerActor {
					return usageError{&config.Error{Key: "in-flight", Err: fmt.Errorf("%d: each value must be from 1 to --per-actor (%d); the default is 1,8", n, cfg.PerActor)}}
				}
			}
			log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
			if err != nil {
				return usageError{err}
			}
			cfg.Logger = log
			if cpuprofile != "" {
				f, err := os.Create(cpuprofile)
				if err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				defer pprof.StopCPUProfile()
			}
			for _, s := range syncs {
				c := cfg
				c.SyncAlways = s == "always"
				fmt.Fprintf(cmd.ErrOrStderr(), "jetstream sync %s:\n", s)
				rs, err := bench.Journal(cmd.Context(), c, cmd.ErrOrStderr())
				if err != nil {
					return fmt.Errorf("bench journal (sync %s): %w", s, err)
				}
				bench.Print(cmd.OutOrStdout(), fmt.Sprintf("journal, jetstream sync %s (%s)", s, strings.Join(os.Args[1:], " ")), rs)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&syncs, "sync", []string{"always", "interval"}, "JetStream sync policies to measure: always (fsync per write), interval (the server's periodic sync)")
	fs.IntVar(&cfg.Sequential, "sequential", 3000, "commands sent one after another to one actor")
	fs.IntVar(&cfg.Actors, "actors", 1000, "actors in the concurrent run")
	fs.IntVar(&cfg.PerActor, "per-actor", 24, "commands per actor in the concurrent runs")
	fs.IntSliceVar(&cfg.InFlight, "in-flight", []int{1, 8}, "commands in flight per actor, one concurrent run per value (more lets the host group-commit)")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "repetitions of every run with its baseline; the median is reported")
	fs.IntVar(&cfg.RecoveryEvents, "recovery-events", 100_000, "events in the recovered actor's history")
	fs.IntVar(&cfg.SnapshotTail, "snapshot-tail", 1000, "events after the snapshot in the recovery run")
	fs.StringVar(&cpuprofile, "cpuprofile", "", "write a CPU profile of the run (the embedded server included) to this file")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for the server store (default: a temporary one, removed after)")
	return cmd
}
