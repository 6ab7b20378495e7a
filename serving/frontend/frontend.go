// Package frontend is the OpenAI-compatible HTTP frontend: it tokenizes a
// completion or chat request, hashes the prompt into chained KV-block
// hashes, asks the router (an event-sourced actor that journals each
// decision) for a worker, opens a response stream to that worker on the data
// plane and relays the tokens to the client, as server-sent events when
// streaming. A client that goes away cancels the request on the worker; a
// worker that dies mid-stream has its request resumed on another worker with
// the tokens generated so far (migration, bounded).
package frontend

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/serving/tokenizer"
	"github.com/triplane-dev/triplane/serving/worker"
)

// Config configures a frontend.
type Config struct {
	// Addr is the HTTP listen address; default 127.0.0.1:8000.
	Addr  string
	Model string
	// BlockSize is the workers' KV block size in tokens: the prompt is
	// hashed in blocks of this size for the router's index.
	BlockSize int
	Vocab     uint32
	Router    *Router
	// StreamToken is sent when opening a worker's response stream.
	StreamToken string
	// DefaultMaxTokens applies when a request names none (16, as OpenAI's
	// completions); MaxTokens bounds what a request may ask (4096).
	DefaultMaxTokens, MaxTokens int
	// MaxPromptTokens bounds a prompt; default 32768.
	MaxPromptTokens int
	// MaxInflight bounds the requests served at once; beyond it requests
	// get 429. Default 1024.
	MaxInflight int
	// MaxMigrations bounds how often one request moves to another worker
	// after its worker failed; default 3.
	MaxMigrations int
	// MaxBody bounds a request body; default 4 MiB.
	MaxBody int64
	// BodyTimeout bounds reading a request body (default 10 s): a body
	// that trickles in holds an in-flight slot only so long.
	BodyTimeout time.Duration
	// Disagg, when set, sends long uncached prompts to a prefill worker.
	Disagg     *Disagg
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Disagg configures disaggregated prefill.
type Disagg struct {
	// Threshold is the least number of uncached prompt tokens (on the
	// chosen decode worker) worth a remote prefill; default 512.
	Threshold int
	// MaxPrefillQueue skips prefill workers with this many requests
	// waiting; with none left the decode worker prefills. Default 8.
	MaxPrefillQueue int
}

// Frontend is a running HTTP frontend.
type Frontend struct {
	cfg      Config
	log      *slog.Logger
	tok      tokenizer.Tokenizer
	srv      *http.Server
	ln       net.Listener
	inflight atomic.Int64
	metrics  *metrics
	created  int64
}

// Start listens and serves.
func Start(cfg Config) (*Frontend, error) {
	if cfg.Router == nil {
		return nil, errors.New("frontend: a router is required")
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:8000"
	}
	if cfg.Model == "" {
		cfg.Model = "triplane-mock"
	}
	if cfg.BlockSize <= 0 {
		cfg.BlockSize = 64
	}
	if cfg.Vocab == 0 {
		cfg.Vocab = 32000
	}
	if cfg.DefaultMaxTokens <= 0 {
		cfg.DefaultMaxTokens = 16
	}
	if cfg.MaxTokens <= 0 {
		cfg.MaxTokens = 4096
	}
	if cfg.MaxPromptTokens <= 0 {
		cfg.MaxPromptTokens = 32768
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 1024
	}
	if cfg.MaxMigrations < 0 {
		cfg.MaxMigrations = 0
	} else if cfg.MaxMigrations == 0 {
		cfg.MaxMigrations = 3
	}
	if cfg.MaxBody <= 0 {
		cfg.MaxBody = 4 << 20
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if d := cfg.Disagg; d != nil {
		if d.Threshold <= 0 {
			d.Threshold = 512
		}
		if d.MaxPrefillQueue <= 0 {
			d.MaxPrefillQueue = 8
		}
	}
	f := &Frontend{cfg: cfg, log: cfg.Logger, tok: tokenizer.New(cfg.Vocab), metrics: newMetrics(cfg.Registerer),
		created: time.Now().Unix()}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("frontend: listen on %s: %w", cfg.Addr, err)
	}
	f.ln = ln
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/completions", f.completions)
	mux.HandleFunc("POST /v1/chat/completions", f.chat)
	mux.HandleFunc("GET /v1/models", f.models)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "not_found",
			fmt.Sprintf("no route %s %s; this server has POST /v1/completions, POST /v1/chat/completions and GET /v1/models", r.Method, r.URL.Path))
	})
	// No write timeout: streams last as long as generation does.
	f.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 60 * time.Second,
		IdleTimeout: 2 * time.Minute}
	go func() {
		if err := f.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			f.log.Error("frontend stopped serving", "err", err)
		}
	}()
	f.log.Info("frontend listening", "addr", ln.Addr().String(), "model", cfg.Model)
	return f, nil
}

