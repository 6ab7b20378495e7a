package planetest

import (
	"fmt"
	"testing"
	"time"
)

// Eventually polls cond every millisecond until it holds, failing the test
// after 20 s: the wait for something another goroutine or process does,
// without a sleep that guesses how long it takes.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	EventuallyWithin(t, 20*time.Second, what, cond)
}

// EventuallyWithin is Eventually with the caller's deadline, for waits whose
// bound is part of what the test checks (an expired lease's instance gone
// within one TTL) or that may rightly take longer than 20 s.
func EventuallyWithin(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	Poll(t, within, time.Millisecond, cond, func() string {
		return fmt.Sprintf("timed out after %s waiting for %s", within, what)
	})
}

// Poll is the loop under Eventually, for the waits it does not fit: on
// another process, where polling every millisecond only burns its CPU, and
// where the failure tells most with what was gathered until then (the
// process's output so far), so failure is called only when it is needed.
func Poll(t testing.TB, within, every time.Duration, cond func() bool, failure func() string) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(every) {
		if time.Now().After(deadline) {
			t.Fatal(failure())
		}
	}
}
