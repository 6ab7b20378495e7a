package sim

import (
	"errors"
	"fmt"
	"reflect"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/actors"
)

// Faults say which faults a run injects and how often.
type Faults struct {
	// AppendFailure is the probability that a journal append fails;
	// WrittenOnFailure the probability that such an append was written.
	AppendFailure, WrittenOnFailure float64
	// CrashRate switches on crashes, read by each scenario its own way
	// (Scenario.Crashes says how for each built-in one): in ledger it is
	// the probability that a command's actor crashes just before the
	// command arrives; in serving each worker crashes with probability 3x
	// the rate; and in serving, transfer and placement any rate above 0
	// crashes their actors a fixed number of times.
	CrashRate float64
	// MessageLoss and MessageDuplicate are the probabilities that a
	// message on the simulated event plane is lost, or delivered twice
	// (serving).
	MessageLoss, MessageDuplicate float64
	// Partitions is how many times a run cuts a worker off the event
	// plane, for 200-800 ms each (serving).
	Partitions int
	// LeaderChanges is how many times etcd elects a new leader during a
	// run: requests fail for 50-250 ms, leases survive (serving,
	// placement).
	LeaderChanges int
}

// MaxFaultEvents bounds Faults.Partitions and Faults.LeaderChanges: each
// is scheduled up front.
const MaxFaultEvents = 1000

// The planted bugs of the simulated host (see Host.PlantedBug): any
// scenario that sends its commands through Run.Host can list them.
const (
	// BugApplyBeforePersist: the host applies events before the append
	// and keeps them when it fails.
	BugApplyBeforePersist = "apply-before-persist"
	// BugSnapshotBeforePersist: the host snapshots a state before its
	// events are journaled; the simulated disk then hands recovery a state
	// the journal never held.
	BugSnapshotBeforePersist = "snapshot-before-persist"
)

// Bugs are the planted bugs of the built-in scenarios, each switched on
// only in the scenarios that list it in Scenario.Bugs: the host's
// (BugApplyBeforePersist, BugSnapshotBeforePersist), router-ignores-gap and
// stale-route (serving: the routing shell skips missing KV event ids;
// sends a request to a worker discovery removed while the decision was
// pending), ack-before-verify (transfer: the receiver acknowledges ranges
// before checking their checksums), unfenced-writes (placement: leaders
// publish without their election fence).
var Bugs = []string{BugApplyBeforePersist, BugSnapshotBeforePersist, BugRouterIgnoresGap, BugStaleRoute, BugAckBeforeVerify, BugUnfencedWrites}

// DefaultFaults are the faults triplane sim injects unless its flags say
// otherwise (and those the built-in scenarios' tests use). Options{} in
// Go injects none: a run has the faults its Options name.
var DefaultFaults = Faults{AppendFailure: 0.03, WrittenOnFailure: 0.5, CrashRate: 0.1,
	MessageLoss: 0.02, MessageDuplicate: 0.01, Partitions: 2, LeaderChanges: 1}

// DefaultDuration is a run's load when Options.Duration is 0, and
// DefaultTraceLines the trace lines it keeps when Options.TraceLines is.
// The maxima bound both: scenarios make their whole load up front (every
// request, every command) and every kept line is held until the run
// ends, so more would only exhaust memory.
const (
	DefaultDuration   = 2 * time.Second
	MaxDuration       = time.Hour
	DefaultTraceLines = 10_000
	MaxTraceLines     = 10_000_000
)

// Options of one run.
type Options struct {
	Duration time.Duration // virtual time of load; 0: DefaultDuration
	Faults   Faults
	// Bug switches on one of the scenario's planted bugs (Scenario.Bugs),
	// to show that a sweep finds it.
	Bug string
	// Buggify switches on the fault points inside the real code the
	// scenario runs (see Buggify); a scenario whose code has none
	// (Scenario.FaultPoints) runs as without it.
	Buggify bool
	// Invariants run after the built-in ones at the end of the run.
	Invariants []Invariant
	// TraceLines bounds the trace lines a Result keeps, from the start;
	// 0: DefaultTraceLines. It does not change the run: the trace hash
	// covers every line.
	TraceLines int
	// Detail adds lines to the trace that say what the scenario's
	// requests and repairs did (World.Detailf). It does not change the
	// run: the trace hash is the same with or without, so a failing seed
	// can be run again with it.
	Detail bool
}

