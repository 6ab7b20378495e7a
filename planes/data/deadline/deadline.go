// Package deadline moves a connection's read or write deadline only when
// it must.
//
// Setting a deadline re-arms a runtime timer, and a timer earlier than
// the network poller's sleep wakes the poller. Set before every frame of
// a busy connection, that measured several microseconds of every small
// transfer's round trip (docs/benchmarks.md). A Lazy deadline instead
// stays between timeout and 9/8 of it ahead of the last Extend, and moves
// once per timeout/8 of steady traffic.
package deadline

import "time"

// Lazy is one direction of a connection's deadline. The zero value with
// Set filled in has no deadline. It is not safe for concurrent use: each
// Lazy belongs to the one goroutine, or the lock, that does that
// direction's I/O.
type Lazy struct {
	// Set is the connection's SetReadDeadline or SetWriteDeadline (nil:
	// a connection without deadlines, such as a fuzz test's reader).
	Set func(time.Time) error
	at  time.Time
}

// Extend makes the deadline no earlier than now+timeout. It never brings
// a deadline nearer: a timeout fires late by up to timeout/8, never early.
func (d *Lazy) Extend(now time.Time, timeout time.Duration) {
	if d.at.IsZero() || d.at.Sub(now) < timeout {
		d.at = now.Add(timeout + timeout/8)
		d.set(d.at)
	}
}

// Clear removes the deadline.
func (d *Lazy) Clear() {
	if !d.at.IsZero() {
		d.at = time.Time{}
		d.set(d.at)
	}
}

// Passed reports whether the deadline is set and not after now: a timeout
// seen by a reader is current, not one from before another goroutine
// extended the deadline.
func (d *Lazy) Passed(now time.Time) bool { return !d.at.IsZero() && !now.Before(d.at) }

func (d *Lazy) set(t time.Time) {
	if d.Set != nil {
		d.Set(t) // only fails on a closed connection, which the I/O reports
	}
}
