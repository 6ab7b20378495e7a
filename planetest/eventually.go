package planetest

import (
	"testing"
	"time"
)

// Eventually polls cond every millisecond until it holds, failing the test
// after 20 s: the wait for something another goroutine or process does,
// without a sleep that guesses how long it takes.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
