package main

import (
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