// Addr is the listening address.
func (f *Frontend) Addr() string { return f.ln.Addr().String() }

// Shutdown stops taking requests and waits for the running ones until ctx
// ends.
func (f *Frontend) Shutdown(ctx context.Context) error { return f.srv.Shutdown(ctx) }

// Close stops at once.
func (f *Frontend) Close() error { return f.srv.Close() }

// Inflight is the number of requests holding an in-flight slot (admitted,
// body being read or generating).
func (f *Frontend) Inflight() int { return int(f.inflight.Load()) }

func (f *Frontend) models(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, modelList{Object: "list", Data: []modelCard{{ID: f.cfg.Model, Object: "model", Created: f.created, OwnedBy: "triplane"}}})
}

// job is one request on its way through the frontend.
type job struct {
	id        string
	model     string
	tokens    []uint32
	maxTokens int
	stream    bool
	usage     bool
	chat      bool
}

func (f *Frontend) completions(w http.ResponseWriter, r *http.Request) {
	release, ok := f.admit(w)
	if !ok {
		return
	}
	defer release()
	var req completionRequest
	if !f.decode(w, r, &req) {
		return
	}
	text, ids, err := promptText(req.Prompt, f.cfg.Vocab)
	if err != nil {
		f.badRequest(w, err.Error())
		return
	}
	if ids == nil {
		ids = f.tok.Encode(text)
	}
	j, ok := f.job(w, "cmpl-", req.Model, ids, req.MaxTokens, nil, req.N, req.Stream, req.StreamOptions)
	if !ok {
		return
	}
	f.run(w, r, j)
}

func (f *Frontend) chat(w http.ResponseWriter, r *http.Request) {
	release, ok := f.admit(w)
	if !ok {
		return
	}
	defer release()
	var req chatRequest
	if !f.decode(w, r, &req) {
		return
	}
	text, err := chatText(req.Messages)
	if err != nil {
		f.badRequest(w, err.Error())
		return
	}
	j, ok := f.job(w, "chatcmpl-", req.Model, f.tok.Encode(text), req.MaxTokens, req.MaxCompletionTokens, req.N, req.Stream, req.StreamOptions)
	if !ok {
		return
	}
	j.chat = true
	f.run(w, r, j)
}

func (f *Frontend) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		f.badRequest(w, fmt.Sprintf("Content-Type %q: send application/json", ct))
		return false
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(f.cfg.BodyTimeout))
	body := http.MaxBytesReader(w, r.Body, f.cfg.MaxBody)
	dec := json.NewDecoder(body)
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			f.metrics.requests.WithLabelValues("bad_request").Inc()
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large",
				fmt.Sprintf("request body is larger than %d bytes", f.cfg.MaxBody))
			return false
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The rest of the body is not waited for: the connection
			// closes after the answer.
			w.Header().Set("Connection", "close")
			f.metrics.requests.WithLabelValues("bad_request").Inc()
			writeError(w, http.StatusRequestTimeout, "invalid_request_error", "request_timeout",
				fmt.Sprintf("request body not received within %s", f.cfg.BodyTimeout))
			return false
		}
		f.badRequest(w, "request body is not valid JSON: "+err.Error())
		return false
	}
	if dec.More() {
		f.badRequest(w, "request body holds more than one JSON value")
		return false
	}
	// Read: generation may outlast the body's deadline.
	_ = rc.SetReadDeadline(time.Time{})
	return true
}

