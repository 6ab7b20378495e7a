package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving"
	"github.com/triplane-dev/triplane/serving/tokenizer"
	"github.com/triplane-dev/triplane/system"
	"github.com/triplane-dev/triplane/workload"
)

// ServeRequest is one request of a serving workload: when it is sent
// (after the run's start), its prompt and its max_tokens.
type ServeRequest struct {
	At        time.Duration
	Prompt    string
	MaxTokens int
}

// SyntheticConfig describes a synthetic serving workload: Prefixes shared
// system prompts of PrefixWords words, each request one of them (drawn at
// random) followed by SuffixWords words of its own.
type SyntheticConfig struct {
	Requests, Prefixes, PrefixWords, SuffixWords, MaxTokens int
	// Rate is the mean arrival rate in requests/s (Poisson arrivals); 0
	// sends them all at once (the concurrency cap then paces them).
	Rate float64
	Seed uint64
}

// SyntheticWorkload makes the requests of cfg. The same cfg gives the same
// requests.
func SyntheticWorkload(cfg SyntheticConfig) []ServeRequest {
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x5e7e))
	prefixes := make([]string, max(cfg.Prefixes, 1))
	for p := range prefixes {
		prefixes[p] = serveWords(cfg.PrefixWords, func(k int) string { return "p" + strconv.Itoa(p) + "w" + strconv.Itoa(k) })
	}
	out := make([]ServeRequest, cfg.Requests)
	var at time.Duration
	for i := range out {
		if cfg.Rate > 0 && i > 0 {
			at += time.Duration(rng.ExpFloat64() / cfg.Rate * float64(time.Second))
		}
		suffix := serveWords(cfg.SuffixWords, func(k int) string { return "r" + strconv.Itoa(i) + "w" + strconv.Itoa(k) })
		prompt := prefixes[rng.IntN(len(prefixes))]
		if prompt != "" && suffix != "" {
			prompt += " "
		}
		out[i] = ServeRequest{At: at, Prompt: prompt + suffix, MaxTokens: cfg.MaxTokens}
	}
	return out
}

// TraceConfig turns a Mooncake trace into a serving workload.
type TraceConfig struct {
	Records []workload.Record
	// TimeScale multiplies the trace's timestamps: 0.1 replays ten times
	// faster; 0 sends everything at once.
	TimeScale float64
	// MaxTokens caps each record's output_length.
	MaxTokens int
	// WordsPerHash is the words (tokens) each of the trace's hash ids
	// expands to; default workload.TraceBlockSize (512), the trace's own
	// block. A multiple of the frontend's KV block size keeps the KV blocks
	// aligned with the hash ids. Prompts are scaled to
	// input_length*WordsPerHash/512 tokens.
	WordsPerHash int
	// MaxPromptTokens skips records whose prompt would be longer (the
	// frontend refuses them); 0: no limit.
	MaxPromptTokens int
}

// TraceWorkload makes the requests of a trace, in timestamp order (the
// first at 0), and says how many records it skipped as too long.
//
// The prompt is text the frontend's tokenizer (serving/tokenizer) turns into
// one token per word after its BOS token: each hash id expands to the same
// WordsPerHash words wherever it appears, and the first hash id's block is
// one word short to make room for BOS. So token block j of the prompt covers
// words of one hash id only, and two prompts share a KV block exactly when
// the trace says they share the hash ids up to it.
func TraceWorkload(cfg TraceConfig) (reqs []ServeRequest, skipped int) {
	wph := cfg.WordsPerHash
	if wph <= 0 {
		wph = workload.TraceBlockSize
	}
	bos := len(tokenizer.New(0).Encode(""))
	recs := slices.Clone(cfg.Records)
	slices.SortStableFunc(recs, func(a, b workload.Record) int { return cmp.Compare(a.Timestamp, b.Timestamp) })
	var b strings.Builder
	for _, r := range recs {
		tokens := (r.InputLength*wph + workload.TraceBlockSize - 1) / workload.TraceBlockSize
		if cfg.MaxPromptTokens > 0 && tokens > cfg.MaxPromptTokens {
			skipped++
			continue
		}
		b.Reset()
		words := tokens - bos
	fill:
		for i, h := range r.HashIDs {
			hs := "h" + strconv.FormatInt(h, 10) + "w"
			for k := range wph {
				if i == 0 && k < bos {
					continue
				}
				if words <= 0 {
					break fill
				}
				if b.Len() > 0 {
					b.WriteByte(' ')
				}
				b.WriteString(hs)
				b.WriteString(strconv.Itoa(k))
				words--
			}
		}
		mt := r.OutputLength
		if cfg.MaxTokens > 0 {
			mt = min(mt, cfg.MaxTokens)
		}
		at := time.Duration(float64(r.Timestamp-recs[0].Timestamp) * cfg.TimeScale * float64(time.Millisecond))
		reqs = append(reqs, ServeRequest{At: at, Prompt: b.String(), MaxTokens: mt})
	}
	return reqs, skipped
}

