package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestSimCommand(t *testing.T) {
	p := start(t, nil, "sim", "--seeds", "1..3")
	code, out := p.wait(60 * time.Second)
	if code != 0 || !strings.Contains(out, "3 runs, 0 failed") || strings.Index(out, "seed 1:") > strings.Index(out, "seed 3:") {
		t.Fatalf("sweep: exit %d\n%s%s", code, out, p.stderr.String())
	}
	dir := t.TempDir()
	p = start(t, nil, "sim", "--seed", "1", "--bug", "apply-before-persist", "--trace", dir+"/run.trace")
	code, out = p.wait(60 * time.Second)
	if code != 1 || !strings.Contains(out, "invariant replay") || !strings.Contains(out, "reproduce: triplane sim --scenario ledger --seed 1") {
		t.Fatalf("planted bug: exit %d\n%s", code, out)
	}
	p = start(t, nil, "sim", "--seeds", "9..2")
	if code, _ := p.wait(30 * time.Second); code != 2 || !strings.Contains(p.stderr.String(), `"seeds"`) {
		t.Fatalf("bad seeds: exit %d %s", code, p.stderr.String())
	}
	for _, n := range []string{"0", "257"} {
		p = start(t, nil, "sim", "--seeds", "1..2", "--parallel", n)
		if code, _ := p.wait(30 * time.Second); code != 2 || !strings.Contains(p.stderr.String(), `"parallel"`) {
			t.Fatalf("--parallel %s: exit %d %s", n, code, p.stderr.String())
		}
	}
	p = start(t, nil, "sim", "--scenario", "nope")
	if code, _ := p.wait(30 * time.Second); code != 2 || !strings.Contains(p.stderr.String(), "unknown scenario") {
		t.Fatalf("bad scenario: exit %d %s", code, p.stderr.String())
	}
}

