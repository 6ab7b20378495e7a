package eventbench

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
)

// TestRunSmall runs every part of the benchmark at a tiny size: it checks
// that each completes and reports its baseline, not any speed.
func TestRunSmall(t *testing.T) {
	r, err := Run(context.Background(), Config{Messages: 500, PayloadSize: 16, Requests: 20, Jobs: 200, KvEvents: 300, Rounds: 1, Dir: t.TempDir()}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	r.Print(&out, "small")
	for _, want := range []string{nameTyped, nameRawProto, nameTypedWQ, nameKvCore, nameKvLossy, nameKvJS, "typed event.Request"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	for _, l := range r.Rates {
		if l.Baseline != "" && l.Ratio <= 0 {
			t.Errorf("%s has no ratio to %s", l.Name, l.Baseline)
		}
	}
}
