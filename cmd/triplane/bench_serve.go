package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/logging"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/workload"
)

type benchServeFlags struct {
	url         string
	model       string
	api         string
	policies    []string
	workers     int
	blockSize   int
	blocks      int
	speedup     float64
	overlap     float64
	temperature float64
	jsSync      string
	workload    string
	requests    int
	prefixes    int
	prefixWords int
	suffixWords int
	maxTokens   int
	rate        float64
	concurrency int
	seed        uint64
	trace       string
	timeScale   float64
	limit       int
	hashWords   int
	maxPrompt   int
	timeout     time.Duration
}

func newBenchServeCmd(g *globalFlags) *cobra.Command {
	f := &benchServeFlags{}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Load-test an OpenAI-compatible frontend: TTFT, inter-token latency, throughput, KV hits",
		Long: `Sends a workload of streaming requests (stream_options.include_usage) to an
OpenAI-compatible frontend and reads the server-sent events: time to first
token (request sent to first content chunk), inter-token latency (gap between
content chunks, divided by the tokens in the chunk), end-to-end latency,
output tokens/s and requests/s, errors by HTTP status (or by what went wrong
inside a stream), and the workers' KV prefix-cache hit rate.

Without --url it starts, in this process and one after the other, one node per
policy in --policies (embedded NATS and etcd on free ports, a temporary data
dir, --workers mock-engine workers, the router and the frontend on a free
port), sends each the identical workload and prints them side by side with
their ratios to round-robin. With --url it drives that running frontend (whose
policy is whatever it runs; the hit rate is then n/a).

Workloads:
  synthetic  --requests requests, each one of --prefixes shared prompts of
             --prefix-tokens words (drawn at random) followed by --suffix-tokens
             words of its own; Poisson arrivals at --rate req/s (seeded by --seed;
             0: all at once), --max-tokens each.
  trace      a Mooncake trace (--trace FILE, first --limit records): each hash id
             expands to the same --words-per-hash words (one token each), so
             prompts share KV blocks where the trace's hash ids say;
             arrivals at the trace's timestamps times --time-scale; max_tokens
             is output_length capped by --max-tokens.

At most --concurrency requests are in flight; an arrival beyond that waits
(counted in "waited for the cap"). Ctrl-C stops the run.`,
		Example: `  triplane bench serve
  triplane bench serve --workers 4 --requests 400 --rate 40 --prefixes 8 --prefix-tokens 512 --max-tokens 64 --speedup 10
  triplane bench serve --workload trace --trace mooncake_conversation_trace.jsonl --limit 300 --time-scale 0.1
  triplane bench serve --url http://127.0.0.1:8000 --requests 100 --rate 5`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			if cmd.Flags().Changed("trace") && !cmd.Flags().Changed("workload") {
				f.workload = "trace"
			}
			if err := f.validate(cmd); err != nil {
				return usageError{err}
			}
			return runBenchServe(cmd, g, f)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.url, "url", "", "drive the OpenAI-compatible frontend at this URL (http://host:port) instead of starting nodes in process")
	fs.StringVar(&f.model, "model", "", "model named in the requests (default: triplane-mock in process, the frontend's first model with --url)")
	config.EnumVar(fs, &f.api, "api", "completions", []string{"completions", "chat"},
		"endpoint: completions (/v1/completions, the prompt as text) or chat (/v1/chat/completions, the prompt as one user message; its template shifts KV blocks off a trace's hash ids)")
	fs.StringSliceVar(&f.policies, "policies", []string{string(router.PolicyKV), string(router.PolicyRoundRobin)},
		"routing policies, one in-process node each, run one after the other ("+strings.Join(policyNames(), ", ")+")")
	fs.IntVar(&f.workers, "workers", 4, "mock-engine workers in each in-process node")
	fs.IntVar(&f.blockSize, "block-size", 16, "KV block size in tokens (with --url: the frontend's, to align a trace's prompts)")
	fs.IntVar(&f.blocks, "blocks-per-worker", 4096, "KV blocks in each worker's pool")
	fs.Float64Var(&f.speedup, "speedup", 10, "divides the mock engine's modelled prefill and decode times")
	fs.Float64Var(&f.overlap, "overlap-weight", router.DefaultOverlapWeight, "kv policy: weight of blocks to prefill against blocks in use")
	fs.Float64Var(&f.temperature, "temperature", 0, "kv policy: 0 picks the cheapest worker, above 0 samples by cost")
	config.EnumVar(fs, &f.jsSync, "jetstream-sync", "always", []string{"always", "interval"},
		"when the in-process nodes' JetStream fsyncs the journal (the router journals every decision): always (as triplane up) or interval")
	config.EnumVar(fs, &f.workload, "workload", "synthetic", []string{"synthetic", "trace"}, "workload: synthetic (shared prefixes) or trace (a Mooncake trace)")
	fs.IntVar(&f.requests, "requests", 200, "synthetic: requests to send")
	fs.IntVar(&f.prefixes, "prefixes", 8, "synthetic: shared prompts (system prompts) the requests draw from")
	fs.IntVar(&f.prefixWords, "prefix-tokens", 512, "synthetic: words (tokens) of each shared prompt")
	fs.IntVar(&f.suffixWords, "suffix-tokens", 32, "synthetic: words (tokens) of each request's own suffix")
	fs.IntVar(&f.maxTokens, "max-tokens", 64, "max_tokens of each request (trace: caps output_length)")
	fs.Float64Var(&f.rate, "rate", 20, "synthetic: mean arrival rate in requests/s, Poisson (0: all at once)")
	fs.IntVar(&f.concurrency, "concurrency", 128, "requests in flight at most; an arrival beyond waits")
	fs.Uint64Var(&f.seed, "seed", 1, "synthetic: seed of the arrivals and of the prefix each request draws")
	fs.StringVar(&f.trace, "trace", "", "trace: request trace, one JSON object a line (Mooncake format); implies --workload trace")
	fs.Float64Var(&f.timeScale, "time-scale", 1, "trace: multiplies the trace's timestamps (0.1: ten times faster; 0: all at once)")
	fs.IntVar(&f.limit, "limit", 200, "trace: replay the first N records (0: all)")
	fs.IntVar(&f.hashWords, "words-per-hash", workload.TraceBlockSize, "trace: words (tokens) each hash id expands to; a multiple of --block-size; prompts scale to input_length*N/512")
	fs.IntVar(&f.maxPrompt, "max-prompt-tokens", 32768, "trace: skip records whose prompt is longer (the frontend's limit)")
	fs.DurationVar(&f.timeout, "timeout", 2*time.Minute, "bound on one request")
	return cmd
}