// simRun runs triplane in this process; traces go under dir.
func simRun(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb strings.Builder
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

var traceHash = regexp.MustCompile(`trace ([0-9a-f]{16})\)`)

// The reproduce line carries the flags that changed the run: run as
// printed it fails the same way, with the same trace hash. The line it
// used to print (no fault flags) is another run.
func TestSimReproduceLineReproduces(t *testing.T) {
	dir := t.TempDir()
	code, out, _ := simRun(t, "sim", "--scenario", "ledger", "--seeds", "13..13", "--bug", "apply-before-persist",
		"--append-failure", "0.3", "--crash-rate", "0.5", "--trace", filepath.Join(dir, "first"))
	m := regexp.MustCompile(`reproduce: triplane (.*)\n`).FindStringSubmatch(out)
	h := traceHash.FindStringSubmatch(out)
	if code != 1 || m == nil || h == nil {
		t.Fatalf("exit %d, want a failure with a reproduce line:\n%s", code, out)
	}
	if want := "sim --scenario ledger --seed 13 --duration 2s --bug apply-before-persist --append-failure 0.3 --crash-rate 0.5"; m[1] != want {
		t.Fatalf("reproduce: triplane %s\nwant      triplane %s", m[1], want)
	}
	args := append(strings.Fields(m[1]), "--trace", filepath.Join(dir, "again"))
	code, again, _ := simRun(t, args...)
	if h2 := traceHash.FindStringSubmatch(again); code != 1 || h2 == nil || h2[1] != h[1] {
		t.Fatalf("the reproduce line ran another run (exit %d, trace %v, want %s):\n%s", code, h2, h[1], again)
	}
	code, old, _ := simRun(t, "sim", "--scenario", "ledger", "--seed", "13", "--duration", "2s", "--bug", "apply-before-persist", "--trace", filepath.Join(dir, "old"))
	if h3 := traceHash.FindStringSubmatch(old); h3 == nil || h3[1] == h[1] {
		t.Fatalf("the old line, without the faults, gave the same run (exit %d):\n%s", code, old)
	}
}

// Flags a run cannot take are refused up front (exit 2, naming the flag
// and what is wrong), each beside the nearest one that runs.
func TestSimRefusesBadOptions(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		bad, good []string
		want      []string
	}{
		// Another scenario's bug used to run clean, as if the simulator
		// missed it.
		{[]string{"--scenario", "ledger", "--bug", "router-ignores-gap"}, []string{"--scenario", "serving", "--bug", "router-ignores-gap"},
			[]string{`"bug"`, `"router-ignores-gap" is planted by scenario serving, not ledger, which plants only apply-before-persist, snapshot-before-persist`}},
		{[]string{"--scenario", "transfer", "--bug", "nope"}, []string{"--scenario", "transfer", "--bug", "ack-before-verify"},
			[]string{`"bug"`, `unknown bug "nope": scenario transfer plants only apply-before-persist, snapshot-before-persist, ack-before-verify`}},
		{[]string{"--duration", "-1s"}, []string{"--duration", "1ms"}, []string{`"duration"`, "negative"}},
		{[]string{"--duration", "0s"}, []string{"--duration", "1ms"}, []string{`"duration"`, "must be positive"}},
		{[]string{"--duration", "1h0m1s"}, []string{"--duration", "1ms"}, []string{`"duration"`, "over the limit of 1h0m0s"}},
		{[]string{"--crash-rate", "1.5"}, []string{"--crash-rate", "1"}, []string{`"crash-rate"`, "outside [0, 1]"}},
		{[]string{"--written-on-failure", "NaN"}, []string{"--written-on-failure", "0"}, []string{`"written-on-failure"`, "outside [0, 1]"}},
		{[]string{"--trace-lines", "0"}, []string{"--trace-lines", "1"}, []string{`"trace-lines"`, "at least 1"}},
		// 256 runs of an hour at once would need hundreds of GB.
		{[]string{"--seeds", "1..256", "--parallel", "256", "--duration", "1h"}, []string{"--seeds", "1..2", "--parallel", "256", "--duration", "1ms"},
			[]string{`"parallel"`, "256 runs of 1h0m0s at once hold 256h0m0s of virtual time in memory, over the limit of 4h0m0s"}},
		// --seed beside --seeds used to be ignored without a word.
		{[]string{"--seed", "3", "--seeds", "1..2"}, []string{"--seed", "1"}, []string{`"seed"`, "give one"}},
		{[]string{"--scenario", "serving", "--message-loss", "2"}, []string{"--scenario", "serving", "--message-loss", "1"}, []string{`"message-loss"`, "outside [0, 1]"}},
		{[]string{"--scenario", "serving", "--partitions", "-1"}, []string{"--scenario", "serving", "--partitions", "0"}, []string{`"partitions"`, "outside [0, 1000]"}},
		{[]string{"--leader-changes", "1001"}, []string{"--leader-changes", "1000"}, []string{`"leader-changes"`, "outside [0, 1000]"}},
		{[]string{"--trace-lines", "-5"}, []string{"--trace-lines", "1"}, []string{`"trace-lines"`, "negative"}},
		{[]string{"--trace-lines", "10000001"}, []string{"--trace-lines", "10000000"}, []string{`"trace-lines"`, "over the limit of 10000000"}},
	} {
		code, out, errs := simRun(t, append([]string{"sim"}, tc.bad...)...)
		for _, w := range tc.want {
			if code != exitUsage || !strings.Contains(errs, w) || out != "" {
				t.Errorf("sim %v: exit %d, want %d saying %q\n%s%s", tc.bad, code, exitUsage, w, out, errs)
			}
		}
		args := append([]string{"sim", "--duration", "100ms", "--trace", filepath.Join(dir, "good")}, tc.good...)
		if code, out, errs := simRun(t, args...); code == exitUsage || !strings.Contains(out, "seed 1: ") {
			t.Errorf("sim %v: exit %d, want a run\n%s%s", tc.good, code, out, errs)
		}
	}
}

