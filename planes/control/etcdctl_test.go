package control_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

// An operator lists the registrations with plain etcdctl (the module's
// `go tool etcdctl`) and reads them.
func TestEtcdctlListsInstancesReadably(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to run `go tool etcdctl`")
	}
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	r, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: e.Client(t), Namespace: "test", Node: nodeInfo("n1")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	for _, id := range []string{"w1", "w2"} {
		if err := r.Register(ctx, instance(id)); err != nil {
			t.Fatal(err)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute) // the first run builds etcdctl
	defer cancel()
	out, err := exec.CommandContext(cctx, gobin, "tool", "etcdctl", "--endpoints", e.Endpoints()[0],
		"get", "--prefix", "/triplane/test/instances/").CombinedOutput()
	if err != nil {
		t.Fatalf("etcdctl: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 4 || lines[0] != "/triplane/test/instances/worker/generate/w1" || lines[2] != "/triplane/test/instances/worker/generate/w2" {
		t.Fatalf("listing:\n%s", out)
	}
	for _, want := range []string{`"instance_id":"w1"`, `"node_id":"n1"`, `"state":"HEALTH_STATE_READY"`, `"address":"127.0.0.1:9000"`} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("value %s lacks %s", lines[1], want)
		}
	}
	t.Logf("etcdctl get --prefix /triplane/test/instances/:\n%s", out)
}