// OptionError is an option RunScenario refuses: Field names it as in
// Options (Faults.CrashRate), Flag as triplane sim's flag (crash-rate),
// so either caller can point at what to fix.
type OptionError struct {
	Field, Flag string
	Err         error
}

func (e *OptionError) Error() string { return fmt.Sprintf("sim: Options.%s: %v", e.Field, e.Err) }

func (e *OptionError) Unwrap() error { return e.Err }

// Validate reports the first option that a run of s cannot take, as an
// *OptionError: RunScenario refuses such options rather than panic inside
// a scenario or run without the bug it was asked for.
func (o Options) Validate(s Scenario) error {
	switch {
	case o.Duration < 0:
		return &OptionError{"Duration", "duration", fmt.Errorf("%s is negative (0 runs the default %s)", o.Duration, DefaultDuration)}
	case o.Duration > MaxDuration:
		return &OptionError{"Duration", "duration", fmt.Errorf("%s is over the limit of %s", o.Duration, MaxDuration)}
	}
	for _, f := range faultValues(o.Faults) {
		switch {
		case f.count && (f.v < 0 || f.v > MaxFaultEvents):
			return &OptionError{"Faults." + f.field, f.flag, fmt.Errorf("%s is outside [0, %d]", f.value, MaxFaultEvents)}
		case !f.count && !(f.v >= 0 && f.v <= 1): // NaN too
			return &OptionError{"Faults." + f.field, f.flag, fmt.Errorf("probability %s is outside [0, 1]", f.value)}
		}
	}
	if o.Bug != "" && !slices.Contains(s.Bugs, o.Bug) {
		return &OptionError{"Bug", "bug", bugError(s, o.Bug)}
	}
	switch {
	case o.TraceLines < 0:
		return &OptionError{"TraceLines", "trace-lines", fmt.Errorf("%d is negative (0 keeps the default %d)", o.TraceLines, DefaultTraceLines)}
	case o.TraceLines > MaxTraceLines:
		return &OptionError{"TraceLines", "trace-lines", fmt.Errorf("%d is over the limit of %d (every kept line is held in memory)", o.TraceLines, MaxTraceLines)}
	}
	return nil
}

// bugError says why s cannot plant bug, and where it can be planted: a
// user who asks for another scenario's bug would otherwise see a clean
// sweep and think the simulator missed it.
func bugError(s Scenario, bug string) error {
	its := "has no planted bugs"
	if len(s.Bugs) > 0 {
		its = "plants only " + strings.Join(s.Bugs, ", ")
	}
	in := ScenariosWith(func(s Scenario) bool { return slices.Contains(s.Bugs, bug) })
	if len(in) == 0 {
		return fmt.Errorf("unknown bug %q: scenario %s %s", bug, s.Name, its)
	}
	return fmt.Errorf("bug %q is planted by scenario %s, not %s, which %s", bug, strings.Join(in, ", "), s.Name, its)
}

// Invariant checks a finished run; an error is a violation.
type Invariant func(r *Run) error

// Run is one simulation in progress: what a scenario's driver works with.
type Run struct {
	World   *World
	Journal *Journal
	Host    *Host
	Opts    Options
	// Points are the run's fault points, to hand to the real code a
	// scenario builds (nil unless Options.Buggify: nothing fires).
	Points *Buggify
}