// --buggify where the scenario's code has no fault points says so (it
// used to say nothing) and still runs, so a reproduce line printed by a
// Go test with Buggify works; where there are fault points it says
// nothing more.
func TestSimBuggifyWithoutFaultPointsSaysSo(t *testing.T) {
	dir := t.TempDir()
	code, out, errs := simRun(t, "sim", "--scenario", "ledger", "--buggify", "--duration", "100ms", "--trace", filepath.Join(dir, "ledger"))
	if code != 0 || !strings.Contains(out, "seed 1: ok") ||
		!strings.Contains(errs, "buggify: scenario ledger's code has no fault points; nothing to switch on (scenarios with fault points: serving)") {
		t.Fatalf("ledger --buggify: exit %d\n%s%s", code, out, errs)
	}
	code, out, errs = simRun(t, "sim", "--scenario", "serving", "--buggify", "--duration", "100ms", "--trace", filepath.Join(dir, "serving"))
	if code != 0 || strings.Contains(errs, "no fault points") {
		t.Fatalf("serving --buggify: exit %d\n%s%s", code, out, errs)
	}
}

// A trace cut at --trace-lines says so where it is written and at its
// end; a larger --trace-lines keeps it whole, with the same trace hash.
func TestSimTraceLines(t *testing.T) {
	dir := t.TempDir()
	// 60 s of ledger load traces about 15,000 lines: past the default.
	cut, whole := filepath.Join(dir, "cut"), filepath.Join(dir, "whole")
	_, out1, _ := simRun(t, "sim", "--scenario", "ledger", "--duration", "60s", "--trace", cut)
	_, out2, _ := simRun(t, "sim", "--scenario", "ledger", "--duration", "60s", "--trace", whole, "--trace-lines", "10000000")
	h1, h2 := traceHash.FindStringSubmatch(out1), traceHash.FindStringSubmatch(out2)
	if h1 == nil || h2 == nil || h1[1] != h2[1] {
		t.Fatalf("trace hashes differ with --trace-lines:\n%s%s", out1, out2)
	}
	wholeLines := readLines(t, whole)
	if !strings.Contains(out2, "trace written to "+whole+"\n") || len(wholeLines) <= 10_000 {
		t.Fatalf("whole trace: %d lines\n%s", len(wholeLines), out2)
	}
	wantOut := fmt.Sprintf("trace written to %s (cut after its first 10000 of %d lines: --trace-lines keeps more)\n", cut, len(wholeLines))
	cutLines := readLines(t, cut)
	wantLast := fmt.Sprintf("... trace cut after 10000 lines: %d more were not kept (the trace hash covers them); triplane sim --trace-lines %d (Options.TraceLines) keeps them all",
		len(wholeLines)-10_000, len(wholeLines))
	if !strings.Contains(out1, wantOut) || len(cutLines) != 10_001 || cutLines[10_000] != wantLast {
		t.Fatalf("cut trace: %d lines ending %q\n%s\nwant %q and the last line %q", len(cutLines), cutLines[len(cutLines)-1], out1, wantOut, wantLast)
	}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// The help says which bug, crash faults and fault points go with which
// scenario, from the scenarios themselves.
func TestSimHelpPerScenario(t *testing.T) {
	code, out, _ := simRun(t, "sim", "--help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{
		"  ledger: ", "    --bug: apply-before-persist, snapshot-before-persist\n",
		"    --bug: apply-before-persist, snapshot-before-persist, router-ignores-gap, stale-route\n",
		"    --bug: apply-before-persist, snapshot-before-persist, ack-before-verify\n",
		"    --bug: apply-before-persist, snapshot-before-persist, unfenced-writes\n",
		"apply-before-persist, snapshot-before-persist (every scenario); router-ignores-gap, stale-route (serving); ack-before-verify (transfer); unfenced-writes (placement)",
		"    --crash-rate: each worker crashes once with probability 3x the rate",
		"    --buggify: mocker.step.slow, ",
		"fault points exist only in serving",
		"--trace-lines int",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("help lacks %q", want)
		}
	}
	if strings.Contains(out, "probability that a command's actor crashes just before it arrives") {
		t.Error("the help still says every scenario reads --crash-rate as ledger does")
	}
	if t.Failed() {
		t.Log(out)
	}
}

