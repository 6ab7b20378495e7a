package sim

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"time"
)

// World is the simulator's universe: a virtual clock, one seeded random
// source and a single-threaded scheduler of timed events. Nothing in a run
// depends on wall time, goroutine scheduling or map order, so a seed
// reproduces a run exactly; the trace hash proves it.
type World struct {
	seed  uint64
	rng   *rand.Rand
	now   time.Duration // since Epoch
	queue eventQueue
	seq   uint64

	traceHash uint64
	trace     []string
	// TraceLimit bounds the trace lines kept (the hash covers all of them);
	// default 10,000.
	TraceLimit int
	steps      uint64
}

type event struct {
	at  time.Duration // since Epoch
	seq uint64        // ties broken by scheduling order
	fn  func()
}

func (a *event) before(b *event) bool {
	return a.at < b.at || (a.at == b.at && a.seq < b.seq)
}

// eventQueue is a binary min-heap of events held by value: the scheduler
// runs millions of them, and container/heap's interface boxing and a
// pointer per event were a tenth of a serving run's time.
type eventQueue []event

func (q *eventQueue) push(e event) {
	*q = append(*q, e)
	h := *q
	i := len(h) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !h[i].before(&h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (q *eventQueue) pop() event {
	h := *q
	top := h[0]
	n := len(h) - 1
	h[0] = h[n]
	h[n] = event{} // drop the closure for the collector
	h = h[:n]
	for i := 0; ; {
		l := 2*i + 1
		if l >= n {
			break
		}
		c := l
		if r := l + 1; r < n && h[r].before(&h[l]) {
			c = r
		}
		if !h[c].before(&h[i]) {
			break
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
	*q = h
	return top
}

// NewWorld creates a world whose every choice derives from seed.
func NewWorld(seed uint64) *World {
	return &World{seed: seed, rng: rand.New(rand.NewPCG(seed, 0x7269706c616e65)), traceHash: 14695981039346656037, TraceLimit: 10_000}
}

// Seed of the world.
func (w *World) Seed() uint64 { return w.seed }

// Now is the virtual time.
func (w *World) Now() time.Time { return Epoch.Add(w.now) }

// Elapsed is the virtual time since the start.
func (w *World) Elapsed() time.Duration { return w.now }

// Rand is the world's single random source.
func (w *World) Rand() *rand.Rand { return w.rng }

// Chance reports true with probability p.
func (w *World) Chance(p float64) bool { return p > 0 && w.rng.Float64() < p }

// After runs fn after d of virtual time.
func (w *World) After(d time.Duration, fn func()) {
	if d < 0 {
		d = 0
	}
	at := addSat(w.now, d) // past the end of time: never runs, and the clock cannot wrap
	w.seq++
	w.queue.push(event{at: at, seq: w.seq, fn: fn})
}

// Pending is the number of scheduled events.
func (w *World) Pending() int { return len(w.queue) }

// Steps is the number of events run so far.
func (w *World) Steps() uint64 { return w.steps }

// RunFor runs events until d of virtual time has passed or none are left.
func (w *World) RunFor(d time.Duration) {
	w.RunUntil(Epoch.Add(addSat(w.now, d)))
}

// addSat adds without wrapping past the end of time.
func addSat(a, b time.Duration) time.Duration {
	if s := a + b; b < 0 || s >= a {
		return s
	}
	return math.MaxInt64
}

// RunUntil runs events up to time t; the clock ends at t.
func (w *World) RunUntil(t time.Time) {
	end := t.Sub(Epoch)
	for len(w.queue) > 0 && w.queue[0].at <= end {
		e := w.queue.pop()
		w.now = e.at
		w.steps++
		e.fn()
	}
	if w.now < end {
		w.now = end
	}
}

// RunQuiet runs until no events are left or limit of virtual time passed,
// and reports whether the world went quiet.
func (w *World) RunQuiet(limit time.Duration) bool {
	end := addSat(w.now, limit)
	for len(w.queue) > 0 && w.queue[0].at <= end {
		e := w.queue.pop()
		w.now = e.at
		w.steps++
		e.fn()
	}
	return len(w.queue) == 0
}

// Tracef records a line in the trace, stamped with the virtual time.
func (w *World) Tracef(format string, args ...any) {
	line := fmt.Sprintf("%12s ", w.Elapsed().Round(time.Microsecond)) + fmt.Sprintf(format, args...)
	h := fnv.New64a()
	var b [8]byte
	for i := range 8 {
		b[i] = byte(w.traceHash >> (8 * i))
	}
	h.Write(b[:])
	h.Write([]byte(line))
	w.traceHash = h.Sum64()
	if len(w.trace) < w.TraceLimit {
		w.trace = append(w.trace, line)
	}
}

// TraceHash covers every traced line in order: two runs with the same
// seed must give the same hash.
func (w *World) TraceHash() uint64 { return w.traceHash }

// Trace returns the kept trace lines.
func (w *World) Trace() []string { return w.trace }