func (f *benchServeFlags) validate(cmd *cobra.Command) error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, &config.Error{Key: key, Err: fmt.Errorf(format, a...)})
	}
	finite := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	if f.url != "" {
		u, err := url.Parse(f.url)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			bad("url", "%q: want http://host:port", f.url)
		}
		for _, name := range []string{"policies", "workers", "blocks-per-worker", "speedup", "overlap-weight", "temperature", "jetstream-sync"} {
			if cmd.Flags().Changed(name) {
				bad(name, "sets up the in-process nodes; it has no effect with --url")
			}
		}
	}
	for _, s := range f.policies {
		if _, err := router.ParsePolicy(strings.TrimSpace(s)); err != nil {
			bad("policies", "%v", err)
		}
	}
	if len(f.policies) == 0 {
		bad("policies", "no policy given")
	}
	if f.workers < 1 || f.workers > 256 {
		bad("workers", "%d is outside 1-256", f.workers)
	}
	if f.blockSize < 1 {
		bad("block-size", "must be at least 1")
	}
	if f.blocks < 2 {
		bad("blocks-per-worker", "must be at least 2")
	}
	if !(f.speedup > 0) || !finite(f.speedup) {
		bad("speedup", "must be a positive number, got %v", f.speedup)
	}
	if !(f.overlap > 0) || !finite(f.overlap) {
		// 0 would silently mean the router's default.
		bad("overlap-weight", "must be a positive number, got %v", f.overlap)
	}
	if !(f.temperature >= 0) || !finite(f.temperature) {
		bad("temperature", "must not be negative, got %v", f.temperature)
	}
	if f.maxTokens < 1 || f.maxTokens > 4096 {
		bad("max-tokens", "%d is outside 1-4096 (the frontend's limit)", f.maxTokens)
	}
	if f.concurrency < 1 || f.concurrency > 4096 {
		bad("concurrency", "%d is outside 1-4096", f.concurrency)
	}
	if f.timeout <= 0 {
		bad("timeout", "must be positive")
	}
	switch f.workload {
	case "synthetic":
		if f.trace != "" {
			bad("trace", "a trace needs --workload trace")
		}
		if f.requests < 1 {
			bad("requests", "must be at least 1")
		}
		if f.prefixes < 1 {
			bad("prefixes", "must be at least 1")
		}
		if f.prefixWords < 0 || f.suffixWords < 0 || f.prefixWords+f.suffixWords == 0 {
			bad("prefix-tokens", "--prefix-tokens and --suffix-tokens must not be negative, nor both 0")
		}
		if !(f.rate >= 0) || !finite(f.rate) {
			bad("rate", "must be a number >= 0, got %v", f.rate)
		}
	case "trace":
		if f.trace == "" {
			bad("trace", "--workload trace needs --trace FILE")
		}
		for _, name := range []string{"requests", "prefixes", "prefix-tokens", "suffix-tokens", "rate", "seed"} {
			if cmd.Flags().Changed(name) {
				bad(name, "is for --workload synthetic; a trace has its own requests and arrivals (see --limit, --time-scale)")
			}
		}
		if !(f.timeScale >= 0) || !finite(f.timeScale) {
			bad("time-scale", "must be a number >= 0, got %v", f.timeScale)
		}
		if f.limit < 0 {
			bad("limit", "must not be negative")
		}
		if f.hashWords < 1 || (f.blockSize >= 1 && f.hashWords%f.blockSize != 0) {
			bad("words-per-hash", "%d must be a positive multiple of --block-size %d, or KV blocks straddle hash ids", f.hashWords, f.blockSize)
		}
		if f.maxPrompt < 1 {
			bad("max-prompt-tokens", "must be at least 1")
		}
	}
	return errors.Join(errs...)
}

