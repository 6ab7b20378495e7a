package main

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planetest"
)

var nodeLineRe = regexp.MustCompile(`^triplane node (\S+) is up:`)

func startNodeProc(t *testing.T, p *planetest.Planes, dir string, extra ...string) (*proc, string) {
	t.Helper()
	args := append([]string{"node", "--data-dir", dir, "--admin-addr", "127.0.0.1:0", "--nats", p.NATS.URL(),
		"--etcd", strings.Join(p.Etcd.Endpoints(), ","), "--lease-ttl", "1s", "--log-level", "debug"}, extra...)
	pr := start(t, nil, args...)
	select {
	case l, ok := <-pr.lines:
		m := nodeLineRe.FindStringSubmatch(l)
		if !ok || m == nil {
			<-pr.exited
			t.Fatalf("want the start line, got %q (exit %d)\n%s", l, pr.code, pr.stderr.String())
		}
		return pr, m[1]
	case <-time.After(60 * time.Second):
		t.Fatalf("triplane node printed no start line:\n%s", pr.stderr.String())
	}
	return nil, ""
}

// Two nodes join external etcd and NATS; the node hosting a wanted actor
// is killed with SIGKILL and the actor is placed on the other.
func TestNodeJoinsAndFailsOver(t *testing.T) {
	p := planetest.Start(t)
	cli := p.Etcd.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	a, idA := startNodeProc(t, p, filepath.Join(dir, "a"), "--want", "ledger/acct-1")
	b, idB := startNodeProc(t, p, filepath.Join(dir, "b"))
	procs := map[string]*proc{idA: a, idB: b}

	resp, err := cli.Get(ctx, "/triplane/default/nodes/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 2 {
		t.Fatalf("%d nodes registered, want 2", len(resp.Kvs))
	}
	key := "/triplane/default/placement/default/assign/ledger/acct-1"
	assigned := func() string {
		r, err := cli.Get(ctx, key)
		if err != nil || len(r.Kvs) == 0 {
			return ""
		}
		var rec triplanev1.PlacementRecord
		if err := protojson.Unmarshal(r.Kvs[0].Value, &rec); err != nil {
			t.Fatalf("assignment is not protobuf JSON: %v", err)
		}
		return rec.NodeId
	}
	var first string
	planetest.Poll(t, 20*time.Second, procPoll, func() bool { first = assigned(); return first != "" }, func() string {
		return fmt.Sprintf("ledger/acct-1 not placed\n%s\n%s", a.stderr.String(), b.stderr.String())
	})
	other := idA
	if first == idA {
		other = idB
	}
	t0 := time.Now()
	if err := procs[first].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	planetest.Poll(t, 20*time.Second, procPoll, func() bool { return assigned() == other }, func() string {
		return fmt.Sprintf("not moved to %s\n%s", other, procs[other].stderr.String())
	})
	t.Logf("placement failed over %s after SIGKILL (lease TTL 1s)", time.Since(t0).Round(time.Millisecond))
	if err := procs[other].cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, _ := procs[other].wait(10 * time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	// A clean stop revokes the lease: the node is gone at once.
	r, err := cli.Get(ctx, "/triplane/default/nodes/"+other)
	if err != nil || len(r.Kvs) != 0 {
		t.Fatalf("node still registered after a clean stop: %v %v", r, err)
	}
}

func TestNodeRejectsBadFlags(t *testing.T) {
	for name, args := range map[string][]string{
		"no etcd":   {"node", "--nats", "nats://127.0.0.1:4222"},
		"bad ttl":   {"node", "--nats", "nats://127.0.0.1:4222", "--etcd", "http://127.0.0.1:2379", "--lease-ttl", "10ms"},
		"bad want":  {"node", "--nats", "nats://127.0.0.1:4222", "--etcd", "http://127.0.0.1:2379", "--want", "ledger"},
		"bad group": {"node", "--nats", "nats://127.0.0.1:4222", "--etcd", "http://127.0.0.1:2379", "--placement-group", "a/b"},
		"replicas":  {"node", "--nats", "nats://127.0.0.1:4222", "--etcd", "http://127.0.0.1:2379", "--journal-replicas", "7"},
	} {
		var out, errb strings.Builder
		if code := run(context.Background(), args, &out, &errb); code != exitUsage {
			t.Errorf("%s: exit %d, want %d\n%s", name, code, exitUsage, errb.String())
		}
	}
}