func serveWords(n int, word func(k int) string) string {
	var b strings.Builder
	for k := range n {
		if k > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(word(k))
	}
	return b.String()
}

// ServeConfig configures `triplane bench serve`.
type ServeConfig struct {
	// URL drives a running OpenAI-compatible frontend (http://host:port).
	// Empty: one node per policy is started in this process, one after
	// the other, each on a fresh temporary data dir.
	URL string
	// Model is the model named in requests. Empty: triplane-mock in
	// process; with URL, the first model GET /v1/models lists.
	Model string
	// Chat sends /v1/chat/completions (the prompt as one user message)
	// instead of /v1/completions. The chat template adds tokens before
	// the prompt, so KV blocks no longer align with a trace's hash ids.
	Chat bool
	// Requests is the workload, the same for every policy.
	Requests []ServeRequest
	// Concurrency caps the requests in flight; an arrival beyond it waits.
	Concurrency int
	// Timeout bounds one request; default 2 minutes.
	Timeout time.Duration

	// The in-process nodes: Policies (one node each, default kv and
	// round-robin), Workers mock engines of BlocksPerWorker KV blocks of
	// BlockSize tokens, SpeedUp dividing the modelled time, the kv
	// policy's Params, and the JetStream fsync policy of the journal.
	Policies                            []router.Policy
	Params                              router.Params
	Workers, BlockSize, BlocksPerWorker int
	SpeedUp                             float64
	SyncAlways                          bool
	Logger                              *slog.Logger
}

// ServeResult is one run of the workload against one frontend.
type ServeResult struct {
	// Name is the policy, or the URL.
	Name string
	// Sent requests, OK ones (streamed to data: [DONE] with tokens).
	Sent, OK int
	// Errors counts failed requests by HTTP status ("503"), or by what
	// went wrong in a 200 stream: "stream-error" (an error event),
	// "truncated" (ended before [DONE]), "bad-sse", "no-tokens",
	// "timeout", "conn". ErrorSamples holds one message for each.
	Errors       map[string]int
	ErrorSamples map[string]string
	// Anomalies counts OK requests that look wrong: "usage≠text" (the
	// usage chunk's completion_tokens differs from the words streamed, or
	// is missing), "tokens≠max" (not max_tokens tokens; the mock engine
	// always generates max_tokens).
	Anomalies map[string]int
	// TTFT (request sent to first content chunk) and E2E (to [DONE]) of
	// the OK requests; ITL holds, for every content chunk after the
	// first, the gap since the previous one divided by its words, once per
	// word. All sorted.
	TTFT, ITL, E2E []time.Duration
	// OutputTokens is the words streamed by the OK requests.
	OutputTokens int
	// Elapsed is from the first request sent to the last one ended.
	Elapsed time.Duration
	// Waited is the requests whose arrival found Concurrency requests in
	// flight and waited for one to end.
	Waited int
	// HitRate is the share of prompt tokens the workers found in their
	// prefix caches (each engine's cached / prompt tokens, averaged over
	// the workers weighted by the requests each served); -1 if unknown
	// (a frontend given by URL).
	HitRate float64
	// WorkerRequests is the requests each worker served (in process only).
	WorkerRequests []int
}

// TokensPerSec is the output throughput.
func (r ServeResult) TokensPerSec() float64 { return float64(r.OutputTokens) / r.Elapsed.Seconds() }

// RequestsPerSec is the rate of OK requests.
func (r ServeResult) RequestsPerSec() float64 { return float64(r.OK) / r.Elapsed.Seconds() }

// Spread is the busiest worker's requests over the mean; 0 if unknown.
func (r ServeResult) Spread() float64 {
	if len(r.WorkerRequests) == 0 {
		return 0
	}
	total, most := 0, 0
	for _, n := range r.WorkerRequests {
		total += n
		most = max(most, n)
	}
	if total == 0 {
		return 0
	}
	return float64(most) / (float64(total) / float64(len(r.WorkerRequests)))
}

