package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/planes/data/databench"
)

func newBenchTransferCmd(g *globalFlags) *cobra.Command {
	var (
		cfg        databench.Config
		blockSizes []string
		gib        float64
		cpuprofile string
	)
	cmd := &cobra.Command{
		Use:   "transfer",
		Short: "Data plane block transfer throughput and latency (TCP, shared memory)",
		Long: `Moves blocks of real bytes between registered memory regions over loopback
and measures, in one run:
  - a plain Go TCP stream writing 1 MiB buffers (baseline of TCP),
  - iperf3 -l 1M when installed (a further baseline),
  - per block size: TCP with one lane and with several, and shared memory
    (with and without the receiver recomputing checksums) beside copy() of
    the same bytes (baseline of shared memory),
  - p50/p99 latency of one small block per write, beside a plain TCP
    ping-pong of the same size.`,
		Example: `  triplane bench transfer
  triplane bench transfer --block-sizes 4KiB,1MiB --gib 1 --lanes 4`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			cfg.BlockSizes = nil
			for _, s := range blockSizes {
				n, err := parseSize(s)
				if err != nil {
					return usageError{fmt.Errorf("--block-sizes: %w", err)}
				}
				cfg.BlockSizes = append(cfg.BlockSizes, n)
			}
			cfg.Bytes = int64(gib * (1 << 30))
			if cfg.Bytes <= 0 || cfg.Rounds <= 0 || cfg.Lanes < 2 || cfg.LatencySamples <= 0 || cfg.RegionBytes <= 0 || cfg.LatencyBlock <= 0 {
				return usageError{fmt.Errorf("--gib, --rounds, --latency-samples, --latency-block and --region-mib must be positive and --lanes at least 2")}
			}
			cfg.RegionBytes <<= 20
			cfg.Progress = cmd.ErrOrStderr()
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
			rep, err := databench.Run(cmd.Context(), cfg)
			if err != nil {
				return fmt.Errorf("bench transfer: %w", err)
			}
			databench.Print(cmd.OutOrStdout(), fmt.Sprintf("transfer over loopback, median of %d rounds (%s)", cfg.Rounds, strings.Join(os.Args[1:], " ")), rep)
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&blockSizes, "block-sizes", []string{"4KiB", "64KiB", "1MiB", "16MiB"}, "block sizes to measure (B, KiB, MiB suffixes)")
	fs.Float64Var(&gib, "gib", 0.5, "GiB moved per measurement")
	fs.IntVar(&cfg.RegionBytes, "region-mib", 64, "MiB of source and destination region (transfers cycle over it)")
	fs.IntVar(&cfg.Lanes, "lanes", 4, "TCP lanes of the several-lanes runs")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "repetitions of every measurement with its baseline; the median is reported")
	fs.IntVar(&cfg.LatencySamples, "latency-samples", 2000, "one-block writes timed per latency line")
	fs.IntVar(&cfg.LatencyBlock, "latency-block", 4096, "block size of the latency runs in bytes")
	fs.StringVar(&cpuprofile, "cpuprofile", "", "write a CPU profile of the run (senders and receivers both run in this process) to this file")
	fs.BoolVar(&cfg.Iperf, "iperf", true, "also run iperf3 -l 1M as a baseline when it is installed")
	return cmd
}

// parseSize reads 4096, 4KiB, 16MiB; small sizes are refused so that a
// typo cannot start a run of billions of frames.
func parseSize(s string) (int, error) {
	mult := 1
	num := s
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"MiB", 1 << 20}, {"KiB", 1 << 10}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			mult, num = u.mult, strings.TrimSuffix(s, u.suffix)
			break
		}
	}
	n, err := strconv.Atoi(num)
	if err != nil || n <= 0 || n > 1<<30/mult || n*mult < 512 {
		return 0, fmt.Errorf("%q is not a size between 512 B and 1 GiB (B, KiB, MiB suffixes)", s)
	}
	return n * mult, nil
}