// Scenario is a named workload over the simulated planes.
type Scenario struct {
	Name        string
	Description string
	Registry    func() *actors.Registry
	// Drive schedules the scenario's load on the run's world; it may
	// return an invariant that is checked at the end.
	Drive func(r *Run) Invariant
	// Bugs are the planted bugs Drive (or the host it delivers through)
	// switches on for Options.Bug and a sweep of the scenario can find;
	// RunScenario refuses any other, so a sweep never passes for a bug
	// that was not there or that the scenario cannot show.
	Bugs []string
	// FaultPoints are those Drive's real code reaches with Run.Faults
	// (what Options.Buggify can switch on); none: Buggify does nothing.
	FaultPoints []string
	// Crashes says what Faults.CrashRate does in this scenario, for help
	// texts: each scenario reads the rate its own way.
	Crashes string
	// ReadsFaults names the fields of Faults past the journal's and the
	// crash rate that Drive reads (e.g. "MessageLoss"): a reproduction
	// carries only those, and help lists them.
	ReadsFaults []string
	// Detailed: Drive traces detail lines when Options.Detail is on
	// (World.Detailf), so a failure's output offers that run.
	Detailed bool
}

// Result of one run.
type Result struct {
	Seed      uint64
	Scenario  string
	Err       error // the first violated invariant, if any
	TraceHash uint64
	Trace     []string
	Steps     uint64
	SimTime   time.Duration
	Wall      time.Duration
	// Fired counts the fault points that fired (Options.Buggify).
	Fired map[string]uint64
	// TraceDropped counts the trace lines past Options.TraceLines: in the
	// hash, not in Trace (whose last line then says so).
	TraceDropped int
}

// Scenarios are the built-in scenarios by name. Each call returns its own
// copies: a caller may change them without changing the built-in ones.
func Scenarios() map[string]Scenario {
	out := map[string]Scenario{}
	for _, s := range []Scenario{ledgerScenario, servingScenario, transferScenario, placementScenario} {
		s.Bugs, s.FaultPoints, s.ReadsFaults = slices.Clone(s.Bugs), slices.Clone(s.FaultPoints), slices.Clone(s.ReadsFaults)
		out[s.Name] = s
	}
	return out
}

// ScenariosWith names the built-in scenarios for which ok holds, sorted.
func ScenariosWith(ok func(Scenario) bool) []string {
	var out []string
	all := Scenarios()
	for _, n := range ScenarioNames() {
		if ok(all[n]) {
			out = append(out, n)
		}
	}
	return out
}

