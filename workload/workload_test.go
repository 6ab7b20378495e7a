package workload_test

import (
	"os"
	"strings"
	"testing"

	"github.com/triplane-dev/triplane/workload"
)

const tracePath = "../../shared/workloads/mooncake_conversation_trace.jsonl"

func TestReadGoodAndBad(t *testing.T) {
	good := `{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [1, 2]}   
{"timestamp": 5, "input_length": 100, "output_length": 3, "hash_ids": [1]}
`
	recs, err := workload.Read(strings.NewReader(good), 0)
	if err != nil || len(recs) != 2 {
		t.Fatalf("good trace: %v %v", recs, err)
	}
	a, b := recs[0].Tokens(32000), recs[1].Tokens(32000)
	if len(a) != 600 || len(b) != 100 {
		t.Fatalf("token counts %d %d", len(a), len(b))
	}
	for i := range b {
		if a[i] != b[i] {
			t.Fatalf("hash id 1 expands differently at %d", i)
		}
	}
	for _, tc := range []struct{ line, want string }{
		{`{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [1]}`, "do not cover"},
		{`{"timestamp": 0, "input_length": 0, "output_length": 10, "hash_ids": [1]}`, "must be positive"},
		{`{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": [1]}`, "negative"},
		{`{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1], "x": 1}`, "unknown field"},
		{`{"timestamp": 0,`, "line 2"},
		{`{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]} {"timestamp": 1}`, "more after"},
		{`{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}]`, "more after"},
		{`{"timestamp": 0, "input_length": 1, "output_length": 1000000000, "hash_ids": [1]}`, "past the limits"},
		{`{"timestamp": 99999999999999999, "input_length": 1, "output_length": 1, "hash_ids": [1]}`, "past the limit"},
	} {
		_, err := workload.Read(strings.NewReader(good[:strings.Index(good, "\n")+1]+tc.line+"\n"), 0)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "line 2") {
			t.Errorf("%s: error %v, want one naming line 2 and %q", tc.line, err, tc.want)
		}
	}
}

func TestReadRealTrace(t *testing.T) {
	f, err := os.Open(tracePath)
	if err != nil {
		t.Skipf("trace not present: %v", err)
	}
	defer f.Close()
	recs, err := workload.Read(f, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 12031 {
		t.Errorf("%d records, want 12031", len(recs))
	}
}
