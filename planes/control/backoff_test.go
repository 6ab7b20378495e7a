package control

import (
	"testing"
	"time"
)

func TestStartBackoff(t *testing.T) {
	b := newStartBackoff[string]()
	t0 := time.Unix(1000, 0)
	if !b.due("a", t0) {
		t.Fatal("an actor never tried is not due")
	}
	var waits []time.Duration
	now := t0
	for range 8 {
		w := b.failed("a", now)
		if b.due("a", now.Add(w-time.Nanosecond)) || !b.due("a", now.Add(w)) {
			t.Fatalf("due before or not after its wait %s", w)
		}
		waits = append(waits, w)
		now = now.Add(w)
	}
	want := []time.Duration{1, 2, 4, 8, 16, 32, 60, 60}
	for i, w := range waits {
		if w != want[i]*time.Second {
			t.Fatalf("waits %v, want %v seconds", waits, want)
		}
	}
	// Another actor is not held back; a start or a change of plan forgets.
	if !b.due("b", t0) {
		t.Fatal("a failing actor held another back")
	}
	b.failed("b", t0)
	b.keep(map[string]bool{"a": true})
	if !b.due("b", t0) {
		t.Fatal("an actor no longer wanted kept its backoff")
	}
	b.forget("a")
	if !b.due("a", t0) || b.failed("a", t0) != time.Second {
		t.Fatal("a started actor kept its backoff")
	}
}
