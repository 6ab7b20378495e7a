package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/triplane-dev/triplane/planetest"
)

// The test binary doubles as the triplane binary: with this variable set it
// runs main instead of the tests, so subprocess tests need no separate build.
const runMainEnv = "TRIPLANE_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
	}
	// Commands run in-process (sim, bench route) would otherwise tune
	// the collector for the whole test binary (batchGC leaves it alone
	// when GOGC is set); TestBatchGCFallsBackOnALargeLiveHeap clears it
	// for itself.
	if os.Getenv("GOGC") == "" {
		_ = os.Setenv("GOGC", "100")
	}
	os.Exit(m.Run())
}

// proc is a triplane subprocess.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	stderr *syncBuffer
	lines  chan string
	exited chan struct{}
	code   int
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs triplane with args and env (KEY=VALUE) added to a clean
// TRIPLANE_-free environment.
func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TRIPLANE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, runMainEnv+"=1")
	cmd.Env = append(cmd.Env, env...)
	p := &proc{t: t, cmd: cmd, stderr: &syncBuffer{}, lines: make(chan string, 100), exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		err := cmd.Wait()
		p.code = cmd.ProcessState.ExitCode()
		if err != nil && p.code < 0 {
			p.code = -1
		}
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("triplane %s stderr:\n%s", strings.Join(args, " "), p.stderr.String())
		}
	})
	return p
}

// wait waits for the process to exit and returns its exit code and stdout.
func (p *proc) wait(timeout time.Duration) (int, string) {
	p.t.Helper()
	var out strings.Builder
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if ok {
				out.WriteString(l + "\n")
				continue
			}
			p.lines = nil
		case <-p.exited:
			// lines is closed before exited, so this drains what is left.
			if p.lines != nil {
				for l := range p.lines {
					out.WriteString(l + "\n")
				}
			}
			return p.code, out.String()
		case <-deadline:
			p.t.Fatalf("triplane did not exit within %s", timeout)
		}
	}
}

var (
	adminRe = regexp.MustCompile(`admin=http://(\S+)`)
	natsRe  = regexp.MustCompile(`nats=(\S+)`)
	etcdRe  = regexp.MustCompile(`etcd=(\S+)`)
)

// up is a running `triplane up`.
type up struct {
	*proc
	line  string
	admin string
	nats  string
	etcd  string
}

// startUp starts `triplane up` on free ports in dir and waits for its
// start line.
func startUp(t *testing.T, dir string, extra ...string) *up {
	t.Helper()
	args := append([]string{"up", "--data-dir", dir, "--nats-port", "0", "--etcd-port", "0",
		"--etcd-peer-port", "0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-level", "debug"}, extra...)
	p := start(t, nil, args...)
	select {
	case l, ok := <-p.lines:
		if !ok || !strings.HasPrefix(l, "triplane is up:") {
			<-p.exited
			t.Fatalf("want the start line, got %q (exit %d)\n%s", l, p.code, p.stderr.String())
		}
		return &up{proc: p, line: l,
			admin: adminRe.FindStringSubmatch(l)[1],
			nats:  natsRe.FindStringSubmatch(l)[1],
			etcd:  etcdRe.FindStringSubmatch(l)[1]}
	case <-time.After(60 * time.Second):
		t.Fatalf("triplane up printed no start line within 60s:\n%s", p.stderr.String())
	}
	return nil
}

// stop sends sig and checks the process exits 0 within the promised 10 s.
func (u *up) stop(sig syscall.Signal) {
	u.t.Helper()
	if err := u.cmd.Process.Signal(sig); err != nil {
		u.t.Fatal(err)
	}
	code, _ := u.wait(10 * time.Second)
	if code != 0 {
		u.t.Fatalf("exit code %d after %s, want 0\n%s", code, sig, u.stderr.String())
	}
}

// procPoll is how often these tests poll the processes they start: those
// offer nothing in this one to wait on, and polling every millisecond, as
// planetest.Eventually does, would only take CPU from them.
const procPoll = 20 * time.Millisecond

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestUpStartReadyStop(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			u := startUp(t, dir)
			if !strings.Contains(u.line, "(embedded)") || !strings.Contains(u.line, "Ctrl-C") {
				t.Errorf("start line should say what is embedded and how to stop: %q", u.line)
			}
			if code, body := get(t, "http://"+u.admin+"/healthz"); code != 200 {
				t.Errorf("/healthz = %d %s", code, body)
			}
			code, body := get(t, "http://"+u.admin+"/readyz")
			if code != 200 || !strings.Contains(body, `"ready":true`) || !strings.Contains(body, `"journal":{"status":"ok"}`) {
				t.Errorf("/readyz = %d %s", code, body)
			}
			code, body = get(t, "http://"+u.admin+"/metrics")
			for _, want := range []string{"triplane_build_info", "go_goroutines", "etcd_server_has_leader"} {
				if code != 200 || !strings.Contains(body, want) {
					t.Errorf("/metrics (%d) lacks %s", code, want)
				}
			}
			for _, sub := range []string{"nats", "etcd", "triplane.lock", "node-id"} {
				if _, err := os.Stat(filepath.Join(dir, sub)); err != nil {
					t.Errorf("data dir lacks %s: %v", sub, err)
				}
			}
			u.stop(sig)
			if !strings.Contains(u.stderr.String(), "msg=stopped") {
				t.Errorf("log does not say it stopped:\n%s", u.stderr.String())
			}
		})
	}
}