// Serve runs the workload against the frontend at cfg.URL, or against one
// in-process node per policy, one after the other, and returns one result
// per frontend.
func Serve(ctx context.Context, cfg ServeConfig, progress io.Writer) ([]ServeResult, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 64
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Minute
	}
	if len(cfg.Requests) == 0 {
		return nil, errors.New("bench serve: no requests")
	}
	if cfg.URL != "" {
		base := strings.TrimRight(cfg.URL, "/")
		d := newServeDriver(cfg)
		defer d.client.CloseIdleConnections()
		if cfg.Model == "" {
			m, err := d.firstModel(ctx, base)
			if err != nil {
				return nil, err
			}
			cfg.Model, d.cfg.Model = m, m
		}
		fmt.Fprintf(progress, "  %s: %d requests\n", base, len(cfg.Requests))
		r := d.run(ctx, base, base, progress) // no hit rate here: run leaves it at -1
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return []ServeResult{r}, nil
	}
	if len(cfg.Policies) == 0 {
		cfg.Policies = []router.Policy{router.PolicyKV, router.PolicyRoundRobin}
	}
	if cfg.Model == "" {
		cfg.Model = "triplane-mock"
	}
	var out []ServeResult
	for _, p := range cfg.Policies {
		r, err := serveNode(ctx, cfg, p, progress)
		if err != nil {
			return nil, fmt.Errorf("policy %s: %w", p, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// serveNode starts one node with the given policy, runs the workload
// against it and stops it.
func serveNode(ctx context.Context, cfg ServeConfig, policy router.Policy, progress io.Writer) (res ServeResult, err error) {
	dir, err := os.MkdirTemp("", "triplane-bench-serve-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	fmt.Fprintf(progress, "  %s: starting a node with %d workers\n", policy, cfg.Workers)
	sys, err := system.Start(ctx, system.Config{DataDir: dir, AdminAddr: "127.0.0.1:0",
		JetStreamSyncAlways: cfg.SyncAlways, Namespace: "bench", Version: "bench", Logger: cfg.Logger})
	if err != nil {
		return res, fmt.Errorf("start node: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if cerr := sys.Close(sctx); cerr != nil && err == nil && ctx.Err() == nil {
			err = fmt.Errorf("stop node: %w", cerr)
		}
	}()
	stack, err := serving.Start(ctx, serving.Planes{NATS: sys.NATS, Etcd: sys.Etcd, Host: sys.Host,
		Registrar: sys.Control.Registrar, NodeID: sys.NodeID, Namespace: "bench",
		Registerer: sys.Admin.Registry, Logger: cfg.Logger}, serving.Config{
		Workers: cfg.Workers, Frontend: true, HTTPAddr: "127.0.0.1:0", Model: cfg.Model,
		Engine: mocker.Config{BlockSize: cfg.BlockSize, NumBlocks: cfg.BlocksPerWorker, SpeedUp: cfg.SpeedUp},
		Policy: policy, Params: cfg.Params,
		// The bench's own cap keeps requests below it; the frontend's
		// must not refuse any.
		MaxInflight: max(1024, cfg.Concurrency),
	})
	if err != nil {
		return res, fmt.Errorf("start serving: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if serr := stack.Shutdown(sctx); serr != nil && err == nil && ctx.Err() == nil {
			err = fmt.Errorf("stop serving: %w", serr)
		}
	}()
	base := "http://" + stack.Frontend.Addr()
	d := newServeDriver(cfg)
	defer d.client.CloseIdleConnections()
	if err := d.warmUp(ctx, base); err != nil {
		return res, err
	}
	before := serveWorkerRequests(sys, stack)
	fmt.Fprintf(progress, "  %s: %d requests to %s\n", policy, len(cfg.Requests), base)
	res = d.run(ctx, base, string(policy), progress)
	if err := ctx.Err(); err != nil {
		return res, err
	}
	after := serveWorkerRequests(sys, stack)
	var hits, weight float64
	for i, w := range stack.Workers {
		n := after[i] - before[i]
		res.WorkerRequests = append(res.WorkerRequests, n)
		// The engine's rate covers every request it admitted, the
		// warm-up's (a few tokens) included, so all of them weigh.
		hits += w.Load().HitRate * float64(after[i])
		weight += float64(after[i])
	}
	res.HitRate = 0
	if weight > 0 {
		res.HitRate = hits / weight
	}
	return res, nil
}

// serveWorkerRequests reads how many requests each worker ended from the
// node's Prometheus registry (triplane_worker_requests_total, every
// outcome).
func serveWorkerRequests(sys *system.System, stack *serving.Stack) []int {
	out := make([]int, len(stack.Workers))
	idx := map[string]int{}
	for i, w := range stack.Workers {
		idx[w.ID()] = i
	}
	mfs, err := sys.Admin.Registry.Gather()
	if err != nil {
		return out
	}
	for _, mf := range mfs {
		if mf.GetName() != "triplane_worker_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if i, ok := idx[l.GetValue()]; ok && l.GetName() == "worker" {
					out[i] += int(m.GetCounter().GetValue())
				}
			}
		}
	}
	return out
}

// serveDriver sends a workload to one frontend.
type serveDriver struct {
	cfg    ServeConfig
	client *http.Client
}

func newServeDriver(cfg ServeConfig) *serveDriver {
	tr := &http.Transport{
		MaxIdleConns: cfg.Concurrency, MaxIdleConnsPerHost: cfg.Concurrency,
		IdleConnTimeout: 90 * time.Second, DisableCompression: true,
	}
	return &serveDriver{cfg: cfg, client: &http.Client{Transport: tr}}
}

func (d *serveDriver) path() string {
	if d.cfg.Chat {
		return "/v1/chat/completions"
	}
	return "/v1/completions"
}

func (d *serveDriver) body(prompt string, maxTokens int) []byte {
	req := map[string]any{
		"model": d.cfg.Model, "max_tokens": maxTokens,
		"stream": true, "stream_options": map[string]bool{"include_usage": true},
	}
	if d.cfg.Chat {
		req["messages"] = []map[string]string{{"role": "user", "content": prompt}}
	} else {
		req["prompt"] = prompt
	}
	b, _ := json.Marshal(req)
	return b
}

// firstModel asks a frontend for its models.
func (d *serveDriver) firstModel(ctx context.Context, base string) (string, error) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, base+"/v1/models", nil)
	if err != nil {
		return "", err
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return "", fmt.Errorf("list models: %w", err)
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&list); err != nil || resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("list models: status %d: %v", resp.StatusCode, err)
	}
	if len(list.Data) == 0 || list.Data[0].ID == "" {
		return "", errors.New("list models: the frontend serves none")
	}
	return list.Data[0].ID, nil
}

