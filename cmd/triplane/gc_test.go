package main

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/planetest"
)

// batchGC turns the collector off under its soft limit, and brings GOGC
// 400 back once the live heap passes half the limit, so a large live heap
// never makes the collector run back to back.
func TestBatchGCFallsBackOnALargeLiveHeap(t *testing.T) {
	if os.Getenv("GOMEMLIMIT") != "" {
		t.Skip("GOMEMLIMIT set: batchGC leaves the collector alone")
	}
	t.Setenv("GOGC", "") // TestMain sets it for the other tests
	// The runtime's defaults afterwards, whatever this test leaves.
	defer debug.SetGCPercent(100)
	defer debug.SetMemoryLimit(math.MaxInt64)
	batchGC()
	read := func(name string) int64 {
		s := []metrics.Sample{{Name: name}}
		metrics.Read(s)
		return int64(s[0].Value.Uint64()) // GOGC off reads as -1
	}
	// Read, not set and restored: the fallback may set it meanwhile.
	percent := func() int64 { return read("/gc/gogc:percent") }
	if p, l := percent(), read("/gc/gomemlimit:bytes"); p != -1 || l != batchHeap {
		t.Fatalf("after batchGC: GOGC %d, limit %d; want off under %d", p, l, batchHeap)
	}
	live := make([][]byte, 0, 48)
	for range cap(live) {
		live = append(live, make([]byte, 1<<20)) // 48 MiB live, past half the limit
	}
	planetest.Poll(t, 10*time.Second, time.Millisecond, func() bool {
		if percent() == 400 {
			return true
		}
		runtime.GC() // the cleanup that checks runs after a collection
		return false
	}, func() string { return fmt.Sprintf("GOGC still %d with %d MiB live", percent(), len(live)) })
	runtime.KeepAlive(live)
}
