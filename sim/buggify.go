package sim

import (
	"maps"
	"slices"

	"github.com/triplane-dev/triplane/fault"
)

// Buggify is the simulator's fault.Points: the fault points inside real
// code (mocker.FaultPoints, kvevents.FaultPoints) fire in a run that sets
// Options.Buggify. As in FoundationDB, each point is switched on for the
// whole run with probability Enable the first time the run reaches it, and
// a switched-on point fires with probability Rate each time it is reached;
// both draws come from the world's seeded source, so a seed reproduces
// which points fired and when.
type Buggify struct {
	w *World
	// Enable is the chance that a point is on for the run (default 0.25);
	// Rate the chance that an on point fires when reached (default 0.05).
	Enable, Rate float64
	on           map[string]bool
	fired        map[string]uint64
}

// NewBuggify creates the fault points of a run in w.
func NewBuggify(w *World) *Buggify {
	return &Buggify{w: w, Enable: 0.25, Rate: 0.05, on: map[string]bool{}, fired: map[string]uint64{}}
}

// Fire implements fault.Points.
func (b *Buggify) Fire(point string) bool {
	if b == nil {
		return false
	}
	on, seen := b.on[point]
	if !seen {
		on = b.w.Chance(b.Enable)
		b.on[point] = on
		if on {
			b.w.Tracef("buggify: %s is on for this run", point)
		}
	}
	if !on || !b.w.Chance(b.Rate) {
		return false
	}
	if b.fired[point] == 0 {
		b.w.Tracef("buggify: %s fires for the first time", point)
	}
	b.fired[point]++
	return true
}

// Fired counts how often each point fired.
func (b *Buggify) Fired() map[string]uint64 { return maps.Clone(b.fired) }

// Faults is the run's fault points for real code: nil (nothing fires)
// unless the run buggifies.
func (r *Run) Faults() fault.Points {
	if r.Points == nil {
		return nil
	}
	return r.Points
}

// On lists the points switched on in this run, sorted.
func (b *Buggify) On() []string {
	var out []string
	for p, on := range b.on {
		if on {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}