// warmUp sends one small request until it succeeds: the frontend's
// discovery has seen the workers, their streams answer.
func (d *serveDriver) warmUp(ctx context.Context, base string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		o := d.one(ctx, base+d.path(), d.body("warm up", 1))
		if o.err == "" {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("warm-up request still failing after 30s: %s: %s", o.err, o.msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// serveOutcome is one request's fate.
type serveOutcome struct {
	err, msg      string // err: the error's label; empty if OK
	ttft, e2e     time.Duration
	itl           []time.Duration
	tokens, usage int // words streamed; the usage chunk's completion_tokens (-1: none)
	maxTokens     int
	waited        bool
}

// run sends the workload: each request at its arrival time, at most
// Concurrency at once (an arrival beyond it waits). It never has more than
// Concurrency+2 goroutines.
func (d *serveDriver) run(ctx context.Context, base, name string, progress io.Writer) ServeResult {
	url := base + d.path()
	reqs := d.cfg.Requests
	outs := make([]serveOutcome, len(reqs))
	sem := make(chan struct{}, d.cfg.Concurrency)
	var done atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	stopProgress := make(chan struct{})
	progressDone := make(chan struct{})
	go func() {
		defer close(progressDone)
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stopProgress:
				return
			case <-t.C:
				fmt.Fprintf(progress, "    %s: %d/%d done after %s\n", name, done.Load(), len(reqs), time.Since(start).Round(time.Second))
			}
		}
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	sent := 0
send:
	for i, r := range reqs {
		if wait := time.Until(start.Add(r.At)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
				timer.Stop()
				break send
			case <-timer.C:
			}
		}
		waited := false
		select {
		case sem <- struct{}{}:
		default:
			waited = true
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				break send
			}
		}
		sent++
		body := d.body(r.Prompt, r.MaxTokens)
		wg.Go(func() {
			defer func() { <-sem }()
			o := d.one(ctx, url, body)
			o.maxTokens, o.waited = r.MaxTokens, waited
			outs[i] = o
			done.Add(1)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(stopProgress)
	<-progressDone

	res := ServeResult{Name: name, Sent: sent, Elapsed: elapsed, Errors: map[string]int{}, ErrorSamples: map[string]string{},
		Anomalies: map[string]int{}, HitRate: -1}
	for _, o := range outs[:sent] {
		if o.waited {
			res.Waited++
		}
		if o.err != "" {
			res.Errors[o.err]++
			if _, ok := res.ErrorSamples[o.err]; !ok {
				res.ErrorSamples[o.err] = o.msg
			}
			continue
		}
		res.OK++
		res.OutputTokens += o.tokens
		res.TTFT = append(res.TTFT, o.ttft)
		res.E2E = append(res.E2E, o.e2e)
		res.ITL = append(res.ITL, o.itl...)
		if o.usage != o.tokens {
			res.Anomalies["usage≠text"]++
		}
		if o.tokens != o.maxTokens {
			res.Anomalies["tokens≠max"]++
		}
	}
	slices.Sort(res.TTFT)
	slices.Sort(res.E2E)
	slices.Sort(res.ITL)
	return res
}

// serveChunk is what the bench reads of a streamed chunk (completions or
// chat), or of an error event.
type serveChunk struct {
	Choices []struct {
		Text  string `json:"text"`
		Delta *struct {
			Content string `json:"content"`
		} `json:"delta"`
	} `json:"choices"`
	Usage *struct {
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
		Code    any    `json:"code"`
	} `json:"error"`
}

// one sends one streaming request and reads its server-sent events.
func (d *serveDriver) one(ctx context.Context, url string, body []byte) (o serveOutcome) {
	rctx, cancel := context.WithTimeout(ctx, d.cfg.Timeout)
	defer cancel()
	o.usage = -1
	fail := func(label string, err error) serveOutcome {
		switch {
		case ctx.Err() != nil:
			o.err, o.msg = "cancelled", ctx.Err().Error()
		case rctx.Err() != nil:
			o.err, o.msg = "timeout", fmt.Sprintf("no end after %s: %v", d.cfg.Timeout, err)
		default:
			o.err, o.msg = label, err.Error()
		}
		return o
	}
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return fail("conn", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	t0 := time.Now()
	resp, err := d.client.Do(req)
	if err != nil {
		return fail("conn", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fail(strconv.Itoa(resp.StatusCode), errors.New(strings.TrimSpace(string(b))))
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		return fail("bad-sse", fmt.Errorf("Content-Type %q, want text/event-stream", ct))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	var last time.Time
	finished := false
	for sc.Scan() {
		line := sc.Bytes()
		data, ok := bytes.CutPrefix(line, []byte("data:"))
		if !ok {
			continue // blank separators, comments, other fields
		}
		data = bytes.TrimSpace(data)
		if string(data) == "[DONE]" {
			finished = true
			break
		}
		now := time.Now()
		var ch serveChunk
		if err := json.Unmarshal(data, &ch); err != nil {
			return fail("bad-sse", fmt.Errorf("event %q: %w", data, err))
		}
		if ch.Error != nil {
			return fail("stream-error", fmt.Errorf("%v: %s", ch.Error.Code, ch.Error.Message))
		}
		if ch.Usage != nil {
			o.usage = ch.Usage.CompletionTokens
		}
		text := ""
		for _, c := range ch.Choices {
			text += c.Text
			if c.Delta != nil {
				text += c.Delta.Content
			}
		}
		n := len(strings.Fields(text))
		if n == 0 {
			continue
		}
		if last.IsZero() {
			o.ttft = now.Sub(t0)
		} else {
			gap := now.Sub(last) / time.Duration(n)
			for range n {
				o.itl = append(o.itl, gap)
			}
		}
		last = now
		o.tokens += n
	}
	if err := sc.Err(); err != nil {
		return fail("truncated", err)
	}
	if !finished {
		return fail("truncated", fmt.Errorf("stream ended after %d tokens without data: [DONE]", o.tokens))
	}
	if o.tokens == 0 {
		return fail("no-tokens", errors.New("stream held no content"))
	}
	o.e2e = time.Since(t0)
	return o
}

// PrintServe writes results side by side, with each one's ratio to the
// baseline: round-robin if it ran, otherwise the last result.
func PrintServe(w io.Writer, title string, rs []ServeResult) {
	fmt.Fprintf(w, "%s\n", title)
	if len(rs) == 0 {
		return
	}
	base := len(rs) - 1
	for i, r := range rs {
		if r.Name == string(router.PolicyRoundRobin) {
			base = i
		}
	}
	type row struct {
		name  string
		cell  func(ServeResult) string
		value func(ServeResult) float64 // for the ratio; nil: none
	}
	ms := func(d time.Duration) string {
		if d < time.Millisecond {
			return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
		}
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
	lat := func(name string, get func(ServeResult) []time.Duration, p float64) row {
		return row{name, func(r ServeResult) string { return ms(percentile(get(r), p)) },
			func(r ServeResult) float64 { return float64(percentile(get(r), p)) }}
	}
	counts := func(m map[string]int) string {
		if len(m) == 0 {
			return "none"
		}
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			parts = append(parts, fmt.Sprintf("%s:%d", k, m[k]))
		}
		return strings.Join(parts, " ")
	}
	ttft := func(r ServeResult) []time.Duration { return r.TTFT }
	itl := func(r ServeResult) []time.Duration { return r.ITL }
	e2e := func(r ServeResult) []time.Duration { return r.E2E }
	rows := []row{
		{"requests ok / sent", func(r ServeResult) string { return fmt.Sprintf("%d / %d", r.OK, r.Sent) }, nil},
		{"errors", func(r ServeResult) string { return counts(r.Errors) }, nil},
		lat("TTFT p50", ttft, 0.50), lat("TTFT p99", ttft, 0.99),
		lat("ITL p50", itl, 0.50), lat("ITL p99", itl, 0.99),
		lat("E2E p50", e2e, 0.50), lat("E2E p99", e2e, 0.99),
		{"output tokens/s", func(r ServeResult) string { return fmt.Sprintf("%.0f", r.TokensPerSec()) }, ServeResult.TokensPerSec},
		{"requests/s", func(r ServeResult) string { return fmt.Sprintf("%.1f", r.RequestsPerSec()) }, ServeResult.RequestsPerSec},
		{"KV hit rate", func(r ServeResult) string {
			if r.HitRate < 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.1f%%", 100*r.HitRate)
		}, func(r ServeResult) float64 { return r.HitRate }},
		{"busiest worker / mean", func(r ServeResult) string {
			if r.Spread() == 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.2f", r.Spread())
		}, nil},
		{"requests per worker", func(r ServeResult) string {
			if len(r.WorkerRequests) == 0 {
				return "n/a"
			}
			var parts []string
			for _, n := range r.WorkerRequests {
				parts = append(parts, strconv.Itoa(n))
			}
			return strings.Join(parts, ",")
		}, nil},
		{"waited for the cap", func(r ServeResult) string { return strconv.Itoa(r.Waited) }, nil},
		{"anomalies", func(r ServeResult) string { return counts(r.Anomalies) }, nil},
		{"elapsed", func(r ServeResult) string { return r.Elapsed.Round(10 * time.Millisecond).String() }, nil},
	}
	header := []string{"metric"}
	for _, r := range rs {
		header = append(header, r.Name)
	}
	for i, r := range rs {
		if i != base {
			header = append(header, r.Name+" / "+rs[base].Name)
		}
	}
	table := [][]string{header}
	for _, rw := range rows {
		line := []string{rw.name}
		for _, r := range rs {
			line = append(line, rw.cell(r))
		}
		for i, r := range rs {
			if i == base {
				continue
			}
			cell := ""
			if rw.value != nil {
				if b := rw.value(rs[base]); b > 0 && rw.value(r) >= 0 {
					cell = fmt.Sprintf("%.2fx", rw.value(r)/b)
				}
			}
			line = append(line, cell)
		}
		table = append(table, line)
	}
	widths := make([]int, len(header))
	for _, line := range table {
		for i, c := range line {
			widths[i] = max(widths[i], len([]rune(c)))
		}
	}
	for _, line := range table {
		var b strings.Builder
		b.WriteString(" ")
		for i, c := range line {
			pad := widths[i] - len([]rune(c))
			b.WriteString(" ")
			if i == 0 {
				b.WriteString(c + strings.Repeat(" ", pad))
			} else {
				b.WriteString(strings.Repeat(" ", pad) + c)
			}
			b.WriteString(" ")
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
	for _, r := range rs {
		for _, k := range slices.Sorted(maps.Keys(r.ErrorSamples)) {
			fmt.Fprintf(w, "  %s, first %s error: %s\n", r.Name, k, r.ErrorSamples[k])
		}
	}
	fmt.Fprintln(w, "  TTFT: request sent to first content chunk; ITL: gap between content chunks / tokens in the chunk;\n"+
		"  E2E: to data: [DONE]; tokens are the streamed words (the mock tokenizer's one word per token);\n"+
		"  KV hit rate: prompt tokens the workers found cached (engine counters, weighted by requests per worker)")
}
