package main

import (
	"errors"
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

` + scenarioHelp(),
		Example: `  triplane sim --scenario ledger --seed 7 --duration 5s
  triplane sim --scenario ledger --seeds 1..200
  triplane sim --scenario ledger --seeds 1..50 --bug apply-before-persist
  triplane sim --scenario serving --seeds 1..20 --duration 3s --bug router-ignores-gap
  triplane sim --scenario serving --seeds 1..40 --buggify
  triplane sim --scenario serving --seed 2 --duration 3s --bug stale-route --detail`,
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
			if seeds != "" && cmd.Flags().Changed("seed") {
				return usageError{&config.Error{Key: "seed", Err: fmt.Errorf("--seed %d and --seeds %s: give one (a single run, or a sweep)", seed, seeds)}}
			}
			if seeds != "" {
				var err error
				if from, to, err = parseSeeds(seeds); err != nil {
					return usageError{&config.Error{Key: "seeds", Err: err}}
				}
			}
			// 0 means the default in Options; typed on the command line it
			// is a mistake, not a request for 2s or 10,000 lines.
			if opts.Duration == 0 {
				return usageError{&config.Error{Key: "duration", Err: errors.New("0s: the virtual time of load must be positive")}}
			}
			if opts.TraceLines == 0 {
				return usageError{&config.Error{Key: "trace-lines", Err: errors.New("0: keep at least 1 line")}}
			}
			if err := opts.Validate(s); err != nil {
				if oe := (*sim.OptionError)(nil); errors.As(err, &oe) {
					return usageError{&config.Error{Key: oe.Flag, Err: oe.Err}}
				}
				return usageError{err}
			}
			if parallel < 1 || parallel > 256 {
				return usageError{&config.Error{Key: "parallel", Err: fmt.Errorf("%d is outside 1..256", parallel)}}
			}
			// A run holds its journal and requests to the end (the replay
			// invariant reads them): its memory grows with its virtual
			// time, about 0.7 MB a second for serving.
			if inFlight := time.Duration(min(uint64(parallel), to-from+1)) * opts.Duration; inFlight > maxSimInFlight {
				return usageError{&config.Error{Key: "parallel", Err: fmt.Errorf("%d runs of %s at once hold %s of virtual time in memory, over the limit of %s (a serving run holds about 0.7 MB a virtual second): run fewer at once or shorter",
					min(uint64(parallel), to-from+1), opts.Duration, inFlight, maxSimInFlight)}}
			}
			if opts.Buggify && len(s.FaultPoints) == 0 {
				// Run anyway: a reproduce line printed by a Go test with
				// Buggify must work here.
				fmt.Fprintf(cmd.ErrOrStderr(), "buggify: scenario %s's code has no fault points; nothing to switch on (scenarios with fault points: %s)\n",
					s.Name, strings.Join(sim.ScenariosWith(func(s sim.Scenario) bool { return len(s.FaultPoints) > 0 }), ", "))
			}
			batchGC()
			out := cmd.OutOrStdout()
			var failed []uint64
			autoTraces := 0
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
					// Unasked, a trace goes to the working directory for
					// the first few failing seeds only: a sweep of
					// thousands must not fill it; any seed runs again alone.
					if autoTraces < maxAutoTraces {
						autoTraces++
						path = fmt.Sprintf("triplane-sim-%s-%d.trace", s.Name, sd)
					}
				} else if path != "" && from != to {
					path = fmt.Sprintf("%s.%d", trace, sd)
				}
				if path != "" {
					if err := os.WriteFile(path, []byte(strings.Join(r.Trace, "\n")+"\n"), 0o644); err != nil {
						return fmt.Errorf("write trace: %w", err)
					}
					cut := ""
					if r.TraceDropped > 0 {
						n := len(r.Trace) - 1 // the last line says where it was cut
						cut = fmt.Sprintf(" (cut after its first %d of %d lines: --trace-lines keeps more)", n, n+r.TraceDropped)
					}
					fmt.Fprintf(out, "  trace written to %s%s\n", path, cut)
				}
				if r.Err != nil {
					fmt.Fprintf(out, "  reproduce: %s\n", sim.ReproduceCommand(s, sd, opts))
					if s.Detailed && !opts.Detail {
						detailed := opts
						detailed.Detail = true
						fmt.Fprintf(out, "  the same run, its trace saying what each request and repair did: %s\n", sim.ReproduceCommand(s, sd, detailed))
					}
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
			if len(failed) > maxAutoTraces && trace == "" {
				fmt.Fprintf(out, "traces written for the first %d failing seeds only; a seed's reproduce line runs it again alone, with its trace\n", maxAutoTraces)
			}
			if len(failed) > 0 {
				return fmt.Errorf("failing seeds: %s", seedList(failed))
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&scenario, "scenario", "ledger", "scenario to run (see Scenarios above)")
	fs.Uint64Var(&seed, "seed", 1, "seed of a single run")
	fs.StringVar(&seeds, "seeds", "", "sweep an inclusive range of seeds, e.g. 1..100 (instead of --seed)")
	fs.DurationVar(&opts.Duration, "duration", sim.DefaultDuration, fmt.Sprintf("virtual time of load (at most %s)", sim.MaxDuration))
	fs.Float64Var(&opts.Faults.AppendFailure, "append-failure", sim.DefaultFaults.AppendFailure, "probability that a journal append fails")
	fs.Float64Var(&opts.Faults.WrittenOnFailure, "written-on-failure", sim.DefaultFaults.WrittenOnFailure, "probability that a failed append was written anyway")
	fs.Float64Var(&opts.Faults.CrashRate, "crash-rate", sim.DefaultFaults.CrashRate, "crash faults, read by each scenario its own way (see Scenarios above): only in ledger is it the probability that a command's actor crashes")
	fs.Float64Var(&opts.Faults.MessageLoss, "message-loss", sim.DefaultFaults.MessageLoss, "probability that a message on the simulated event plane is lost"+readBy("MessageLoss"))
	fs.Float64Var(&opts.Faults.MessageDuplicate, "message-duplicate", sim.DefaultFaults.MessageDuplicate, "probability that a message on the simulated event plane is delivered twice"+readBy("MessageDuplicate"))
	fs.IntVar(&opts.Faults.Partitions, "partitions", sim.DefaultFaults.Partitions, fmt.Sprintf("times a run cuts a worker off the event plane, 200-800 ms each, at most %d", sim.MaxFaultEvents)+readBy("Partitions"))
	fs.IntVar(&opts.Faults.LeaderChanges, "leader-changes", sim.DefaultFaults.LeaderChanges, fmt.Sprintf("times etcd elects a new leader during a run, at most %d", sim.MaxFaultEvents)+readBy("LeaderChanges"))
	fs.BoolVar(&opts.Buggify, "buggify", false, "switch on the fault points inside the real code (each on for a run with probability 0.25, then firing 5% of the times it is reached); fault points exist only in "+
		strings.Join(sim.ScenariosWith(func(s sim.Scenario) bool { return len(s.FaultPoints) > 0 }), ", ")+": elsewhere it switches nothing on, and says so")
	fs.StringVar(&opts.Bug, "bug", "", "switch on a planted bug to see the simulator find it; each scenario plants its own: "+bugHelp())
	fs.IntVar(&parallel, "parallel", runtime.GOMAXPROCS(0), "seeds of a sweep run at once (results print in seed order and equal those of one at a time); runs at once times --duration is at most 4h, as a run holds memory for each virtual second")
	fs.StringVar(&trace, "trace", "", "write the trace here (with --seeds, one file per seed with the seed appended); by default a failing run's trace goes to triplane-sim-<scenario>-<seed>.trace")
	fs.BoolVar(&opts.Detail, "detail", false, "add lines to the trace saying what each request and KV repair did (in "+
		strings.Join(sim.ScenariosWith(func(s sim.Scenario) bool { return s.Detailed }), ", ")+"); the run and its trace hash stay the same")
	fs.IntVar(&opts.TraceLines, "trace-lines", sim.DefaultTraceLines, fmt.Sprintf("trace lines kept from the start of a run, at most %d (a cut trace ends with a line saying so; the trace hash covers every line)", sim.MaxTraceLines))
	_ = g
	return cmd
}

// readBy says which scenarios read a field of Faults, for its flag's help.
func readBy(field string) string {
	return " (read by " + strings.Join(sim.ScenariosWith(func(s sim.Scenario) bool { return slices.Contains(s.ReadsFaults, field) }), ", ") +
		"; the others ignore it)"
}

// scenarioHelp lists the scenarios with what --bug, --crash-rate and
// --buggify do in each, from the scenarios themselves: a help text kept
// by hand would drift from the code.
func scenarioHelp() string {
	var b strings.Builder
	b.WriteString("Scenarios (--scenario):")
	for _, n := range sim.ScenarioNames() {
		s := sim.Scenarios()[n]
		fmt.Fprintf(&b, "\n  %s: %s\n    --bug: %s\n    --crash-rate: %s", n, s.Description, strings.Join(s.Bugs, ", "), s.Crashes)
		if len(s.ReadsFaults) > 0 {
			flags := make([]string, len(s.ReadsFaults))
			for i, f := range s.ReadsFaults {
				flags[i] = "--" + sim.FaultFlag(f)
			}
			fmt.Fprintf(&b, "\n    also reads: %s", strings.Join(flags, ", "))
		}
		if len(s.FaultPoints) > 0 {
			fmt.Fprintf(&b, "\n    --buggify: %s", strings.Join(s.FaultPoints, ", "))
		} else {
			b.WriteString("\n    --buggify: no fault points (switches nothing on)")
		}
	}
	return b.String()
}

// bugHelp lists the bugs with the scenarios that plant them, bugs of the
// same scenarios together.
func bugHelp() string {
	var parts, bugs []string
	where := ""
	for i, bug := range sim.Bugs {
		in := sim.ScenariosWith(func(s sim.Scenario) bool { return slices.Contains(s.Bugs, bug) })
		w := strings.Join(in, ", ")
		if len(in) == len(sim.ScenarioNames()) {
			w = "every scenario"
		}
		if i > 0 && w != where {
			parts = append(parts, fmt.Sprintf("%s (%s)", strings.Join(bugs, ", "), where))
			bugs = nil
		}
		bugs, where = append(bugs, bug), w
	}
	if len(bugs) > 0 {
		parts = append(parts, fmt.Sprintf("%s (%s)", strings.Join(bugs, ", "), where))
	}
	return strings.Join(parts, "; ")
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

// maxSimInFlight bounds the virtual time of the runs in memory at once:
// four serving runs of an hour, about 10 GB.
const maxSimInFlight = 4 * time.Hour

// maxAutoTraces bounds the trace files a sweep writes unasked, and
// maxListedSeeds the failing seeds its last line lists.
const (
	maxAutoTraces  = 10
	maxListedSeeds = 50
)

// seedList lists failing seeds, the first maxListedSeeds of them: each
// has its own line above.
func seedList(seeds []uint64) string {
	if len(seeds) <= maxListedSeeds {
		return fmt.Sprint(seeds)
	}
	return fmt.Sprintf("%v and %d more", seeds[:maxListedSeeds], len(seeds)-maxListedSeeds)
}
