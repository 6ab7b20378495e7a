package sim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
	"unicode/utf8"
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
	// The kept trace lines, one after the other in text (no pointers for
	// the collector, no allocation per line); lines end at ends. A line is
	// built at text's end and dropped again past TraceLimit.
	text []byte
	ends []int
	// TraceLimit bounds the trace lines kept (the hash covers all of them);
	// default DefaultTraceLines.
	TraceLimit int
	// dropped counts the lines past TraceLimit, so Trace can say the cut
	// is there: a trace that just ends looks like a run that stopped.
	dropped int
	// droppedDetail counts the detail lines among dropped: the hash does
	// not cover those.
	droppedDetail int
	steps         uint64
	// Detail switches on Detailf's lines: what a scenario's requests and
	// repairs did, for a person reading a failing run's trace.
	Detail bool
}

type event struct {
	at   time.Duration // since Epoch
	seq  uint64        // ties broken by scheduling order
	slot uint32        // of the event's function in eventQueue.fns
}

func (a *event) before(b *event) bool {
	return a.at < b.at || (a.at == b.at && a.seq < b.seq)
}

// eventQueue is a binary min-heap of events held by value: the scheduler
// runs millions of them, and container/heap's interface boxing and a
// pointer per event were a tenth of a serving run's time. The heap holds
// no pointers (the functions wait in slots beside it), so moving events
// costs no write barriers and the collector does not scan it.
type eventQueue struct {
	heap []event
	fns  []eventFn // by slot; zero when free
	free []uint32  // free slots
}

// eventFn is what an event runs: fn, or call with arg (a handler made once
// and its argument: no closure to allocate per event).
type eventFn struct {
	fn   func()
	call func(any)
	arg  any
}

func (f *eventFn) run() {
	if f.fn != nil {
		f.fn()
		return
	}
	f.call(f.arg)
}

func (q *eventQueue) len() int { return len(q.heap) }

func (q *eventQueue) push(at time.Duration, seq uint64, fn eventFn) {
	var slot uint32
	if n := len(q.free); n > 0 {
		slot = q.free[n-1]
		q.free = q.free[:n-1]
		q.fns[slot] = fn
	} else {
		slot = uint32(len(q.fns))
		q.fns = append(q.fns, fn)
	}
	e := event{at: at, seq: seq, slot: slot}
	q.heap = append(q.heap, e)
	h := q.heap
	i := len(h) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !e.before(&h[p]) {
			break
		}
		h[i] = h[p]
		i = p
	}
	h[i] = e
}

// pop removes the earliest event and returns its time and function.
func (q *eventQueue) pop() (time.Duration, eventFn) {
	h := q.heap
	top := h[0]
	n := len(h) - 1
	last := h[n]
	h = h[:n]
	if n > 0 {
		i := 0
		for {
			c := 2*i + 1
			if c >= n {
				break
			}
			if r := c + 1; r < n && h[r].before(&h[c]) {
				c = r
			}
			if !h[c].before(&last) {
				break
			}
			h[i] = h[c]
			i = c
		}
		h[i] = last
	}
	q.heap = h
	fn := q.fns[top.slot]
	q.fns[top.slot] = eventFn{} // for the collector
	q.free = append(q.free, top.slot)
	return top.at, fn
}

// NewWorld creates a world whose every choice derives from seed.
func NewWorld(seed uint64) *World {
	return &World{seed: seed, rng: rand.New(rand.NewPCG(seed, 0x7269706c616e65)), traceHash: 14695981039346656037, TraceLimit: DefaultTraceLines}
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

// Between returns a duration drawn uniformly from lo..hi (lo when hi is
// not above it): the delays of the simulated planes.
func (w *World) Between(lo, hi time.Duration) time.Duration {
	if span := int64(hi - lo); span > 0 {
		return lo + time.Duration(w.rng.Int64N(span+1))
	}
	return lo
}

// outage is when a fault that lasts a while ends: a partition, an
// election. Overlapping ones end with the later.
type outage struct{ end time.Time }

// extend makes the outage last at least until now+d.
func (o *outage) extend(now time.Time, d time.Duration) {
	if end := now.Add(d); end.After(o.end) {
		o.end = end
	}
}

// on reports whether the outage lasts at now.
func (o outage) on(now time.Time) bool { return now.Before(o.end) }

// After runs fn after d of virtual time.
func (w *World) After(d time.Duration, fn func()) { w.after(d, eventFn{fn: fn}) }

func (w *World) after(d time.Duration, e eventFn) {
	if d < 0 {
		d = 0
	}
	at := addSat(w.now, d) // past the end of time: never runs, and the clock cannot wrap
	w.seq++
	w.queue.push(at, w.seq, e)
}

// reserve sets aside n scheduling positions for events that will be
// scheduled later (at): they run in the order they would have had if
// scheduled now, ties included, without waiting in the queue meanwhile.
// It returns the first.
func (w *World) reserve(n int) uint64 {
	first := w.seq + 1
	w.seq += uint64(n)
	return first
}

// at runs fn at virtual time t (since Epoch, not before now) in the
// scheduling position seq from reserve.
func (w *World) at(t time.Duration, seq uint64, fn func()) {
	w.queue.push(max(t, w.now), seq, eventFn{fn: fn})
}

// afterCall runs call(arg) after d of virtual time, as After does.
func (w *World) afterCall(d time.Duration, call func(any), arg any) {
	w.after(d, eventFn{call: call, arg: arg})
}

// Pending is the number of scheduled events.
func (w *World) Pending() int { return w.queue.len() }

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
	for w.queue.len() > 0 && w.queue.heap[0].at <= end {
		at, fn := w.queue.pop()
		w.now = at
		w.steps++
		fn.run()
	}
	if w.now < end {
		w.now = end
	}
}

