// Package engine is the interface between a worker and the inference engine
// it fronts. The default engine is the mock engine (engine/mocker): real KV
// block bookkeeping and a timing model, no GPU. A real engine can be fronted
// later behind the same interface.
//
// An engine is a deterministic state machine driven by its worker: Add and
// Cancel change the queue, Step runs one iteration and says how long that
// iteration takes; the worker (or the simulator) lets that much time pass.
package engine

import (
	"errors"
	"fmt"
	"time"
)

// Request is one generation request.
type Request struct {
	ID string
	// Tokens is the prompt. A migrated request carries the tokens generated
	// so far appended to its prompt, and MaxTokens reduced by their number.
	Tokens    []uint32
	MaxTokens int
}

// Output is what one request produced in one step.
type Output struct {
	ID       string
	Tokens   []uint32
	Finished bool
	// Reason is set when Finished: "length" (MaxTokens reached),
	// "cancelled", or "error" with Err.
	Reason string
	Err    error
	// CachedTokens is how many prompt tokens were found in the prefix cache
	// when the request was first admitted (blocks imported for it
	// included: they need no prefill here), on the step that produced
	// the first token.
	CachedTokens int
}

// KVEventKind is the kind of a KV cache event.
type KVEventKind int

// The KV event kinds.
const (
	KVStored KVEventKind = iota + 1
	KVRemoved
	KVCleared
)

func (k KVEventKind) String() string {
	switch k {
	case KVStored:
		return "stored"
	case KVRemoved:
		return "removed"
	case KVCleared:
		return "cleared"
	}
	return "unknown"
}

// KVEvent announces a change of the engine's KV cache. IDs increase by one
// per event, so a consumer can detect gaps.
type KVEvent struct {
	ID   uint64
	Kind KVEventKind
	// Stored: the block's chained hash and its parent's (0 for the first
	// block of a sequence). Removed: the hash.
	Hash, Parent uint64
}

// Step is the result of one engine iteration.
type Step struct {
	// Duration is how long the iteration takes on the modelled hardware.
	Duration time.Duration
	// Outputs (with their Tokens) are valid until the engine's next step
	// (Step, or a mock engine's StepQuiet): the engine reuses their
	// memory, so keep a copy of what must last.
	Outputs []Output
	Events  []KVEvent
	// PrefillTokens and DecodeSeqs describe the batch, for metrics.
	PrefillTokens int
	DecodeSeqs    int
}

// Load is the engine's load, reported to routers.
type Load struct {
	Active, Waiting         int
	BlocksUsed, BlocksTotal int
	// HitRate is the share of prompt tokens found in the prefix cache:
	// each request's prompt counted once, at its first admission (a
	// preempted request coming back is not counted again), and blocks
	// imported for a request from a prefill worker not counted as found
	// by the request that takes them first (they were computed for it
	// elsewhere; later requests reusing them hit).
	HitRate float64
}

// Errors of Add.
var (
	ErrQueueFull  = errors.New("engine: waiting queue full")
	ErrBadRequest = errors.New("engine: bad request")
	// ErrTooLarge is a bad request for this engine that another, larger
	// one may take (the prompt does not fit its KV pool); it wraps
	// ErrBadRequest.
	ErrTooLarge = fmt.Errorf("%w: too large for this engine", ErrBadRequest)
)

// Engine runs requests.
type Engine interface {
	Add(Request) error
	Cancel(id string) bool
	// Step runs one iteration. With nothing to do it returns a zero Step.
	Step() Step
	Idle() bool
	Load() Load
}
