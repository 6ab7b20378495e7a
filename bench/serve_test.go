package bench_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/bench"
	"github.com/triplane-dev/triplane/router"
	"github.com/triplane-dev/triplane/serving/tokenizer"
	"github.com/triplane-dev/triplane/workload"
)

// TestServeInProcess runs the serving bench end to end: one in-process node
// per policy, the same small synthetic workload against each.
func TestServeInProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reqs := bench.SyntheticWorkload(bench.SyntheticConfig{Requests: 30, Prefixes: 3, PrefixWords: 64, SuffixWords: 8,
		MaxTokens: 8, Rate: 200, Seed: 1})
	var progress bytes.Buffer
	rs, err := bench.Serve(ctx, bench.ServeConfig{Requests: reqs, Concurrency: 8,
		Policies: []router.Policy{router.PolicyKV, router.PolicyRoundRobin},
		Workers:  2, BlockSize: 16, BlocksPerWorker: 256, SpeedUp: 100}, &progress)
	if err != nil {
		t.Fatalf("%v\n%s", err, progress.String())
	}
	if len(rs) != 2 {
		t.Fatalf("%d results", len(rs))
	}
	for _, r := range rs {
		if r.Sent != 30 || r.OK != 30 || len(r.Errors) != 0 || len(r.Anomalies) != 0 {
			t.Errorf("%s: sent %d, ok %d, errors %v %v, anomalies %v", r.Name, r.Sent, r.OK, r.Errors, r.ErrorSamples, r.Anomalies)
		}
		// A chunk may carry several tokens; those of the first chunk have
		// no inter-token gap.
		if len(r.TTFT) != r.OK || r.TTFT[0] <= 0 || len(r.ITL) == 0 || len(r.ITL) > r.OK*7 || r.OutputTokens != r.OK*8 {
			t.Errorf("%s: %d TTFTs (lowest %v), %d ITLs, %d tokens", r.Name, len(r.TTFT), r.TTFT[0], len(r.ITL), r.OutputTokens)
		}
		if r.HitRate <= 0 || r.HitRate > 1 {
			t.Errorf("%s: hit rate %v with shared prefixes", r.Name, r.HitRate)
		}
		total := 0
		for _, n := range r.WorkerRequests {
			total += n
		}
		if total != 30 {
			t.Errorf("%s: workers served %v", r.Name, r.WorkerRequests)
		}
	}
	var out bytes.Buffer
	bench.PrintServe(&out, "test", rs)
	t.Logf("\n%s", out.String())
	// No comparison of the two hit rates here: for a 30-request burst it
	// depends on timing (requests routed before the index heard of their
	// prefix, kv spreading queued prefill). Prefix-following routing is
	// tested in serving (sequential requests); the ratio is measured by
	// the benchmark runs in docs/benchmarks.md.
	if !strings.Contains(out.String(), "kv / round-robin") {
		t.Error("no ratio column")
	}
}

// TestTraceWorkloadAligns checks that prompts made from a trace tokenize
// (with the frontend's tokenizer) into KV blocks that follow the hash ids:
// equal up to the first differing hash id, and cut to input_length.
func TestTraceWorkloadAligns(t *testing.T) {
	recs := []workload.Record{
		{Timestamp: 100, InputLength: 1000, OutputLength: 500, HashIDs: []int64{7, 8}},
		{Timestamp: 50, InputLength: 1024, OutputLength: 3, HashIDs: []int64{7, 9}},
		{Timestamp: 300, InputLength: 40000, OutputLength: 3, HashIDs: make([]int64, 79)},
	}
	reqs, skipped := bench.TraceWorkload(bench.TraceConfig{Records: recs, TimeScale: 0.5, MaxTokens: 64, MaxPromptTokens: 32768})
	if skipped != 1 || len(reqs) != 2 {
		t.Fatalf("%d requests, %d skipped", len(reqs), skipped)
	}
	if reqs[0].At != 0 || reqs[1].At != 25*time.Millisecond || reqs[0].MaxTokens != 3 || reqs[1].MaxTokens != 64 {
		t.Fatalf("arrivals and max tokens: %+v %+v", reqs[0].At, reqs[1].At)
	}
	tok := tokenizer.New(32000)
	a, b := tok.Encode(reqs[0].Prompt), tok.Encode(reqs[1].Prompt)
	if len(a) != 1024 || len(b) != 1000 {
		t.Fatalf("prompt tokens %d and %d, want 1024 and 1000", len(a), len(b))
	}
	for i := range 512 {
		if a[i] != b[i] {
			t.Fatalf("token %d differs inside the shared hash id", i)
		}
	}
	if a[512] == b[512] {
		t.Fatal("token 512 is equal across different hash ids")
	}
	// With 16 words per hash id, prompts shrink to 16/512 of input_length.
	small, _ := bench.TraceWorkload(bench.TraceConfig{Records: recs[:1], WordsPerHash: 16})
	if n := len(tok.Encode(small[0].Prompt)); n != 32 {
		t.Fatalf("%d tokens with 16 words per hash id, want 32", n)
	}
}
