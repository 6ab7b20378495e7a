package deadline

import (
	"testing"
	"time"
)

func TestLazyMovesOnlyWhenNeeded(t *testing.T) {
	var sets []time.Time
	d := Lazy{Set: func(at time.Time) error { sets = append(sets, at); return nil }}
	t0 := time.Unix(1000, 0)
	const timeout = 8 * time.Second

	d.Extend(t0, timeout)
	if len(sets) != 1 || !sets[0].Equal(t0.Add(9*time.Second)) {
		t.Fatalf("first Extend set %v, want one deadline at t0+9s", sets)
	}
	// Within the slack: the deadline is still at least timeout ahead.
	d.Extend(t0.Add(time.Second), timeout)
	if len(sets) != 1 {
		t.Fatalf("an Extend within the slack moved the deadline: %v", sets)
	}
	// Past it: less than timeout ahead, so it moves.
	d.Extend(t0.Add(time.Second+time.Nanosecond), timeout)
	if len(sets) != 2 || !sets[1].Equal(t0.Add(10*time.Second+time.Nanosecond)) {
		t.Fatalf("an Extend past the slack set %v", sets)
	}
	// A shorter timeout never brings the deadline nearer.
	d.Extend(t0.Add(2*time.Second), time.Second)
	if len(sets) != 2 {
		t.Fatalf("a shorter timeout moved the deadline nearer: %v", sets)
	}
	if d.Passed(t0.Add(10*time.Second)) || !d.Passed(t0.Add(10*time.Second+time.Nanosecond)) {
		t.Fatal("Passed is wrong on either side of the deadline")
	}
	d.Clear()
	d.Clear()
	if len(sets) != 3 || !sets[2].IsZero() || d.Passed(t0.Add(time.Hour)) {
		t.Fatalf("Clear: sets %v, passed %v", sets, d.Passed(t0.Add(time.Hour)))
	}
	// After Clear the next Extend sets again.
	d.Extend(t0, timeout)
	if len(sets) != 4 {
		t.Fatalf("Extend after Clear did not set: %v", sets)
	}
}

func TestLazyWithoutConnection(t *testing.T) {
	var d Lazy // no Set: must not panic
	d.Extend(time.Now(), time.Second)
	d.Clear()
}
