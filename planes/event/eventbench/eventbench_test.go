package eventbench

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
)

// TestRunSmall runs every part of the benchmark at a tiny size: it checks
// that each completes and reports its baseline, not any speed.
func TestRunSmall(t *testing.T) {
	// The servers' warnings go to the test's log: a CI run once failed
	// with JetStream's bare "error creating store for stream", and the
	// server's own line says why.
	logger := slog.New(slog.NewTextHandler(newTestLog(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	r, err := Run(context.Background(), Config{Messages: 500, PayloadSize: 16, Requests: 20, Jobs: 200, KvEvents: 300, Rounds: 1, Dir: t.TempDir(), Logger: logger}, io.Discard)
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

// testLog writes log lines to t.Log until the test ends (a server
// goroutine logging after that would panic the test binary).
type testLog struct {
	t    *testing.T
	done *atomic.Bool
}

func newTestLog(t *testing.T) testLog {
	w := testLog{t: t, done: &atomic.Bool{}}
	t.Cleanup(func() { w.done.Store(true) })
	return w
}

func (w testLog) Write(b []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimSuffix(string(b), "\n"))
	}
	return len(b), nil
}
