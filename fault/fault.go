// Package fault holds fault points, in the spirit of FoundationDB's
// BUGGIFY: places in real code where a run under the simulator may take a
// rare but legal path on purpose (a slow engine iteration, a resend answered
// with a dump, a buffer that counts as full), so the paths that production
// seldom takes are exercised by every sweep.
//
// A point never changes what is correct, only which correct path is taken.
// Production code passes a nil Points and no point ever fires.
package fault

// Points decides at a named point whether to take the rare path now.
// Implementations must be deterministic for the simulator's sake: the
// simulator's draws from its seeded random source.
type Points interface {
	Fire(point string) bool
}

// Fire reports whether p fires point now; a nil p never does.
func Fire(p Points, point string) bool { return p != nil && p.Fire(point) }