func (f *Frontend) job(w http.ResponseWriter, prefix, model string, tokens []uint32, maxTokens, maxCompletion, n *int, streaming bool, so *streamOptions) (*job, bool) {
	switch {
	case model == "":
		f.badRequest(w, "model is required (GET /v1/models lists them)")
		return nil, false
	case model != f.cfg.Model:
		f.metrics.requests.WithLabelValues("unknown_model").Inc()
		writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
			fmt.Sprintf("the model %q does not exist; this server serves %q", model, f.cfg.Model))
		return nil, false
	case n != nil && *n != 1:
		f.badRequest(w, fmt.Sprintf("n=%d: this server generates one choice per request", *n))
		return nil, false
	case len(tokens) > f.cfg.MaxPromptTokens:
		f.badRequest(w, fmt.Sprintf("the prompt is %d tokens; the limit is %d", len(tokens), f.cfg.MaxPromptTokens))
		return nil, false
	}
	mt := f.cfg.DefaultMaxTokens
	if maxCompletion != nil {
		maxTokens = maxCompletion
	}
	if maxTokens != nil {
		mt = *maxTokens
	}
	if mt < 1 || mt > f.cfg.MaxTokens {
		f.badRequest(w, fmt.Sprintf("max_tokens %d is outside 1..%d", mt, f.cfg.MaxTokens))
		return nil, false
	}
	return &job{id: prefix + newID(), model: model, tokens: tokens, maxTokens: mt, stream: streaming,
		usage: so != nil && so.IncludeUsage}, true
}

func (f *Frontend) badRequest(w http.ResponseWriter, msg string) {
	f.metrics.requests.WithLabelValues("bad_request").Inc()
	writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_request", msg)
}

// admit takes one of MaxInflight slots, before the body is read: a body
// decodes into several times its size, so the limit bounds the memory
// requests hold, not only the generations running. release gives it back.
func (f *Frontend) admit(w http.ResponseWriter) (release func(), ok bool) {
	if n := f.inflight.Add(1); n > int64(f.cfg.MaxInflight) {
		f.inflight.Add(-1)
		f.metrics.requests.WithLabelValues("overloaded").Inc()
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusTooManyRequests, "rate_limit_error", "overloaded",
			fmt.Sprintf("%d requests are running, the limit is %d; retry later", n-1, f.cfg.MaxInflight))
		return nil, false
	}
	f.metrics.inflight.Inc()
	return func() {
		f.metrics.inflight.Dec()
		f.inflight.Add(-1)
	}, true
}

// run routes and generates, relaying tokens to the client; the caller
// holds an in-flight slot (admit).
func (f *Frontend) run(w http.ResponseWriter, r *http.Request, j *job) {
	t0 := time.Now()

	out := newSink(w, j, f)
	res := f.generate(r.Context(), j, out)
	switch {
	case res.err != nil && r.Context().Err() != nil:
		f.metrics.requests.WithLabelValues("client_gone").Inc()
		f.log.Debug("client went away; request cancelled on the worker", "request", j.id)
	case res.err != nil:
		f.metrics.requests.WithLabelValues(res.outcome).Inc()
		f.log.Warn("request failed", "request", j.id, "err", res.err, "generated", res.generated)
		out.fail(res.status, res.errType, res.code, res.err.Error())
	default:
		f.metrics.requests.WithLabelValues("ok").Inc()
		f.metrics.duration.Observe(time.Since(t0).Seconds())
		out.finish(res.reason, res.generated)
	}
}

type result struct {
	reason    string
	generated int
	err       error
	status    int
	errType   string
	code      string
	outcome   string
}