func runBenchServe(cmd *cobra.Command, g *globalFlags, f *benchServeFlags) error {
	log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cfg := bench.ServeConfig{
		URL: f.url, Model: f.model, Chat: f.api == "chat", Concurrency: f.concurrency, Timeout: f.timeout,
		Params:  router.Params{OverlapWeight: f.overlap, Temperature: f.temperature},
		Workers: f.workers, BlockSize: f.blockSize, BlocksPerWorker: f.blocks, SpeedUp: f.speedup,
		SyncAlways: f.jsSync == "always", Logger: log,
	}
	for _, s := range f.policies {
		p, _ := router.ParsePolicy(strings.TrimSpace(s))
		cfg.Policies = append(cfg.Policies, p)
	}
	var what string
	switch f.workload {
	case "synthetic":
		cfg.Requests = bench.SyntheticWorkload(bench.SyntheticConfig{Requests: f.requests, Prefixes: f.prefixes,
			PrefixWords: f.prefixWords, SuffixWords: f.suffixWords, MaxTokens: f.maxTokens, Rate: f.rate, Seed: f.seed})
		rate := "all at once"
		if f.rate > 0 {
			rate = fmt.Sprintf("%g req/s Poisson (seed %d)", f.rate, f.seed)
		}
		what = fmt.Sprintf("synthetic, %d requests, %d prefixes x %d + %d tokens, max_tokens %d, %s",
			f.requests, f.prefixes, f.prefixWords, f.suffixWords, f.maxTokens, rate)
	case "trace":
		tf, err := os.Open(f.trace)
		if err != nil {
			return fmt.Errorf("trace: %w", err)
		}
		recs, err := workload.Read(tf, f.limit)
		tf.Close()
		if err != nil {
			return fmt.Errorf("trace %s: %w", f.trace, err)
		}
		var skipped int
		cfg.Requests, skipped = bench.TraceWorkload(bench.TraceConfig{Records: recs, TimeScale: f.timeScale,
			MaxTokens: f.maxTokens, WordsPerHash: f.hashWords, MaxPromptTokens: f.maxPrompt})
		if len(cfg.Requests) == 0 {
			return fmt.Errorf("trace %s: no request of at most %d prompt tokens in the first %d records", f.trace, f.maxPrompt, len(recs))
		}
		span := cfg.Requests[len(cfg.Requests)-1].At
		what = fmt.Sprintf("trace %s, %d requests (%d longer than %d tokens skipped) over %s (time scale %g), %d words per hash id, max_tokens <= %d",
			f.trace, len(cfg.Requests), skipped, f.maxPrompt, span.Round(100*time.Millisecond), f.timeScale, f.hashWords, f.maxTokens)
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "serving bench: %s\n", what)
	rs, err := bench.Serve(ctx, cfg, cmd.ErrOrStderr())
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("bench serve: interrupted: %w", context.Cause(ctx))
		}
		return fmt.Errorf("bench serve: %w", err)
	}
	where := "in process: " + fmt.Sprintf("%d workers x %d blocks of %d tokens, speedup %g, jetstream sync %s", f.workers, f.blocks, f.blockSize, f.speedup, f.jsSync)
	if f.url != "" {
		where = f.url
	}
	title := fmt.Sprintf("serving: %s; %s; concurrency <= %d, %s (%s)", what, where, f.concurrency, f.api, strings.Join(os.Args[1:], " "))
	bench.PrintServe(cmd.OutOrStdout(), title, rs)
	return nil
}
