package main

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
)

// batchGC sets the collector up for a command that allocates fast over a
// small live heap (a simulation, a trace replay): instead of collecting
// each time the heap doubles (every few MB here; a quarter of a serving
// simulation went to it at the default target), the collector is off
// under a soft limit of batchHeap, so it runs about once per batchHeap of
// allocation. Should the live heap pass half the limit (a long run with a
// large trace), GOGC 400 comes back, so the limit never makes the
// collector run back to back. GOGC or GOMEMLIMIT set by the user wins.
func batchGC() {
	if os.Getenv("GOGC") != "" || os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(batchHeap)
	var watch func()
	watch = func() {
		// After each collection: a cleanup runs once its object is
		// collected, and each one arms the next.
		runtime.AddCleanup(new([64]byte), func(struct{}) {
			s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
			metrics.Read(s)
			if s[0].Value.Kind() == metrics.KindUint64 && s[0].Value.Uint64() > batchHeap/2 {
				// The chain ends here: this runs once.
				debug.SetGCPercent(400)
				debug.SetMemoryLimit(math.MaxInt64)
				return
			}
			watch()
		}, struct{}{})
	}
	watch()
}

// batchHeap is batchGC's soft limit: measured on a serving simulation
// (docs/benchmarks.md, "eighth session"), 64 MiB beat 128 and 256 (fresh
// memory each cycle costs page faults) and GOGC 400 and 1600.
const batchHeap = 64 << 20