// generate runs the request on a worker, migrating it to another when its
// worker fails (at most MaxMigrations times), until it finishes or fails
// for good. A worker that refuses it while healthy (busy, draining, too
// small a pool) is not a migration: the request goes to one not tried
// yet, which bounds those tries by the workers there are.
func (f *Frontend) generate(ctx context.Context, j *job, out *sink) result {
	hashes := mocker.BlockHashes(j.tokens, f.cfg.BlockSize)
	tried := map[string]bool{}
	var generated []uint32
	var lastErr error
	// Every worker tried so far refused the request while healthy: busy
	// (or draining), or too small for the prompt. When none is left, a
	// busy one means 429, else the request is too large for all (400).
	refused, failed, busy := false, false, false
	// Busy refusals are capped as migrations were: under overload each
	// try is a journaled decision and a stream open, and trying every
	// worker would add load where there is too much. Too-large refusals
	// go on to the workers not tried (bounded by them): another pool may
	// hold the prompt.
	busyTries := 0
	maxBusy := max(f.cfg.MaxMigrations+1, 4)
	migrations, lastFailed := 0, false
	refusal := func() (result, bool) {
		switch {
		case !refused || failed || len(generated) > 0:
			return result{}, false
		case busy:
			return result{err: fmt.Errorf("every worker tried is busy: %w", lastErr), status: http.StatusTooManyRequests,
				errType: "rate_limit_error", code: "overloaded", outcome: "overloaded"}, true
		}
		return result{err: fmt.Errorf("every worker tried refused it: %w", lastErr), status: http.StatusBadRequest,
			errType: "invalid_request_error", code: "invalid_request", outcome: "bad_request"}, true
	}
	for attempt := 0; ; attempt++ {
		if lastFailed {
			if migrations == f.cfg.MaxMigrations {
				return result{generated: len(generated), err: fmt.Errorf("gave up after %d migrations: %w", migrations, lastErr),
					status: http.StatusServiceUnavailable, errType: "server_error", code: "worker_failed", outcome: "worker_failed"}
			}
			migrations++
			f.metrics.migrations.Inc()
			f.log.Info("migrating request", "request", j.id, "attempt", attempt, "generated", len(generated), "err", lastErr)
		}
		// The route id is unique per attempt: the router journals one
		// decision per attempt.
		routeID := j.id
		if attempt > 0 {
			routeID = fmt.Sprintf("%s.m%d", j.id, attempt)
		}
		if len(generated) >= j.maxTokens {
			// Every token arrived before the worker failed to say so.
			return result{reason: "length", generated: len(generated)}
		}
		prompt := append(append([]uint32(nil), j.tokens...), generated...)
		in, overlap, release, err := f.cfg.Router.Route(ctx, routeID, hashes, tried, Pool{})
		if err != nil {
			if ctx.Err() != nil {
				return result{err: ctx.Err()}
			}
			if errors.Is(err, ErrNoWorker) && lastErr != nil {
				err = fmt.Errorf("%w (after: %w)", err, lastErr)
			}
			if res, ok := refusal(); ok {
				if !errors.Is(err, ErrNoWorker) {
					res.err = fmt.Errorf("%w; then: %w", res.err, err)
				}
				return res
			}
			return result{generated: len(generated), err: err, status: http.StatusServiceUnavailable,
				errType: "server_error", code: "no_worker", outcome: "no_worker"}
		}
		prefill, prelease := f.prefillWorker(ctx, in, routeID, hashes, overlap, len(generated))
		started := func() { f.cfg.Router.Started(in.GetInstanceId(), routeID) }
		reason, err := f.attempt(ctx, j, in, prompt, j.maxTokens-len(generated), prefill, &generated, out, started)
		prelease()
		release()
		if err == nil {
			return result{reason: reason, generated: len(generated)}
		}
		if ctx.Err() != nil {
			return result{err: ctx.Err()}
		}
		var wr workerError
		isRefusal := errors.As(err, &wr)
		if isRefusal && wr.code == worker.CodeBadRequest {
			return result{generated: len(generated), err: err, status: http.StatusBadRequest,
				errType: "invalid_request_error", code: "invalid_request", outcome: "bad_request"}
		}
		lastErr = fmt.Errorf("worker %s: %w", in.GetInstanceId(), err)
		tried[in.GetInstanceId()] = true
		lastFailed = false
		switch {
		case isRefusal && wr.code == worker.CodeTooLarge:
			// Healthy, but too small for this prompt: another may take it.
		case isRefusal && (wr.code == worker.CodeOverloaded || wr.code == worker.CodeDraining):
			// A busy or draining worker is healthy: try another without
			// reporting it down.
			busy = true
			if busyTries++; busyTries == maxBusy {
				refused = true
				if res, ok := refusal(); ok {
					return res
				}
				return result{generated: len(generated), err: fmt.Errorf("gave up after %d busy workers: %w", busyTries, lastErr),
					status: http.StatusServiceUnavailable, errType: "server_error", code: "worker_failed", outcome: "worker_failed"}
			}
		default:
			// A failure: the answer is no longer the refusals'.
			failed, lastFailed = true, true
			f.cfg.Router.ReportDown(in)
			continue
		}
		refused = true
		f.log.Debug("worker refused the request, trying another", "request", j.id, "err", lastErr)
	}
}

