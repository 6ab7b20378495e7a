package sim

import "fmt"

// Problems collects the invariant violations a scenario sees while its
// run goes on. Each is traced when it happens and keeps the virtual time
// it happened at: the failure then names the moment the invariant broke,
// not the end of the run, where the scenario's final check reports it.
type Problems struct {
	w    *World
	errs []error
}

// NewProblems collects the violations of a run in w.
func NewProblems(w *World) *Problems { return &Problems{w: w} }

// Add records a violation, now.
func (p *Problems) Add(err error) {
	err = fmt.Errorf("%w (at %s)", err, p.w.Elapsed())
	p.w.Tracef("VIOLATION: %v", err)
	p.errs = append(p.errs, err)
}

// Err is the first violation, saying how many followed; nil without any.
func (p *Problems) Err() error {
	switch len(p.errs) {
	case 0:
		return nil
	case 1:
		return p.errs[0]
	}
	return fmt.Errorf("%w (and %d more)", p.errs[0], len(p.errs)-1)
}