// RunQuiet runs until no events are left or limit of virtual time passed,
// and reports whether the world went quiet.
func (w *World) RunQuiet(limit time.Duration) bool {
	end := addSat(w.now, limit)
	for w.queue.len() > 0 && w.queue.heap[0].at <= end {
		at, fn := w.queue.pop()
		w.now = at
		w.steps++
		fn.run()
	}
	return w.queue.len() == 0
}

// Tracef records a line in the trace, stamped with the virtual time.
func (w *World) Tracef(format string, args ...any) {
	w.traceLine(fmt.Appendf(w.traceStamp(), format, args...))
}

// traceStamp starts a trace line: the virtual time, right-aligned in 12
// columns, and a space (what "%12s " printed). The line is built at the end
// of the kept text; traceLine ends it, and nothing may trace in between.
func (w *World) traceStamp() []byte {
	b := w.text
	d := w.Elapsed().Round(time.Microsecond).String()
	for range 12 - utf8.RuneCountInString(d) { // %12s counts runes: µs
		b = append(b, ' ')
	}
	b = append(append(b, d...), ' ')
	return b
}

// traceLine ends a line begun by traceStamp: it goes into the trace hash
// (FNV-1a over the previous hash's 8 bytes, little-endian, then the line)
// and is kept while under the limit.
func (w *World) traceLine(text []byte) {
	start := len(w.text)
	line := text[start:]
	const prime = 1099511628211
	h := uint64(14695981039346656037)
	for i := range 8 {
		h = (h ^ uint64(byte(w.traceHash>>(8*i)))) * prime
	}
	for _, c := range line {
		h = (h ^ uint64(c)) * prime
	}
	w.traceHash = h
	w.keep(text, start)
}

// keep ends a line built at the kept text's end from start: kept while
// under TraceLimit, else dropped and counted. It reports whether it kept it.
func (w *World) keep(text []byte, start int) bool {
	if len(w.ends) < w.TraceLimit {
		w.text = text
		w.ends = append(w.ends, len(text))
		return true
	}
	w.dropped++
	w.text = text[:start]
	return false
}

// Detailf traces a detail line when Detail is on: kept in the trace (and
// counted against TraceLimit), marked with a middle dot after the time, but
// not in the hash, so a seed has the same hash with or without detail and a
// failing run can be rerun with it. Callers building costly arguments
// check Detail first: the scenarios run millions of these points.
func (w *World) Detailf(format string, args ...any) {
	if !w.Detail {
		return
	}
	if !w.keep(fmt.Appendf(append(w.traceStamp(), "· "...), format, args...), len(w.text)) {
		w.droppedDetail++
	}
}

// TraceHash covers every traced line in order (Detailf's excepted): two
// runs with the same seed must give the same hash.
func (w *World) TraceHash() uint64 { return w.traceHash }

// TraceDropped is the number of traced lines past TraceLimit: in the
// hash, not in Trace.
func (w *World) TraceDropped() int { return w.dropped }

// Trace returns the kept trace lines. When TraceLimit cut the trace, a
// last line (not in the hash) says how many lines were not kept and how to
// keep them.
func (w *World) Trace() []string {
	text := string(w.text)
	out := make([]string, len(w.ends), len(w.ends)+1)
	start := 0
	for i, end := range w.ends {
		out[i], start = text[start:end], end
	}
	if w.dropped > 0 {
		out = append(out, w.cutLine())
	}
	return out
}

// cutLine is the trace's last line when TraceLimit cut it.
func (w *World) cutLine() string {
	total := len(w.ends) + w.dropped
	keep := fmt.Sprintf("triplane sim --trace-lines %d (Options.TraceLines) keeps them all", total)
	if total > MaxTraceLines {
		keep = fmt.Sprintf("at most %d lines can be kept (triplane sim --trace-lines, Options.TraceLines)", MaxTraceLines)
	}
	covers := "the trace hash covers them"
	if w.droppedDetail > 0 {
		covers = fmt.Sprintf("the trace hash covers them but the %d detail lines", w.droppedDetail)
	}
	return fmt.Sprintf("... trace cut after %d lines: %d more were not kept (%s); %s", len(w.ends), w.dropped, covers, keep)
}