// prefillWorker picks a prefill worker when the prompt's uncached part on
// the chosen decode worker is long enough and a prefill worker's queue has
// room; "" means the decode worker prefills. A decode worker that
// publishes no data peer takes no blocks (an aggregated worker, a node
// without --disagg): it prefills itself.
func (f *Frontend) prefillWorker(ctx context.Context, decode *triplanev1.InstanceInfo, routeID string, hashes []uint64, overlap, generated int) (string, func()) {
	d := f.cfg.Disagg
	if d == nil || generated > 0 {
		return "", func() {}
	}
	if decode.GetDataPeer() == nil {
		f.metrics.prefills.WithLabelValues("local").Inc()
		return "", func() {}
	}
	if (len(hashes)-overlap)*f.cfg.BlockSize < d.Threshold {
		f.metrics.prefills.WithLabelValues("local").Inc()
		return "", func() {}
	}
	in, _, release, err := f.cfg.Router.Route(ctx, routeID+".prefill", hashes, nil, Pool{Prefill: true, MaxWaiting: d.MaxPrefillQueue})
	if err != nil {
		f.metrics.prefills.WithLabelValues("local").Inc()
		f.log.Debug("prefilling on the decode worker", "request", routeID, "reason", err)
		return "", func() {}
	}
	f.metrics.prefills.WithLabelValues("remote").Inc()
	return in.GetInstanceId(), release
}

// workerError is the error a worker ended a stream with, and its code.
type workerError struct{ msg, code string }

func (e workerError) Error() string { return e.msg }

// attempt streams the request from one worker.
func (f *Frontend) attempt(ctx context.Context, j *job, in *triplanev1.InstanceInfo, prompt []uint32, remaining int, prefill string, generated *[]uint32, out *sink, started func()) (string, error) {
	payload, err := proto.Marshal(&triplanev1.GenerateRequest{RequestId: j.id, Tokens: prompt, MaxTokens: uint32(remaining),
		Model: j.model, PrefillWorker: prefill})
	if err != nil {
		return "", err
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := stream.Open(sctx, streamAddr(in), &triplanev1.StreamOpen{RequestId: j.id, Payload: payload},
		// Workers send keep-alives every 5 s while a request is silent (a
		// remote prefill); a worker silent for 30 s is stuck: migrate.
		stream.ClientOptions{Token: f.cfg.StreamToken, IdleTimeout: 30 * time.Second})
	if err != nil {
		return "", err
	}
	defer s.Close()
	for {
		fr, err := s.Recv()
		if err != nil {
			return "", err
		}
		if len(fr.Data) > 0 {
			chunk := &triplanev1.GenerateChunk{}
			if err := proto.Unmarshal(fr.Data, chunk); err != nil {
				return "", fmt.Errorf("worker sent a chunk that does not decode: %w", err)
			}
			if len(*generated) == 0 && chunk.CachedTokens > 0 {
				out.cached = int(chunk.CachedTokens)
			}
			if len(chunk.Tokens) > 0 {
				if started != nil {
					started()
					started = nil
				}
				*generated = append(*generated, chunk.Tokens...)
				if err := out.tokens(chunk.Tokens); err != nil {
					return "", err
				}
			}
		}
		if fr.Final {
			if fr.Error != "" {
				return "", workerError{msg: fr.Error, code: fr.Code}
			}
			return fr.Reason, nil
		}
	}
}

func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, typ, code, msg string) {
	c := code
	writeJSON(w, status, map[string]apiError{"error": {Message: msg, Type: typ, Code: &c}})
}