func TestUpRestartKeepsStreamAndKey(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	u := startUp(t, dir)
	nc, err := nats.Connect(u.nats)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "keep.one", []byte("hello")); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	ec, err := clientv3.New(clientv3.Config{Endpoints: []string{u.etcd}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ec.Put(ctx, "/test/keep", "v1"); err != nil {
		t.Fatal(err)
	}
	ec.Close()
	u.stop(syscall.SIGTERM)

	u = startUp(t, dir)
	nc, err = nats.Connect(u.nats)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ = jetstream.New(nc)
	s, err := js.Stream(ctx, "KEEP")
	if err != nil {
		t.Fatalf("stream KEEP after restart: %v", err)
	}
	msg, err := s.GetLastMsgForSubject(ctx, "keep.one")
	if err != nil {
		t.Fatalf("message after restart: %v", err)
	}
	if string(msg.Data) != "hello" {
		t.Fatalf("message after restart = %q, want hello", msg.Data)
	}
	ec, err = clientv3.New(clientv3.Config{Endpoints: []string{u.etcd}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer ec.Close()
	resp, err := ec.Get(ctx, "/test/keep")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v1" {
		t.Fatalf("etcd key after restart: %v %v", err, resp)
	}
	u.stop(syscall.SIGINT)
}

func TestUpDataDirLock(t *testing.T) {
	dir := t.TempDir()
	u := startUp(t, dir)
	second := start(t, nil, "up", "--data-dir", dir, "--nats-port", "0", "--etcd-port", "0",
		"--etcd-peer-port", "0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0")
	code, _ := second.wait(30 * time.Second)
	if code != 1 || !strings.Contains(second.stderr.String(), "is in use by another triplane process (pid") ||
		!strings.Contains(second.stderr.String(), "--data-dir") {
		t.Fatalf("second up on the same data dir: exit %d, stderr:\n%s", code, second.stderr.String())
	}
	// The first one is unharmed.
	if code, body := get(t, "http://"+u.admin+"/readyz"); code != 200 {
		t.Fatalf("/readyz of the first = %d %s", code, body)
	}
	u.stop(syscall.SIGTERM)
}

func TestUpPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	busy := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	for _, tc := range []struct{ flag, value string }{
		{"nats-port", busy},
		{"etcd-port", busy},
		{"etcd-peer-port", busy},
		{"admin-addr", "127.0.0.1:" + busy},
		{"http-addr", "127.0.0.1:" + busy},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			args := []string{"up", "--data-dir", t.TempDir(), "--nats-port", "0", "--etcd-port", "0",
				"--etcd-peer-port", "0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--" + tc.flag, tc.value}
			p := start(t, nil, args...)
			code, _ := p.wait(30 * time.Second)
			stderr := p.stderr.String()
			if code != 1 || !strings.Contains(stderr, "--"+tc.flag) || strings.Contains(stderr, "goroutine ") {
				t.Fatalf("exit %d, want 1 and a message naming --%s:\n%s", code, tc.flag, stderr)
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	cfg := func(body string) string {
		path := filepath.Join(t.TempDir(), "triplane.yaml")
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want []string
	}{
		{"unknown flag", nil, []string{"up", "--no-such-flag"}, []string{"no-such-flag"}},
		{"bad flag value", nil, []string{"up", "--nats-port", "abc"}, []string{"nats-port", "abc"}},
		{"port out of range", nil, []string{"up", "--etcd-port", "70000"}, []string{"etcd-port", "70000"}},
		{"bad log format", nil, []string{"version", "--log-format", "xml"}, []string{"log-format", "xml"}},
		{"bad env value", []string{"TRIPLANE_NATS_PORT=x"}, []string{"up"}, []string{"nats-port", "TRIPLANE_NATS_PORT"}},
		{"bad file value", nil, []string{"up", "--config", cfg("nats-port: twelve\n")}, []string{`"nats-port"`, "twelve", "line 1"}},
		{"unknown file key", nil, []string{"up", "--config", cfg("nats_prot: 1\n")}, []string{`"nats_prot"`, "unknown key"}},
		{"file not yaml", nil, []string{"up", "--config", cfg("- a\n- b\n")}, []string{"config", "YAML"}},
		{"missing file", nil, []string{"up", "--config", "/nonexistent/triplane.yaml"}, []string{"config", "no such file"}},
		{"bad nats url", nil, []string{"up", "--nats", "localhost"}, []string{`"nats"`, "nats://"}},
		{"unknown command", nil, []string{"dwon"}, []string{"unknown command", "dwon"}},
		{"extra argument", nil, []string{"up", "now"}, []string{"no arguments"}},
		{"body timeout out of range", nil, []string{"up", "--body-timeout", "1ns"}, []string{"body-timeout", "10ms-10m"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, tc.env, tc.args...)
			code, _ := p.wait(30 * time.Second)
			stderr := p.stderr.String()
			if code != 2 {
				t.Errorf("exit code %d, want 2; stderr:\n%s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
		})
	}
}

func TestPrintConfigPrecedence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "triplane.yaml")
	body := "nats-port: 1111\netcd-port: 2222\netcd-peer-port: 3333\netcd: [http://a:1, http://b:2]\n"
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	p := start(t, []string{"TRIPLANE_ETCD_PORT=4444", "TRIPLANE_NATS_PORT=5555", "TRIPLANE_CONFIG=" + path},
		"up", "--print-config", "--nats-port", "6666")
	code, out := p.wait(30 * time.Second)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, p.stderr.String())
	}
	for _, want := range []string{
		"nats-port: 6666",      // flag beats env and file
		"etcd-port: 4444",      // env beats file
		"etcd-peer-port: 3333", // file beats default
		"- http://a:1",
		"admin-addr: 127.0.0.1:9091", // default
		"[flag, env TRIPLANE_NATS_PORT]",
		"[env, env TRIPLANE_ETCD_PORT]",
		"[file, env TRIPLANE_ETCD_PEER_PORT]",
		"file: " + path,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("--print-config lacks %q:\n%s", want, out)
		}
	}
	// What it prints is a config file that up accepts.
	again := filepath.Join(t.TempDir(), "again.yaml")
	if err := os.WriteFile(again, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	p = start(t, nil, "up", "--print-config", "--config", again)
	if code, out2 := p.wait(30 * time.Second); code != 0 || !strings.Contains(out2, "nats-port: 6666") {
		t.Fatalf("re-reading printed config: exit %d\n%s\n%s", code, out2, p.stderr.String())
	}
}