// A failure offers the same run with --detail; that line runs the same
// run (same hash) and its trace says what the requests did.
func TestSimDetailLine(t *testing.T) {
	dir := t.TempDir()
	code, out, _ := simRun(t, "sim", "--scenario", "serving", "--seeds", "1..1", "--duration", "2s", "--bug", "stale-route",
		"--trace", filepath.Join(dir, "plain"))
	m := regexp.MustCompile(`what each request and repair did: triplane (.*)\n`).FindStringSubmatch(out)
	h := traceHash.FindStringSubmatch(out)
	if code != 1 || m == nil || h == nil || !strings.HasSuffix(m[1], " --detail") {
		t.Fatalf("exit %d, want a failure offering --detail:\n%s", code, out)
	}
	args := append(strings.Fields(m[1]), "--trace", filepath.Join(dir, "detailed"))
	code, again, _ := simRun(t, args...)
	if h2 := traceHash.FindStringSubmatch(again); code != 1 || h2 == nil || h2[1] != h[1] {
		t.Fatalf("--detail ran another run (exit %d, trace %v, want %s):\n%s", code, h2, h[1], again)
	}
	if strings.Contains(again, "--detail\n") && strings.Contains(again, "what each request and repair did") {
		t.Fatalf("a detailed run offers detail again:\n%s", again)
	}
	b, err := os.ReadFile(filepath.Join(dir, "detailed"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), " · q") || !strings.Contains(string(b), " routed to ") {
		t.Fatalf("the detailed trace says nothing of the requests:\n%.2000s", b)
	}
	// A scenario without detail lines is not offered a run with them.
	code, out, _ = simRun(t, "sim", "--scenario", "ledger", "--seed", "1", "--bug", "apply-before-persist", "--trace", filepath.Join(dir, "ledger"))
	if code != 1 || strings.Contains(out, "--detail") {
		t.Fatalf("ledger offers --detail (exit %d):\n%s", code, out)
	}
}

// A sweep with many failing seeds writes traces for the first few only
// (it used to write one per failing seed into the working directory) and
// lists a bounded number of seeds; with --trace every seed's is written,
// as asked.
func TestSimSweepBoundsItsTraces(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	code, out, errs := simRun(t, "sim", "--scenario", "ledger", "--seeds", "1..120", "--bug", "apply-before-persist")
	files, _ := filepath.Glob(filepath.Join(dir, "triplane-sim-*.trace"))
	if code != 1 || len(files) != maxAutoTraces || !strings.Contains(out, "traces written for the first 10 failing seeds only") {
		t.Fatalf("exit %d, %d trace files, want %d:\n%s", code, len(files), maxAutoTraces, out[max(0, len(out)-500):])
	}
	if !regexp.MustCompile(`failing seeds: \[[0-9 ]+\] and \d+ more`).MatchString(errs) {
		t.Fatalf("the failing seeds are not bounded: %s", errs)
	}
	// Exactly as many failures as traces written unasked: none skipped,
	// nothing said about it.
	sub := filepath.Join(dir, "ten")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Chdir(sub)
	code, out, _ = simRun(t, "sim", "--scenario", "ledger", "--seeds", "1..10", "--bug", "apply-before-persist")
	files, _ = filepath.Glob(filepath.Join(sub, "triplane-sim-*.trace"))
	if code != 1 || len(files) != 10 || strings.Contains(out, "first 10 failing seeds only") {
		t.Fatalf("10 failing seeds: exit %d, %d traces:\n%s", code, len(files), out[max(0, len(out)-300):])
	}
	asked := filepath.Join(dir, "asked", "t")
	if err := os.Mkdir(filepath.Dir(asked), 0o755); err != nil {
		t.Fatal(err)
	}
	simRun(t, "sim", "--scenario", "ledger", "--seeds", "1..12", "--bug", "apply-before-persist", "--trace", asked)
	if files, _ := filepath.Glob(asked + ".*"); len(files) != 12 {
		t.Fatalf("--trace wrote %d of 12 traces", len(files))
	}
}
