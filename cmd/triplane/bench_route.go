package main

import (
	"fmt"
	"math"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/workload"
)

func newBenchRouteCmd() *cobra.Command {
	var (
		cfg        bench.RouteConfig
		tracePath  string
		policies   []string
		limit      int
		cpuprofile string
	)
	cmd := &cobra.Command{
		Use:   "route",
		Short: "Prefix-cache hits and load balance of the routing policies on a request trace",
		Long: `Replays a request trace in the Mooncake format (timestamp in ms, input_length,
output_length, hash_ids of 512-token blocks) in virtual time through the real
router (its KV index fed by each engine's KV events, its policies) and one mock
engine per worker (paged KV pool with prefix reuse and LRU eviction, Dynamo's
timing model). Requests arrive at the trace's timestamps; each engine iterates
back to back while it has work, each iteration lasting what the timing model
says. Nothing waits on the wall clock: an hour of trace replays in seconds.

For each policy it prints:
  - hit: the share of prompt blocks found cached on the chosen worker at
    admission, as the engine reported it (CachedTokens of the first output /
    block size); router: what the router's index predicted for the same
    decisions,
  - the ratio of hit to round-robin's, and to the ceiling: one infinite cache
    where a block hits if an earlier request had the same prefix of hash ids,
  - busiest: the busiest worker's prefilled (not cached) prompt tokens over the
    mean,
  - time to first token p50/p99 in the model, simulated and wall time.

The kv policy's cost of a worker is
  overlap-weight x (blocks to prefill + waiting-prefill x requests waiting) + blocks in use
(see router.Params).`,
		Example: `  triplane bench route --trace mooncake_conversation_trace.jsonl --workers 8 --blocks-per-worker 8000
  triplane bench route --trace trace.jsonl --policy kv,round-robin --limit 2000 --overlap-weight 2 --waiting-prefill -1`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			if tracePath == "" {
				return usageError{fmt.Errorf("--trace is required")}
			}
			if cfg.Workers <= 0 || cfg.BlocksPerWorker <= 0 || cfg.BlockSize <= 0 || cfg.MaxBatchTokens <= 0 || limit < 0 {
				return usageError{fmt.Errorf("--workers, --blocks-per-worker, --block-size and --max-batch-tokens must be positive, --limit not negative")}
			}
			if cfg.LoadInterval < 0 {
				return usageError{fmt.Errorf("--load-interval must not be negative, got %s", cfg.LoadInterval)}
			}
			if !(cfg.SpeedUp > 0) || math.IsInf(cfg.SpeedUp, 0) {
				return usageError{fmt.Errorf("--speedup must be a positive number, got %v", cfg.SpeedUp)}
			}
			if !(cfg.Params.OverlapWeight > 0) || math.IsInf(cfg.Params.OverlapWeight, 0) ||
				!(cfg.Params.Temperature >= 0) || math.IsInf(cfg.Params.Temperature, 0) ||
				math.IsNaN(cfg.Params.WaitingPrefill) || math.IsInf(cfg.Params.WaitingPrefill, 0) {
				return usageError{fmt.Errorf("--overlap-weight must be positive, --temperature not negative and --waiting-prefill finite")}
			}
			cfg.Policies = nil
			for _, s := range policies {
				p, err := router.ParsePolicy(strings.TrimSpace(s))
				if err != nil {
					return usageError{fmt.Errorf("--policy: %w", err)}
				}
				cfg.Policies = append(cfg.Policies, p)
			}
			if len(cfg.Policies) == 0 {
				return usageError{fmt.Errorf("--policy: no policy given")}
			}
			f, err := os.Open(tracePath)
			if err != nil {
				return fmt.Errorf("trace: %w", err)
			}
			read := time.Now()
			recs, err := workload.Read(f, limit)
			f.Close()
			if err != nil {
				return fmt.Errorf("trace %s: %w", tracePath, err)
			}
			if len(recs) == 0 {
				return fmt.Errorf("trace %s: no requests", tracePath)
			}
			cfg.Records = recs
			batchGC()
			if cpuprofile != "" {
				pf, err := os.Create(cpuprofile)
				if err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				defer pf.Close()
				if err := pprof.StartCPUProfile(pf); err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				defer pprof.StopCPUProfile()
			}
			span := time.Duration(recs[len(recs)-1].Timestamp-recs[0].Timestamp) * time.Millisecond
			fmt.Fprintf(cmd.ErrOrStderr(), "routing replay: %d requests over %s of trace (read in %s)\n", len(recs), span.Round(time.Second), time.Since(read).Round(time.Millisecond))
			total := time.Now()
			rs, err := bench.Route(cmd.Context(), cfg, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			title := fmt.Sprintf("routing: %d requests, %d workers x %d blocks of %d tokens, overlap weight %g, waiting prefill %g, temperature %g, wall %s (%s)",
				len(recs), cfg.Workers, cfg.BlocksPerWorker, cfg.BlockSize, cfg.Params.OverlapWeight, cfg.Params.WaitingPrefill, cfg.Params.Temperature,
				time.Since(total).Round(10*time.Millisecond), strings.Join(os.Args[1:], " "))
			bench.PrintRoute(cmd.OutOrStdout(), title, rs)
			return nil
		},
	}
	fs := cmd.Flags()
	defPolicies := make([]string, len(router.Policies))
	for i, p := range router.Policies {
		defPolicies[i] = string(p)
	}
	fs.StringVar(&tracePath, "trace", "", "request trace, one JSON object a line (Mooncake format)")
	fs.IntVar(&cfg.Workers, "workers", 8, "workers, one mock engine each")
	fs.IntVar(&cfg.BlocksPerWorker, "blocks-per-worker", 8000, "KV blocks in each engine's pool")
	fs.IntVar(&cfg.BlockSize, "block-size", workload.TraceBlockSize, "tokens per KV block (the trace's hash ids stand for 512)")
	fs.StringSliceVar(&policies, "policy", defPolicies, "routing policies to replay, one run each")
	fs.IntVar(&limit, "limit", 0, "replay only the first N requests of the trace (0: all)")
	fs.Float64Var(&cfg.SpeedUp, "speedup", 1, "divide every modelled engine duration by this")
	fs.IntVar(&cfg.MaxBatchTokens, "max-batch-tokens", 8192, "prefill plus decode tokens per engine iteration")
	fs.Float64Var(&cfg.Params.OverlapWeight, "overlap-weight", router.DefaultOverlapWeight, "kv policy: weight of blocks to prefill against blocks in use")
	fs.Float64Var(&cfg.Params.WaitingPrefill, "waiting-prefill", router.DefaultWaitingPrefill, "kv policy: blocks of prefill charged for each request waiting in a worker's queue (0: the default, negative: none)")
	fs.Float64Var(&cfg.Params.Temperature, "temperature", 0, "kv policy: 0 picks the cheapest worker; above 0 samples by exp(-normalized cost / temperature)")
	fs.DurationVar(&cfg.LoadInterval, "load-interval", 0, "route as a frontend does: with each worker's load report (one per interval; workers default to 500ms) and the router's own requests in flight; 0 routes with every engine's exact load")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "seed of the random draws (random policy, kv temperature)")
	fs.StringVar(&cpuprofile, "cpuprofile", "", "write a CPU profile of the replay to this file")
	return cmd
}
