package replay

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"
)

func TestTerminalProgressOnlyOnTerminals(t *testing.T) {
	if p := TerminalProgress(&bytes.Buffer{}); p != nil {
		t.Errorf("a buffer got a progress bar")
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if p := TerminalProgress(w); p != nil {
		t.Errorf("a pipe got a progress bar")
	}
}

func TestBar(t *testing.T) {
	// Shown at once (no delay), then cleared by End.
	var buf bytes.Buffer
	b := NewBar(&buf)
	b.Delay = 0
	b.Begin("verifying 3 actors", 10)
	b.Add(4)
	b.Add(6)
	b.End()
	if out := buf.String(); !strings.Contains(out, "verifying 3 actors") {
		t.Errorf("bar output %q", out)
	}

	// A replay that ends before the delay draws nothing.
	buf.Reset()
	b = NewBar(&buf)
	b.Delay = time.Hour
	b.Begin("quick", 10)
	b.Add(10)
	b.End()
	if buf.Len() != 0 {
		t.Errorf("a quick replay drew %q", buf.String())
	}
}