func TestUpExternalServers(t *testing.T) {
	planes := planetest.Start(t)
	dir := t.TempDir()
	u := startUp(t, dir, "--nats", planes.NATS.URL(), "--etcd", strings.Join(planes.Etcd.Endpoints(), ","))
	if u.nats != planes.NATS.URL() || u.etcd != planes.Etcd.Endpoints()[0] {
		t.Errorf("start line %q does not name the external servers", u.line)
	}
	if strings.Contains(u.line, "(embedded)") {
		t.Errorf("nothing should be embedded: %q", u.line)
	}
	if code, body := get(t, "http://"+u.admin+"/readyz"); code != 200 {
		t.Errorf("/readyz = %d %s", code, body)
	}
	for _, sub := range []string{"nats", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, sub)); err == nil {
			t.Errorf("data dir has %s although the server is external", sub)
		}
	}
	u.stop(syscall.SIGTERM)
}

func TestVersionAndHelp(t *testing.T) {
	p := start(t, nil, "version")
	if code, out := p.wait(30 * time.Second); code != 0 || !strings.HasPrefix(out, "triplane ") {
		t.Fatalf("version: exit %d %q", code, out)
	}
	for _, cmd := range [][]string{{"--help"}, {"up", "--help"}, {"version", "--help"}} {
		p := start(t, nil, cmd...)
		code, out := p.wait(30 * time.Second)
		if code != 0 || !strings.Contains(out, "Usage:") {
			t.Errorf("%v: exit %d\n%s", cmd, code, out)
		}
	}
}

// With --drain-grace, a stop first turns /readyz not ready while the node
// still serves; a second signal ends the grace, and the stop goes on.
func TestUpDrainGrace(t *testing.T) {
	u := startUp(t, t.TempDir(), "--drain-grace", "30s")
	if err := u.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	planetest.Poll(t, 10*time.Second, procPoll, func() bool {
		code, _ := get(t, "http://"+u.admin+"/readyz")
		return code == http.StatusServiceUnavailable
	}, func() string { return "/readyz stayed ready after the stop signal:\n" + u.stderr.String() })
	if code, body := get(t, "http://"+u.admin+"/healthz"); code != 200 {
		t.Fatalf("/healthz during the grace = %d %s", code, body)
	}
	u.stop(syscall.SIGTERM)
}
