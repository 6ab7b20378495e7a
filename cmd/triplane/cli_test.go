package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad values are refused up front, naming the flag, beside a good run.
func TestBadFlagsRefusedFirst(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"in-flight 0":       {[]string{"bench", "journal", "--in-flight", "0"}, "in-flight"},
		"in-flight > per":   {[]string{"bench", "journal", "--in-flight", "100", "--per-actor", "10"}, "in-flight"},
		"latency block 0":   {[]string{"bench", "transfer", "--latency-block", "0"}, "--latency-block"},
		"latency block < 0": {[]string{"bench", "transfer", "--latency-block", "-5"}, "--latency-block"},
		"sim NaN":           {[]string{"sim", "--append-failure", "NaN"}, "append-failure"},
		"up ports":          {[]string{"up", "--nats-port", "4300", "--etcd-port", "4300"}, "port 4300 is also nats-port's"},
		"up addrs":          {[]string{"up", "--admin-addr", "127.0.0.1:4301", "--http-addr", "127.0.0.1:4301"}, "port 4301 is also admin-addr's"},
		"up admin port":     {[]string{"up", "--admin-addr", "127.0.0.1:99999"}, "admin-addr"},
		"up wildcard":       {[]string{"up", "--admin-addr", "0.0.0.0:4302", "--http-addr", "127.0.0.1:4302"}, "port 4302 is also admin-addr's"},
		"replay from > to":  {[]string{"replay", "events", "ledger", "a", "--data-dir", "/nonexistent", "--from", "3", "--to", "1"}, "--from 3 is after --to 1"},
		"up speedup 0":      {[]string{"up", "--speedup", "0"}, "speedup"},
		"serve overlap 0":   {[]string{"bench", "serve", "--overlap-weight", "0"}, "overlap-weight"},
	} {
		var out, errb strings.Builder
		if code := run(context.Background(), tc.args, &out, &errb); code != exitUsage || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%s: exit %d, want %d naming %s\n%s", name, code, exitUsage, tc.want, errb.String())
		}
	}
}

// A config file is read only by commands that have --config: one meant
// for `up` (TRIPLANE_CONFIG) neither breaks nor changes a simulation.
func TestConfigFileOnlyForCommandsThatTakeIt(t *testing.T) {
	f := filepath.Join(t.TempDir(), "up.yaml")
	if err := os.WriteFile(f, []byte("workers: 4\nnats-port: 5000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TRIPLANE_CONFIG", f)
	var out, errb strings.Builder
	if code := run(context.Background(), []string{"sim", "--scenario", "ledger", "--seeds", "1..2", "--duration", "100ms"}, &out, &errb); code != 0 {
		t.Fatalf("sim with TRIPLANE_CONFIG set for up: exit %d\n%s", code, errb.String())
	}
}

// The port check refuses only real clashes: external servers' ports are
// not used, hosts that differ do not clash, an empty port is any free one.
func TestUpPortCheckAllowsGoodSetups(t *testing.T) {
	for name, args := range map[string][]string{
		"external nats":   {"--nats", "nats://10.0.0.1:4222", "--nats-port", "2379"},
		"external etcd":   {"--etcd", "http://10.0.0.1:2379", "--etcd-port", "4222", "--etcd-peer-port", "4222"},
		"different hosts": {"--admin-addr", "127.0.0.1:4303", "--http-addr", "127.0.0.2:4303"},
		"empty port":      {"--admin-addr", "127.0.0.1:", "--http-addr", "127.0.0.1:"},
		"named port":      {"--admin-addr", "127.0.0.1:http"},
		"no frontend, 0s": {"--http-addr", "", "--nats-port", "0", "--etcd-port", "0", "--etcd-peer-port", "0"},
	} {
		f := &upFlags{}
		if err := newUpCmdFor(&globalFlags{}, f).Flags().Parse(args); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := f.validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}