// ScenarioNames lists the built-in scenarios.
func ScenarioNames() []string {
	var out []string
	for n := range Scenarios() {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// ErrNotQuiet: the run did not settle within the time allowed after its load.
var ErrNotQuiet = errors.New("sim: the world did not go quiet")

// RunScenario runs a scenario once with a seed. A run that panics is a
// failed result naming its seed, with the trace up to the panic; options
// that fail Validate are a failed result without a run.
func RunScenario(s Scenario, seed uint64, opts Options) (res Result) {
	res = Result{Seed: seed, Scenario: s.Name}
	if err := opts.Validate(s); err != nil {
		res.Err = fmt.Errorf("scenario %s seed %d not run: %w", s.Name, seed, err)
		return res
	}
	if opts.Duration == 0 {
		opts.Duration = DefaultDuration
	}
	start := time.Now()
	w := NewWorld(seed)
	if opts.TraceLines > 0 {
		w.TraceLimit = opts.TraceLines
	}
	w.Detail = opts.Detail
	defer func() {
		if p := recover(); p != nil {
			res.Err = fmt.Errorf("seed %d panicked: %v\n%s", seed, p, debug.Stack())
			w.Tracef("PANIC: %v", p)
		}
		res.TraceHash, res.Trace, res.Steps, res.SimTime, res.Wall = w.TraceHash(), w.Trace(), w.Steps(), w.Elapsed(), time.Since(start)
		res.TraceDropped = w.TraceDropped()
	}()
	j := NewJournal(w)
	j.FailAppend, j.WrittenOnFailure = opts.Faults.AppendFailure, opts.Faults.WrittenOnFailure
	h := NewHost(w, j, s.Registry())
	h.PlantedBug = opts.Bug
	// Snapshots every few events on a disk that loses unsynced writes, so
	// recovery runs from snapshot + tail as often as from the journal.
	h.Disk, h.SnapshotEvery = NewDisk(w), 5
	r := &Run{World: w, Journal: j, Host: h, Opts: opts}
	if opts.Buggify {
		r.Points = NewBuggify(w)
	}
	w.Tracef("scenario %s seed %d duration %s faults %s bug %q buggify %v", s.Name, seed, opts.Duration, faultsRead(s, opts.Faults), opts.Bug, opts.Buggify)
	final := s.Drive(r)
	if !w.RunQuiet(opts.Duration + time.Minute) {
		res.Err = fmt.Errorf("%w within %s of virtual time", ErrNotQuiet, opts.Duration+time.Minute)
	}
	checks := []Invariant{func(r *Run) error { return r.Host.CheckReplay() }}
	if final != nil {
		checks = append(checks, final)
	}
	checks = append(checks, opts.Invariants...)
	for _, c := range checks {
		if res.Err != nil {
			break
		}
		if err := c(r); err != nil {
			// The end of the run, when the checks ran; a violation seen
			// during the run carries its own time (Problems).
			res.Err = fmt.Errorf("checked at %s: %w", w.Elapsed(), err)
		}
	}
	if r.Points != nil {
		res.Fired = r.Points.Fired()
		w.Tracef("buggify: points on %v, fired %v", r.Points.On(), res.Fired)
	}
	if res.Err != nil {
		w.Tracef("FAILED: %v", res.Err)
	}
	return res
}

// Sweep runs seeds from..to (inclusive) and returns every result.
func Sweep(s Scenario, from, to uint64, opts Options) []Result {
	var out []Result
	_ = SweepEach(s, from, to, opts, 1, func(r Result) error { out = append(out, r); return nil })
	return out
}

// SweepEach runs seeds from..to, up to parallel at once, and calls fn with
// each result in seed order on the caller's goroutine; the results are
// those of runs one at a time (each run has its own World). Only scenarios
// that keep no state outside their run may run in parallel: the built-in
// ones do (their tests sweep in parallel under the race detector). Once fn
// returns an error at most one further seed starts and its result is
// dropped; SweepEach waits for the runs already started and returns that
// error.
func SweepEach(s Scenario, from, to uint64, opts Options, parallel int, fn func(Result) error) error {
	if to < from {
		return nil
	}
	parallel = max(parallel, 1)
	// In seed order: the slot each run delivers into. Its capacity, plus
	// the slot being waited on, bounds the runs in flight.
	slots := make(chan chan Result, parallel-1)
	var stop atomic.Bool
	go func() {
		defer close(slots)
		for seed := from; !stop.Load(); seed++ {
			c := make(chan Result, 1)
			slots <- c
			go func() { c <- RunScenario(s, seed, opts) }()
			if seed == to {
				return
			}
		}
	}()
	var err error
	for c := range slots {
		r := <-c
		if err == nil {
			if err = fn(r); err != nil {
				stop.Store(true)
			}
		}
	}
	return err
}

// ReproduceCommand is what reproduces seed's run of s with opts: the
// triplane sim command line for a built-in scenario, else (the CLI knows
// only those, and runs none of Options.Invariants) a call of RunScenario.
// Either carries every option that changes the run, and the duration it
// ran for (the default when opts.Duration is 0). Both the CLI and Check
// print it, so what one prints the other can run.
func ReproduceCommand(s Scenario, seed uint64, opts Options) string {
	d := opts.Duration
	if d == 0 {
		d = DefaultDuration
	}
	if !builtin(s) || len(opts.Invariants) > 0 {
		return reproduceGo(s, seed, opts, d)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "triplane sim --scenario %s --seed %d --duration %s", s.Name, seed, d)
	if opts.Bug != "" {
		fmt.Fprintf(&b, " --bug %s", opts.Bug)
	}
	if opts.Buggify {
		b.WriteString(" --buggify")
	}
	// The CLI's faults are DefaultFaults unless a flag says otherwise.
	dflt := faultValues(DefaultFaults)
	for i, f := range faultValues(opts.Faults) {
		if f.value != dflt[i].value && (i < commonFaults || slices.Contains(s.ReadsFaults, f.field)) {
			fmt.Fprintf(&b, " --%s %s", f.flag, f.value)
		}
	}
	// Not part of the run, but a reproduction should write the same trace.
	if opts.TraceLines != 0 && opts.TraceLines != DefaultTraceLines {
		fmt.Fprintf(&b, " --trace-lines %d", opts.TraceLines)
	}
	if opts.Detail {
		b.WriteString(" --detail")
	}
	return b.String()
}

// builtin reports whether s runs as the built-in scenario of its name: a
// user's scenario may share a name but not its functions.
func builtin(s Scenario) bool {
	b, ok := Scenarios()[s.Name]
	return ok && sameFunc(s.Drive, b.Drive) && sameFunc(s.Registry, b.Registry)
}

func sameFunc(a, b any) bool {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	return !va.IsNil() && !vb.IsNil() && va.Pointer() == vb.Pointer()
}

// reproduceGo is ReproduceCommand as Go, for scenarios the CLI cannot run.
func reproduceGo(s Scenario, seed uint64, opts Options, d time.Duration) string {
	scenario := fmt.Sprintf("<your scenario %q>", s.Name)
	if builtin(s) {
		scenario = fmt.Sprintf("sim.Scenarios()[%q]", s.Name)
	}
	fields := []string{"Duration: " + goDuration(d)}
	switch {
	case opts.Faults == DefaultFaults:
		fields = append(fields, "Faults: sim.DefaultFaults")
	case opts.Faults != Faults{}:
		var set []string
		for _, f := range faultValues(opts.Faults) {
			if f.value != "0" {
				set = append(set, f.field+": "+f.value)
			}
		}
		fields = append(fields, "Faults: sim.Faults{"+strings.Join(set, ", ")+"}")
	}
	if opts.Bug != "" {
		fields = append(fields, fmt.Sprintf("Bug: %q", opts.Bug))
	}
	if opts.Buggify {
		fields = append(fields, "Buggify: true")
	}
	if n := len(opts.Invariants); n > 0 {
		fields = append(fields, fmt.Sprintf("Invariants: <your %d>", n))
	}
	if opts.TraceLines != 0 && opts.TraceLines != DefaultTraceLines {
		fields = append(fields, fmt.Sprintf("TraceLines: %d", opts.TraceLines))
	}
	if opts.Detail {
		fields = append(fields, "Detail: true")
	}
	return fmt.Sprintf("sim.RunScenario(%s, %d, sim.Options{%s})", scenario, seed, strings.Join(fields, ", "))
}

func goFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }

// faultValue is one field of Faults as the CLI's flag and Go's field name
// spell it, with its value (v; a count or a probability) written as both
// read it.
type faultValue struct {
	field, flag, value string
	v                  float64
	count              bool
}

// FaultFlag is triplane sim's flag for a field of Faults ("MessageLoss":
// "message-loss"); "" for none.
func FaultFlag(field string) string {
	for _, f := range faultValues(Faults{}) {
		if f.field == field {
			return f.flag
		}
	}
	return ""
}

// faultsRead writes the faults s reads, as %+v wrote Faults when it had
// only the common ones: a knob s ignores changes neither its run nor its
// trace, so a reproduction may leave it out.
func faultsRead(s Scenario, f Faults) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, v := range faultValues(f) {
		if i < commonFaults || slices.Contains(s.ReadsFaults, v.field) {
			if i > 0 {
				b.WriteByte(' ')
			}
			fmt.Fprintf(&b, "%s:%s", v.field, v.value)
		}
	}
	b.WriteByte('}')
	return b.String()
}

