package sim

import (
	"fmt"
	"strings"
	"testing"
)

// Past MaxTraceLines the cut line names no --trace-lines that keeps the
// whole trace, but the most there is (a trace that long is not traced
// here: the count is set).
func TestTraceCutBeyondTheLargestLimit(t *testing.T) {
	w := NewWorld(1)
	w.TraceLimit = 1
	w.Tracef("kept")
	w.Tracef("dropped")
	if tr := w.Trace(); len(tr) != 2 || !strings.HasSuffix(tr[1], "1 more were not kept (the trace hash covers them); triplane sim --trace-lines 2 (Options.TraceLines) keeps them all") {
		t.Fatalf("within the largest limit: %q", tr)
	}
	w.dropped = MaxTraceLines
	want := fmt.Sprintf("%d more were not kept (the trace hash covers them); at most %d lines can be kept (triplane sim --trace-lines, Options.TraceLines)", MaxTraceLines, MaxTraceLines)
	if tr := w.Trace(); len(tr) != 2 || !strings.HasSuffix(tr[1], want) {
		t.Fatalf("beyond it: %q, want the last line to end %q", tr, want)
	}
}
