package main

import (
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/sim"
)

func newSimCmd(g *globalFlags) *cobra.Command {
	var (
		scenario string
		seed     uint64
		seeds    string
		opts     = sim.Options{Faults: sim.DefaultFaults}
		trace    string
		parallel int
	)
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Run deterministic simulations of the real actors under virtual time and faults",
		Long: `Runs a scenario in the deterministic simulator: the real state machines over
simulated planes, a virtual clock and one random source derived from the seed,
with injected faults. The same seed reproduces the same run exactly (the trace
hash shows it). --buggify also switches on the fault points inside the real
code (a slow engine step, a resend answered with a dump, ...), so rare but legal
paths are taken on purpose. At the end every invariant is checked; a failure prints what
failed, when, and the command that reproduces it, and writes the run's trace.

Scenarios: ` + strings.Join(sim.ScenarioNames(), ", "),
		Example: `  triplane sim --scenario ledger --seed 7 --duration 5s
  triplane sim --scenario ledger --seeds 1..200
  triplane sim --scenario ledger --seeds 1..50 --bug apply-before-persist
  triplane sim --scenario serving --seeds 1..20 --duration 3s --bug router-ignores-gap
  triplane sim --scenario serving --seeds 1..40 --buggify`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			s, ok := sim.Scenarios()[scenario]
			if !ok {
				return usageError{&config.Error{Key: "scenario", Err: fmt.Errorf("unknown scenario %q (known: %s)", scenario, strings.Join(sim.ScenarioNames(), ", "))}}
			}
			from, to := seed, seed
			if seeds != "" {
				var err error
				if from, to, err = parseSeeds(seeds); err != nil {
					return usageError{&config.Error{Key: "seeds", Err: err}}
				}
			}
			if opts.Duration <= 0 || opts.Duration > time.Hour {
				return usageError{&config.Error{Key: "duration", Err: fmt.Errorf("%s is outside (0, 1h]", opts.Duration)}}
			}
			if parallel < 1 || parallel > 256 {
				return usageError{&config.Error{Key: "parallel", Err: fmt.Errorf("%d is outside 1..256", parallel)}}
			}
			if opts.Bug != "" && !slices.Contains(sim.Bugs, opts.Bug) {
				return usageError{&config.Error{Key: "bug", Err: fmt.Errorf("unknown bug %q (known: %s)", opts.Bug, strings.Join(sim.Bugs, ", "))}}
			}
			for _, p := range []struct {
				key string
				v   float64
			}{{"append-failure", opts.Faults.AppendFailure}, {"written-on-failure", opts.Faults.WrittenOnFailure}, {"crash-rate", opts.Faults.CrashRate}} {
				if !(p.v >= 0 && p.v <= 1) { // NaN too
					return usageError{&config.Error{Key: p.key, Err: fmt.Errorf("probability %v is outside [0, 1]", p.v)}}
				}
			}
			batchGC()
			out := cmd.OutOrStdout()
			var failed []uint64
			var simTime, wall time.Duration
			began := time.Now()
			err := sim.SweepEach(s, from, to, opts, parallel, func(r sim.Result) error {
				sd := r.Seed
				simTime += r.SimTime
				wall += r.Wall
				status := "ok"
				if r.Err != nil {
					status = "FAILED: " + r.Err.Error()
					failed = append(failed, sd)
				}
				fmt.Fprintf(out, "seed %d: %s (virtual %s in %s wall, %d steps, trace %016x)\n",
					sd, status, r.SimTime.Round(time.Millisecond), r.Wall.Round(time.Millisecond), r.Steps, r.TraceHash)
				if len(r.Fired) > 0 {
					fmt.Fprintf(out, "  fault points fired: %s\n", firedList(r.Fired))
				}
				path := trace
				if path == "" && r.Err != nil {
					path = fmt.Sprintf("triplane-sim-%s-%d.trace", s.Name, sd)
				} else if path != "" && from != to {
					path = fmt.Sprintf("%s.%d", trace, sd)
				}
				if path != "" {
					if err := os.WriteFile(path, []byte(strings.Join(r.Trace, "\n")+"\n"), 0o644); err != nil {
						return fmt.Errorf("write trace: %w", err)
					}
					fmt.Fprintf(out, "  trace written to %s\n", path)
				}
				if r.Err != nil {
					fmt.Fprintf(out, "  reproduce: triplane sim --scenario %s --seed %d --duration %s%s%s\n", s.Name, sd, opts.Duration, bugFlag(opts.Bug), buggifyFlag(opts.Buggify))
				}
				return nil
			})
			if err != nil {
				return err
			}
			if wall > 0 {
				fmt.Fprintf(out, "%d runs, %d failed; %.0fx simulated time per wall second of a run", to-from+1, len(failed), simTime.Seconds()/wall.Seconds())
				if from != to {
					el := time.Since(began)
					fmt.Fprintf(out, "; sweep %s wall, %.0f seeds/minute (%d at once)", el.Round(time.Millisecond), float64(to-from+1)/el.Minutes(), parallel)
				}
				fmt.Fprintln(out)
			}
			if len(failed) > 0 {
				return fmt.Errorf("failing seeds: %v", failed)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&scenario, "scenario", "ledger", "scenario to run")
	fs.Uint64Var(&seed, "seed", 1, "seed of a single run")
	fs.StringVar(&seeds, "seeds", "", "sweep an inclusive range of seeds, e.g. 1..100 (instead of --seed)")
	fs.DurationVar(&opts.Duration, "duration", 2*time.Second, "virtual time of load")
	fs.Float64Var(&opts.Faults.AppendFailure, "append-failure", sim.DefaultFaults.AppendFailure, "probability that a journal append fails")
	fs.Float64Var(&opts.Faults.WrittenOnFailure, "written-on-failure", sim.DefaultFaults.WrittenOnFailure, "probability that a failed append was written anyway")
	fs.Float64Var(&opts.Faults.CrashRate, "crash-rate", sim.DefaultFaults.CrashRate, "probability that a command's actor crashes just before it arrives")
	fs.BoolVar(&opts.Buggify, "buggify", false, "switch on the fault points inside the real code (each on for a run with probability 0.25, then firing 5% of the times it is reached)")
	fs.StringVar(&opts.Bug, "bug", "", "switch on a planted bug to see the simulator find it ("+strings.Join(sim.Bugs, ", ")+")")
	fs.IntVar(&parallel, "parallel", runtime.GOMAXPROCS(0), "seeds of a sweep run at once (results print in seed order and equal those of one at a time)")
	fs.StringVar(&trace, "trace", "", "write the trace here (with --seeds, one file per seed with the seed appended); by default a failing run's trace goes to triplane-sim-<scenario>-<seed>.trace")
	_ = g
	return cmd
}

func bugFlag(b string) string {
	if b == "" {
		return ""
	}
	return " --bug " + b
}

func buggifyFlag(on bool) string {
	if on {
		return " --buggify"
	}
	return ""
}

// firedList prints fault point counts in name order.
func firedList(m map[string]uint64) string {
	var parts []string
	for _, p := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s x%d", p, m[p]))
	}
	return strings.Join(parts, ", ")
}

func parseSeeds(s string) (uint64, uint64, error) {
	a, b, ok := strings.Cut(s, "..")
	if !ok {
		return 0, 0, fmt.Errorf("%q: want A..B", s)
	}
	from, err1 := strconv.ParseUint(a, 10, 64)
	to, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil || from > to {
		return 0, 0, fmt.Errorf("%q: want A..B with A <= B, both non-negative integers", s)
	}
	if to-from >= 100_000 {
		return 0, 0, fmt.Errorf("%q: at most 100000 seeds at once", s)
	}
	return from, to, nil
}
