package control

import "time"

// startBackoff spaces the retries of actors that failed to start: each
// failure in a row doubles the wait (from 1 s up to a minute), so an actor
// whose journal cannot be replayed is not replayed again every second.
// Entries go when the actor starts or is no longer wanted.
type startBackoff[K comparable] struct {
	next  map[K]time.Time
	fails map[K]int
}

func newStartBackoff[K comparable]() *startBackoff[K] {
	return &startBackoff[K]{next: map[K]time.Time{}, fails: map[K]int{}}
}

// due reports whether k may be tried at now.
func (b *startBackoff[K]) due(k K, now time.Time) bool { return !now.Before(b.next[k]) }

// failed notes a failed try at now and returns the wait before the next.
func (b *startBackoff[K]) failed(k K, now time.Time) time.Duration {
	b.fails[k]++
	wait := min(time.Second<<min(b.fails[k]-1, 6), time.Minute)
	b.next[k] = now.Add(wait)
	return wait
}

// forget drops k (started, or no longer wanted).
func (b *startBackoff[K]) forget(k K) {
	delete(b.next, k)
	delete(b.fails, k)
}

// keep drops every entry want does not hold.
func (b *startBackoff[K]) keep(want map[K]bool) {
	for k := range b.fails {
		if !want[k] {
			b.forget(k)
		}
	}
}