// commonFaults is how many of faultValues' fields every scenario reads
// (the journal's faults and the crash rate).
const commonFaults = 3

// faultValues lists every field of f, in one order for Validate, the
// trace header and both of ReproduceCommand's forms.
func faultValues(f Faults) []faultValue {
	prob := func(field, flag string, v float64) faultValue { return faultValue{field, flag, goFloat(v), v, false} }
	count := func(field, flag string, n int) faultValue {
		return faultValue{field, flag, strconv.Itoa(n), float64(n), true}
	}
	return []faultValue{
		prob("AppendFailure", "append-failure", f.AppendFailure),
		prob("WrittenOnFailure", "written-on-failure", f.WrittenOnFailure),
		prob("CrashRate", "crash-rate", f.CrashRate),
		prob("MessageLoss", "message-loss", f.MessageLoss),
		prob("MessageDuplicate", "message-duplicate", f.MessageDuplicate),
		count("Partitions", "partitions", f.Partitions),
		count("LeaderChanges", "leader-changes", f.LeaderChanges),
	}
}

// goDuration writes d as Go: a count of the largest unit that divides it.
func goDuration(d time.Duration) string {
	for _, u := range []struct {
		d    time.Duration
		name string
	}{{time.Hour, "time.Hour"}, {time.Minute, "time.Minute"}, {time.Second, "time.Second"},
		{time.Millisecond, "time.Millisecond"}, {time.Microsecond, "time.Microsecond"}} {
		if d%u.d == 0 {
			return fmt.Sprintf("%d * %s", d/u.d, u.name)
		}
	}
	return fmt.Sprintf("time.Duration(%d)", int64(d))
}