// sink writes one request's output: a JSON body at the end, or server-sent
// events as tokens come.
type sink struct {
	w       http.ResponseWriter
	j       *job
	f       *Frontend
	started bool
	text    strings.Builder
	cached  int
	n       int
}

func newSink(w http.ResponseWriter, j *job, f *Frontend) *sink { return &sink{w: w, j: j, f: f} }

func (s *sink) tokens(ids []uint32) error {
	s.n += len(ids)
	s.f.metrics.tokens.Add(float64(len(ids)))
	text := s.f.tok.Decode(ids)
	if !s.j.stream {
		s.text.WriteString(text)
		return nil
	}
	if !s.started {
		s.started = true
		h := s.w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no")
		s.w.WriteHeader(http.StatusOK)
		if s.j.chat {
			if err := s.event(s.chunk(&chatDelta{Role: "assistant"}, nil)); err != nil {
				return err
			}
		}
	}
	return s.event(s.chunk(&chatDelta{Content: text}, nil))
}

func (s *sink) chunk(d *chatDelta, finish *string) any {
	if s.j.chat {
		return chatResponse{ID: s.j.id, Object: "chat.completion.chunk", Created: time.Now().Unix(), Model: s.j.model,
			Choices: []chatChoice{{Index: 0, Delta: d, FinishReason: finish}}}
	}
	return completionResponse{ID: s.j.id, Object: "text_completion", Created: time.Now().Unix(), Model: s.j.model,
		Choices: []completionChoice{{Text: d.Content, Index: 0, FinishReason: finish}}}
}

func (s *sink) event(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(s.w, "data: %s\n\n", b); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	if fl, ok := s.w.(http.Flusher); ok {
		fl.Flush()
	}
	return nil
}

func (s *sink) usage() *usage {
	p := len(s.j.tokens)
	return &usage{PromptTokens: p, CompletionTokens: s.n, TotalTokens: p + s.n}
}

func (s *sink) finish(reason string, generated int) {
	if reason == "" {
		reason = "stop"
	}
	if !s.j.stream {
		if s.j.chat {
			writeJSON(s.w, http.StatusOK, chatResponse{ID: s.j.id, Object: "chat.completion", Created: time.Now().Unix(), Model: s.j.model,
				Choices: []chatChoice{{Index: 0, Message: &chatDelta{Role: "assistant", Content: s.text.String()}, FinishReason: &reason}},
				Usage:   s.usage()})
			return
		}
		writeJSON(s.w, http.StatusOK, completionResponse{ID: s.j.id, Object: "text_completion", Created: time.Now().Unix(), Model: s.j.model,
			Choices: []completionChoice{{Text: s.text.String(), Index: 0, FinishReason: &reason}}, Usage: s.usage()})
		return
	}
	if !s.started {
		// No token at all (cannot happen with max_tokens >= 1, but keep
		// the stream well formed).
		_ = s.tokens(nil)
	}
	_ = s.event(s.chunk(&chatDelta{}, &reason))
	if s.j.usage {
		if s.j.chat {
			_ = s.event(chatResponse{ID: s.j.id, Object: "chat.completion.chunk", Created: time.Now().Unix(), Model: s.j.model,
				Choices: []chatChoice{}, Usage: s.usage()})
		} else {
			_ = s.event(completionResponse{ID: s.j.id, Object: "text_completion", Created: time.Now().Unix(), Model: s.j.model,
				Choices: []completionChoice{}, Usage: s.usage()})
		}
	}
	_, _ = io.WriteString(s.w, "data: [DONE]\n\n")
	if fl, ok := s.w.(http.Flusher); ok {
		fl.Flush()
	}
}

// fail reports an error: as the HTTP status before any output, or as an
// error event inside a stream that already started.
func (s *sink) fail(status int, typ, code, msg string) {
	if !s.started {
		if status == http.StatusTooManyRequests {
			s.w.Header().Set("Retry-After", "1")
		}
		writeError(s.w, status, typ, code, msg)
		return
	}
	c := code
	_ = s.event(map[string]apiError{"error": {Message: msg, Type: typ, Code: &c}})
	_, _ = io.WriteString(s.w, "data: [DONE]\n\n")
	if fl, ok := s.w.(http.Flusher); ok {
		fl.Flush()
	}
}
