package serving_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/all"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving"
	"github.com/triplane-dev/triplane/serving/worker"
)

type env struct {
	ctx    context.Context
	j      *journal.Journal
	stack  *serving.Stack
	base   string
	planes serving.Planes
	reg    *prometheus.Registry
}

func start(t *testing.T, workers int, mod ...func(*serving.Config)) *env {
	t.Helper()
	p := planetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	nc := p.NATS.Connect(t)
	j, err := journal.Open(ctx, nc, journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := journal.OpenSnapshots(filepath.Join(t.TempDir(), "snapshots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snaps.Close() })
	h, err := actors.NewHost(actors.HostConfig{Journal: j, Snapshots: snaps, Registry: all.Registry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop(context.Background()) })
	cli := p.Etcd.Client(t)
	reg, err := control.StartRegistrar(ctx, control.RegistrarConfig{Client: cli, Namespace: "test",
		Node: &triplanev1.NodeInfo{Identity: &triplanev1.NodeIdentity{NodeId: "n1"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close(context.Background()) })
	cfg := serving.Config{Workers: workers, Frontend: true, HTTPAddr: "127.0.0.1:0", Model: "mock",
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 256, SpeedUp: 100}, StreamToken: "s3cret", DataToken: "d4ta"}
	for _, m := range mod {
		m(&cfg)
	}
	metrics := prometheus.NewRegistry()
	planes := serving.Planes{NATS: nc, Etcd: cli, Host: h, Registrar: reg, NodeID: "n1", Namespace: "test", Registerer: metrics}
	s, err := serving.Start(ctx, planes, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	e := &env{ctx: ctx, j: j, stack: s, base: "http://" + s.Frontend.Addr(), planes: planes, reg: metrics}
	// Discovery sees the workers once their registrations are watched.
	planetest.Eventually(t, "workers discovered", func() bool {
		_, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":"warm up","max_tokens":1}`)
		return err == nil
	})
	return e
}

func (e *env) post(t *testing.T, path, body string) (map[string]any, error) {
	t.Helper()
	resp, err := http.Post(e.base+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("status %d, body %q: %w", resp.StatusCode, b, err)
	}
	if resp.StatusCode != http.StatusOK {
		return out, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	return out, nil
}

func TestCompletionsAndChat(t *testing.T) {
	e := start(t, 2)
	out, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":"the quick brown fox jumps over the lazy dog","max_tokens":5}`)
	if err != nil {
		t.Fatal(err)
	}
	ch := out["choices"].([]any)[0].(map[string]any)
	if ch["finish_reason"] != "length" || len(strings.Fields(ch["text"].(string))) != 5 {
		t.Fatalf("completion %v", out)
	}
	u := out["usage"].(map[string]any)
	if u["completion_tokens"].(float64) != 5 || u["prompt_tokens"].(float64) != 10 {
		t.Fatalf("usage %v", u)
	}
	out, err = e.post(t, "/v1/chat/completions", `{"model":"mock","messages":[{"role":"user","content":"hi there"}],"max_completion_tokens":3}`)
	if err != nil {
		t.Fatal(err)
	}
	msg := out["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)
	if msg["role"] != "assistant" || len(strings.Fields(msg["content"].(string))) != 3 || out["object"] != "chat.completion" {
		t.Fatalf("chat %v", out)
	}
	resp, err := http.Get(e.base + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var models map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&models)
	resp.Body.Close()
	if models["data"].([]any)[0].(map[string]any)["id"] != "mock" {
		t.Fatalf("models %v", models)
	}
}

func TestStreaming(t *testing.T) {
	e := start(t, 1)
	for _, tc := range []struct{ path, body, object string }{
		{"/v1/completions", `{"model":"mock","prompt":"stream me","max_tokens":6,"stream":true,"stream_options":{"include_usage":true}}`, "text_completion"},
		{"/v1/chat/completions", `{"model":"mock","messages":[{"role":"user","content":"stream me"}],"max_tokens":6,"stream":true}`, "chat.completion.chunk"},
	} {
		resp, err := http.Post(e.base+tc.path, "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
			t.Fatalf("content type %q", ct)
		}
		sc := bufio.NewScanner(resp.Body)
		var words int
		var finish string
		done := false
		for sc.Scan() {
			line := sc.Text()
			if line == "" {
				continue
			}
			data, ok := strings.CutPrefix(line, "data: ")
			if !ok {
				t.Fatalf("not an SSE data line: %q", line)
			}
			if data == "[DONE]" {
				done = true
				break
			}
			var ev map[string]any
			if err := json.Unmarshal([]byte(data), &ev); err != nil {
				t.Fatal(err)
			}
			if ev["object"] != tc.object {
				t.Fatalf("object %v", ev["object"])
			}
			for _, c := range ev["choices"].([]any) {
				c := c.(map[string]any)
				if f, ok := c["finish_reason"].(string); ok {
					finish = f
				}
				text, _ := c["text"].(string)
				if d, ok := c["delta"].(map[string]any); ok {
					text, _ = d["content"].(string)
				}
				words += len(strings.Fields(text))
			}
		}
		resp.Body.Close()
		if !done || words != 6 || finish != "length" {
			t.Fatalf("%s: done %v words %d finish %q", tc.path, done, words, finish)
		}
	}
}

func TestBadRequests(t *testing.T) {
	e := start(t, 1)
	for _, tc := range []struct {
		path, body string
		status     int
		want       string
	}{
		{"/v1/completions", `{"model":"mock","prompt":"x"`, 400, "not valid JSON"},
		{"/v1/completions", `{"model":"nope","prompt":"x"}`, 404, "does not exist"},
		{"/v1/completions", `{"prompt":"x"}`, 400, "model is required"},
		{"/v1/completions", `{"model":"mock"}`, 400, "prompt is required"},
		{"/v1/completions", `{"model":"mock","prompt":{"a":1}}`, 400, "prompt must be"},
		{"/v1/completions", `{"model":"mock","prompt":"x","max_tokens":0}`, 400, "max_tokens 0"},
		{"/v1/completions", `{"model":"mock","prompt":"x","max_tokens":100000}`, 400, "max_tokens 100000"},
		{"/v1/completions", `{"model":"mock","prompt":"x","n":2}`, 400, "one choice"},
		{"/v1/completions", `{"model":"mock","prompt":[31999, 40000]}`, 400, "token 40000 at 1 is outside the vocabulary"},
		// Refused by the worker's engine (256 blocks of 4 tokens): a bad
		// request, not a failed worker to report down and migrate from.
		{"/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":%q}`, strings.Repeat("word ", 1100)), 400, "the pool has 256"},
		{"/v1/chat/completions", `{"model":"mock","messages":[]}`, 400, "at least one message"},
		{"/v1/chat/completions", `{"model":"mock","messages":[{"role":"wizard","content":"x"}]}`, 400, "role"},
		{"/v1/nothing", `{}`, 404, "no route"},
	} {
		resp, err := http.Post(e.base+tc.path, "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		var out struct {
			Error struct{ Message, Type string } `json:"error"`
		}
		err = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if resp.StatusCode != tc.status || err != nil || !strings.Contains(out.Error.Message, tc.want) || out.Error.Type == "" {
			t.Errorf("%s %.120s: status %d, error %+v (%v); want %d %q", tc.path, tc.body, resp.StatusCode, out.Error, err, tc.status, tc.want)
		}
	}
	// The server still serves, with its one worker: none was reported down.
	if _, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":"still here","max_tokens":2}`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":[31999],"max_tokens":2}`); err != nil {
		t.Fatal(err)
	}
}

// The router journals every decision with its reasons, and requests that
// share a prefix go where the prefix is cached.
func TestRoutingFollowsPrefixAndIsJournaled(t *testing.T) {
	e := start(t, 3)
	prompt := strings.Repeat("shared system prompt words ", 20)
	var workers []string
	for i := range 4 {
		body := fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":2}`, prompt+fmt.Sprint(i))
		if _, err := e.post(t, "/v1/completions", body); err != nil {
			t.Fatal(err)
		}
		// Wait until the index saw the first request's blocks, so the
		// next decisions can use them.
		if i == 0 {
			planetest.Eventually(t, "index fed", func() bool { return e.stack.Router.IndexLen() > 10 })
		}
	}
	var decided []*triplanev1.RouteDecided
	err := e.j.Read(e.ctx, routerm.Kind, "n1", journal.Query{}, func(r *journal.Record) error {
		d := &triplanev1.RouteDecided{}
		if err := r.Payload.UnmarshalTo(d); err != nil {
			return err
		}
		decided = append(decided, d)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(decided) < 5 { // warm-up + 4
		t.Fatalf("%d decisions journaled", len(decided))
	}
	for _, d := range decided[len(decided)-3:] {
		workers = append(workers, d.Worker)
		if d.Overlap == 0 || len(d.Scores) != 3 || len(d.Candidates) != 3 {
			t.Fatalf("decision without reasons or overlap: %v", d)
		}
	}
	if workers[0] != workers[1] || workers[1] != workers[2] {
		t.Fatalf("shared-prefix requests spread over %v", workers)
	}
}

// openStream starts a streaming completion and returns its reader after
// the first token arrived.
func openStream(t *testing.T, e *env, maxTokens int) (*http.Response, *bufio.Scanner) {
	t.Helper()
	body := fmt.Sprintf(`{"model":"mock","prompt":"a long story please","max_tokens":%d,"stream":true}`, maxTokens)
	resp, err := http.Post(e.base+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data: {") {
			return resp, sc
		}
	}
	t.Fatalf("no first token: %v", sc.Err())
	return nil, nil
}

func busyWorker(e *env) int {
	for i, w := range e.stack.Workers {
		if w.Load().Active > 0 {
			return i
		}
	}
	return -1
}

// A worker that dies mid-stream: the request resumes on another worker
// with the tokens generated so far, and the client gets all it asked for.
func TestMigrationWhenWorkerDies(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) { c.Engine.SpeedUp = 1 })
	resp, sc := openStream(t, e, 300)
	defer resp.Body.Close()
	var victim int
	planetest.Eventually(t, "a busy worker", func() bool { victim = busyWorker(e); return victim >= 0 })
	e.stack.Workers[victim].Close()
	words, finish := 1, ""
	var errEvent string
	for sc.Scan() {
		data, _ := strings.CutPrefix(sc.Text(), "data: ")
		if data == "" || data == "[DONE]" {
			continue
		}
		var ev struct {
			Choices []struct {
				Text         string  `json:"text"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
			Error *struct{ Message string } `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Error != nil {
			errEvent = ev.Error.Message
		}
		for _, c := range ev.Choices {
			words += len(strings.Fields(c.Text))
			if c.FinishReason != nil {
				finish = *c.FinishReason
			}
		}
	}
	if errEvent != "" || words != 300 || finish != "length" {
		t.Fatalf("after migration: %d words, finish %q, error %q", words, finish, errEvent)
	}
	if l := e.stack.Workers[1-victim].Load(); l.BlocksTotal == 0 {
		t.Fatal("survivor has no engine")
	}
}

// A client that goes away cancels the request on the worker.
func TestClientDisconnectCancels(t *testing.T) {
	e := start(t, 1, func(c *serving.Config) { c.Engine.SpeedUp = 1; c.Engine.NumBlocks = 2048 })
	resp, _ := openStream(t, e, 4000) // ~25 s of modelled decode if not cancelled
	if busyWorker(e) != 0 {
		planetest.Eventually(t, "the worker busy", func() bool { return busyWorker(e) == 0 })
	}
	resp.Body.Close()
	planetest.Eventually(t, "the request cancelled on the worker", func() bool { return busyWorker(e) < 0 })
}

// Disaggregated: a long prompt is prefilled on the prefill worker, its
// blocks move to the decode worker with a journaled transfer session, and
// the decode worker generates from them; a short one stays local.
func TestDisaggregatedPrefill(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) { c.PrefillWorkers = 1; c.DisaggThreshold = 16 })
	pre, dec := e.stack.Workers[0], e.stack.Workers[1]
	base := dec.Stats() // the warm-up request may have gone either way
	long := strings.Repeat("a long shared document with many words ", 8)
	out, err := e.post(t, "/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":4}`, long))
	if err != nil {
		t.Fatal(err)
	}
	if ch := out["choices"].([]any)[0].(map[string]any); len(strings.Fields(ch["text"].(string))) != 4 {
		t.Fatalf("disaggregated completion %v", out)
	}
	got := dec.Stats()
	if got.RemotePrefills != base.RemotePrefills+1 || got.Imported <= base.Imported || got.Fallbacks != base.Fallbacks {
		t.Fatalf("decode worker stats %+v (before %+v)", got, base)
	}
	ps := pre.Stats()
	if ps.Exported != got.Imported {
		t.Fatalf("prefill exported %d blocks, decode imported %d", ps.Exported, got.Imported)
	}
	// Same host: the dialer chose shared memory where the OS has memfd.
	if runtime.GOOS == "linux" && (ps.ShmDials == 0 || ps.TCPDials != 0) {
		t.Fatalf("transports used: %d shm, %d tcp; want shared memory on one host", ps.ShmDials, ps.TCPDials)
	}
	// The transfer session is journaled and completed.
	list, err := e.j.Actors(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	sessions := 0
	for _, a := range list {
		if a.Kind == "transfer" {
			sessions++
		}
	}
	if sessions == 0 {
		t.Fatalf("no transfer session journaled: %v", list)
	}
	// The same prompt again: the decode worker has it cached, no transfer.
	if _, err := e.post(t, "/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":2}`, long+" again")); err != nil {
		t.Fatal(err)
	}
	if s := dec.Stats(); s.RemotePrefills != got.RemotePrefills {
		t.Fatalf("cached prompt prefilled remotely again: %+v", s)
	}
}

// A node without --disagg in the namespace of a disaggregated frontend:
// its aggregated worker takes no blocks, so the frontend prefills long
// prompts on it locally instead of booking a prefill worker whose blocks it
// could not receive (the worker would count that as a fallback).
func TestAggregatedWorkerInADisaggregatedNamespace(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) {
		c.PrefillWorkers = 1
		c.DisaggThreshold = 16
		c.Policy = router.PolicyRoundRobin // both decode workers get requests
	})
	planes := e.planes
	planes.NodeID = "n2"
	planes.Registerer = prometheus.NewRegistry() // another node's metrics
	other, err := serving.Start(e.ctx, planes, serving.Config{Workers: 1, Model: "mock",
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 256, SpeedUp: 100}, StreamToken: "s3cret", DataToken: "d4ta"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(other.Close)
	agg, dec := other.Workers[0], e.stack.Workers[1]
	n := 0
	planetest.Eventually(t, "long prompts served by both decode workers", func() bool {
		n++
		long := strings.Repeat(fmt.Sprintf("document %d with many distinct words ", n), 4)
		if _, err := e.post(t, "/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":2}`, long)); err != nil {
			t.Fatal(err)
		}
		if st := agg.Stats(); st.Fallbacks != 0 || st.RemotePrefills != 0 {
			t.Fatalf("aggregated worker stats %+v: the frontend booked a prefill worker for it", st)
		}
		// The disaggregated decode worker prefills long prompts remotely:
		// the threshold is reached.
		return len(agg.Blocks()) > 0 && dec.Stats().RemotePrefills > 0
	})
	if st := agg.Stats(); st.Fallbacks != 0 || st.RemotePrefills != 0 {
		t.Fatalf("aggregated worker stats %+v: the frontend booked a prefill worker for it", st)
	}
	// The control plane publishes what a sender needs (receivers and
	// regions) for the worker that takes blocks, nothing for the others.
	disc, err := control.NewDiscovery(e.planes.Etcd, control.DiscoveryConfig{Namespace: "test", Component: worker.Component, Endpoint: worker.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	defer disc.Close()
	if err := disc.WaitReady(e.ctx); err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, in := range disc.Instances() {
		p := in.GetDataPeer()
		switch in.GetInstanceId() {
		case dec.ID():
			seen++
			if p.GetTcpAddr() == "" || !p.GetTcpBlocksFrames() || len(p.GetRegions()) != 1 || p.GetRegions()[0].GetBlocks() == 0 {
				t.Fatalf("decode worker's registration: data peer %v", p)
			}
		case agg.ID(), e.stack.Workers[0].ID():
			seen++
			if p != nil {
				t.Fatalf("%s takes no blocks but registered data peer %v", in.GetInstanceId(), p)
			}
		}
	}
	if seen != 3 {
		t.Fatalf("%d of the 3 workers registered", seen)
	}
}

// Disaggregated requests whose clients give up while their blocks are on
// the way, then many more requests: no cached block is ever wrong, and no
// reservation or staging slot is leaked.
func TestAbandonedTransfersNeverCorruptTheCache(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) {
		c.PrefillWorkers = 1
		c.DisaggThreshold = 16
		c.Engine.SpeedUp = 1
		c.Engine.NumBlocks = 2048
	})
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			long := strings.Repeat(fmt.Sprintf("document %d has many words in it ", i), 20)
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Millisecond)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "POST", e.base+"/v1/completions",
				strings.NewReader(fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":2}`, long)))
			req.Header.Set("Content-Type", "application/json")
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	for i := range 40 {
		body := fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":2}`, strings.Repeat(fmt.Sprintf("short %d ", i), 3))
		if _, err := e.post(t, "/v1/completions", body); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range e.stack.Workers {
		bad, total, err := w.CheckCache()
		if err != nil || bad != 0 {
			t.Fatalf("worker %s: %d of %d cached blocks corrupt (%v)", w.ID(), bad, total, err)
		}
	}
	// Every reservation ends: once idle, the decode worker holds no blocks.
	dec := e.stack.Workers[1]
	planetest.Eventually(t, "the decode worker idle with no block held", func() bool {
		l := dec.Load()
		return l.Active == 0 && l.Waiting == 0 && l.BlocksUsed == 0
	})
}

// A worker that refuses because it is full is not reported down: when
// every worker is busy the client gets 429 with Retry-After.
func TestBusyWorkersGive429(t *testing.T) {
	e := start(t, 1, func(c *serving.Config) {
		c.Engine.SpeedUp = 1
		c.Engine.MaxSeqs = 1
		c.Engine.MaxWaiting = 1
		c.Engine.NumBlocks = 2048
	})
	first, fsc := openStream(t, e, 3000)
	defer first.Body.Close()
	go func() {
		for fsc.Scan() {
		}
	}()
	// The second waits in the engine (its response headers come with its
	// first token, so it is sent from a goroutine).
	go func() {
		if resp, err := http.Post(e.base+"/v1/completions", "application/json",
			strings.NewReader(`{"model":"mock","prompt":"waiting","max_tokens":5}`)); err == nil {
			resp.Body.Close()
		}
	}()
	planetest.Eventually(t, "one running and one waiting", func() bool { l := e.stack.Workers[0].Load(); return l.Active == 1 && l.Waiting == 1 })
	resp, err := http.Post(e.base+"/v1/completions", "application/json", strings.NewReader(`{"model":"mock","prompt":"third","max_tokens":1}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), "overloaded") || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("status %d body %s, want 429 with Retry-After", resp.StatusCode, b)
	}
}

// The in-flight limit is taken before a request's body is read: at the
// limit, a request whose body never finishes arriving gets 429 at once
// (its body cannot hold memory), beside the request that runs.
func TestInflightLimitBeforeBody(t *testing.T) {
	e := start(t, 1, func(c *serving.Config) {
		c.Engine.SpeedUp = 1
		c.Engine.NumBlocks = 2048
		c.MaxInflight = 1
	})
	first, fsc := openStream(t, e, 3000)
	defer first.Body.Close()
	go func() {
		for fsc.Scan() {
		}
	}()
	resp, b := partialBody(t, e, 1000000)
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), "the limit is 1") {
		t.Fatalf("status %d body %s, want 429", resp.StatusCode, b)
	}
}

// partialBody posts a completion announcing length bytes of body, sends
// the first few and stops, and returns the answer (within 30 s).
func partialBody(t *testing.T, e *env, length int) (*http.Response, []byte) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"prompt\": \"", length)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer while the body is still coming: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// A body that stops arriving gets 408 after BodyTimeout and frees its
// slot: with MaxInflight 1, a good request is served afterwards.
func TestSlowBodyTimesOut(t *testing.T) {
	e := start(t, 1, func(c *serving.Config) {
		c.MaxInflight = 1
		c.BodyTimeout = 100 * time.Millisecond
	})
	resp, b := partialBody(t, e, 1000)
	if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(b), "not received within") {
		t.Fatalf("status %d body %s, want 408", resp.StatusCode, b)
	}
	if _, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":"next","max_tokens":2}`); err != nil {
		t.Fatalf("the slot was not freed: %v", err)
	}
}

// Shutdown deregisters every worker at once, not after the running
// requests: other nodes' routers stop sending here while a long request
// still runs.
func TestShutdownDeregistersBeforeDraining(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) {
		c.Engine.SpeedUp = 1
		c.Engine.NumBlocks = 2048
	})
	disc, err := control.NewDiscovery(e.planes.Etcd, control.DiscoveryConfig{Namespace: "test", Component: worker.Component, Endpoint: worker.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	defer disc.Close()
	planetest.Eventually(t, "both workers listed", func() bool { return len(disc.Instances()) == 2 })
	resp, sc := openStream(t, e, 3000)
	lines := make(chan string)
	go func() {
		defer close(lines)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- e.stack.Shutdown(ctx) }()
	planetest.Eventually(t, "every worker deregistered", func() bool { return len(disc.Instances()) == 0 })
	// The long request is still being served (its worker drains).
	if busyWorker(e) < 0 {
		t.Fatal("the running request ended before the workers deregistered")
	}
	resp.Body.Close() // the client leaves: the drain can end
	for range lines {
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// counter is the value of the counter name in e's registry (0 when it
// was never counted).
func (e *env) counter(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			var sum float64
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
			return sum
		}
	}
	return 0
}

// A prompt too large for a worker's pool is tried on the other workers
// (another may be larger) without reporting any down, and without taking
// a migration: each worker is tried though MaxMigrations is lower. When
// none takes it, the client gets 400 with the reason.
func TestTooLargeForEveryWorker(t *testing.T) {
	e := start(t, 3, func(c *serving.Config) { c.MaxMigrations = 1 })
	resp, err := http.Post(e.base+"/v1/completions", "application/json",
		strings.NewReader(fmt.Sprintf(`{"model":"mock","prompt":%q}`, strings.Repeat("word ", 1100))))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "every worker tried refused it") || !strings.Contains(string(b), "the pool has 256") {
		t.Fatalf("status %d body %s, want 400 after every worker", resp.StatusCode, b)
	}
	if n := e.counter(t, "triplane_frontend_migrations_total"); n != 0 {
		t.Errorf("%v migrations counted for refusals", n)
	}
	for i := range 4 {
		if _, err := e.post(t, "/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":"fits %d","max_tokens":2}`, i)); err != nil {
			t.Fatalf("after the refusals: %v", err)
		}
	}
}

// A node's own frontend finishes its requests on the node's workers after
// they left discovery: a request whose body was still arriving when the
// shutdown began is served.
func TestShutdownServesTheLastLocalRequests(t *testing.T) {
	e := start(t, 1)
	disc, err := control.NewDiscovery(e.planes.Etcd, control.DiscoveryConfig{Namespace: "test", Component: worker.Component, Endpoint: worker.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	defer disc.Close()
	planetest.Eventually(t, "the worker listed", func() bool { return len(disc.Instances()) == 1 })
	body := `{"model":"mock","prompt":"the last one","max_tokens":3}`
	c, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:10])
	// The frontend has the request (a connection still in the listener's
	// backlog would be reset by the shutdown, not served).
	planetest.Eventually(t, "the request admitted", func() bool { return e.stack.Frontend.Inflight() == 1 })
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- e.stack.Shutdown(ctx) }()
	planetest.Eventually(t, "the worker deregistered", func() bool { return len(disc.Instances()) == 0 })
	fmt.Fprint(c, body[10:])
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the last request: status %d body %s", resp.StatusCode, b)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// KV blocks over the transports' 1 MiB frames land in several frames each;
// the decode worker still takes them (it waited for whole-block landings
// and fell back to prefilling locally every time).
func TestDisaggregatedBlocksOverOneFrame(t *testing.T) {
	e := start(t, 2, func(c *serving.Config) {
		c.PrefillWorkers = 1
		c.DisaggThreshold = 16
		c.Engine.BlockSize = 16
		c.Engine.NumBlocks = 64
		c.Engine.BlockBytes = 1<<20 + 8
	})
	dec := e.stack.Workers[1]
	base := dec.Stats()
	long := strings.Repeat("a long shared document with many words ", 8)
	if _, err := e.post(t, "/v1/completions", fmt.Sprintf(`{"model":"mock","prompt":%q,"max_tokens":4}`, long)); err != nil {
		t.Fatal(err)
	}
	if got := dec.Stats(); got.RemotePrefills != base.RemotePrefills+1 || got.Fallbacks != base.Fallbacks {
		t.Fatalf("decode worker with blocks of 1 MiB + 8 bytes: %+v (before %+v)", got, base)
	}
}

// The router's dump counters: stale pages are their own counter (resend
// replies, already failed requests), not a reason of
// triplane_router_kv_dropped_total, which counts batches and events.
func TestRouterExportsStaleDumpPagesApart(t *testing.T) {
	e := start(t, 1)
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		switch mf.GetName() {
		case "triplane_router_kv_dump_stale_pages_total":
			found = true
		case "triplane_router_kv_dropped_total":
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "reason" && l.GetValue() == "stale_page" {
						t.Errorf("stale pages counted as dropped KV events: %v", m)
					}
				}
			}
		case "triplane_router_kv_dumps_total":
			if !strings.Contains(mf.GetHelp(), "paged dumps completed") {
				t.Errorf("dumps help %q does not say paged dumps count", mf.GetHelp())
			}
		}
	}
	if !found {
		t.Error("no triplane_router_kv_dump_stale_pages_total")
	}
}

// A node's serving stack started again in the same process, on the same
// registry, serves and shares the node-wide series (the data plane's, the
// transfer sessions', the frontend's) instead of panicking on their
// registration.
func TestStackRestartsOnTheSameRegistry(t *testing.T) {
	e := start(t, 1)
	e.stack.Close()
	cfg := serving.Config{Workers: 1, Frontend: true, HTTPAddr: "127.0.0.1:0", Model: "mock",
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 256, SpeedUp: 100}, StreamToken: "s3cret", DataToken: "d4ta"}
	s, err := serving.Start(e.ctx, e.planes, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	e.stack, e.base = s, "http://"+s.Frontend.Addr()
	planetest.Eventually(t, "the restarted stack to serve", func() bool {
		_, err := e.post(t, "/v1/completions", `{"model":"mock","prompt":"again","max_tokens":1}`)
		return err == nil
	})
	if _, err := e.reg.Gather(); err != nil {
		t.Fatalf("the registry after the restart: %v", err)
	}
}