// Check runs a scenario over seeds in a test and fails it with the first
// failing seed and what reproduces it (ReproduceCommand).
func Check(t testing.TB, s Scenario, opts Options, seeds ...uint64) {
	t.Helper()
	for _, seed := range seeds {
		if r := RunScenario(s, seed, opts); r.Err != nil {
			t.Fatalf("scenario %s seed %d failed: %v%s", s.Name, seed, r.Err, reproduceLine(s, seed, opts, r.Err))
		}
	}
}

// reproduceLine is the line a failure message ends with: none for options
// that were refused, which nothing reproduces.
func reproduceLine(s Scenario, seed uint64, opts Options, err error) string {
	if oe := (*OptionError)(nil); errors.As(err, &oe) {
		return ""
	}
	return "\nreproduce: " + ReproduceCommand(s, seed, opts)
}

// CheckFinds sweeps seeds from..to with a fault or planted bug switched
// on and fails t unless some seed violates an invariant whose message
// contains want, and that seed fails the same way again (same trace hash):
// the test that shows a scenario finds the bug it is meant to. It returns
// the failing result.
func CheckFinds(t testing.TB, s Scenario, opts Options, from, to uint64, want string) Result {
	t.Helper()
	for _, r := range Sweep(s, from, to, opts) {
		if r.Err == nil {
			continue
		}
		if !strings.Contains(r.Err.Error(), want) {
			t.Fatalf("scenario %s seed %d failed, but not with %q: %v%s", s.Name, r.Seed, want, r.Err, reproduceLine(s, r.Seed, opts, r.Err))
		}
		again := RunScenario(s, r.Seed, opts)
		if again.Err == nil || again.Err.Error() != r.Err.Error() || again.TraceHash != r.TraceHash {
			t.Fatalf("scenario %s seed %d does not reproduce: %v / %v%s", s.Name, r.Seed, r.Err, again.Err, reproduceLine(s, r.Seed, opts, r.Err))
		}
		t.Logf("scenario %s, bug %q: found by seed %d: %v%s", s.Name, opts.Bug, r.Seed, r.Err, reproduceLine(s, r.Seed, opts, r.Err))
		return r
	}
	t.Fatalf("scenario %s: no seed in %d..%d found %q (bug %q)", s.Name, from, to, want, opts.Bug)
	return Result{}
}
