package crc32c

import (
	"fmt"
	"hash/crc32"
	"testing"
	"time"
)

// Each benchmark times this package and its baselines over the same
// amount of bytes in the same run, alternating, and reports the ratio of
// throughputs (x-of-NAME: above 1 is faster than NAME); GB/s is this
// package's own. "cold" walks a
// 256 MiB buffer, far larger than any cache, as a transfer walks its
// regions; "hot" repeats one block that stays in cache. Each baseline
// reads bytes of its own, so none finds another's in cache.

const coldSpan = 256 << 20

var sink uint32

type baseline struct {
	name string
	run  func(off int)
}

func compare(b *testing.B, block, span int, ours func(off int), bases ...baseline) {
	var tOurs time.Duration
	n := 0
	tBase := make([]time.Duration, len(bases))
	off := 0
	for b.Loop() {
		t := time.Now()
		ours(off)
		tOurs += time.Since(t)
		for i, base := range bases {
			t = time.Now()
			base.run(off)
			tBase[i] += time.Since(t)
		}
		off = (off + block) % span
		n++
	}
	// ns/op counts the baselines too: the package's own speed is GB/s.
	b.ReportMetric(float64(n*block)/float64(tOurs), "GB/s")
	for i, base := range bases {
		b.ReportMetric(float64(tBase[i])/float64(tOurs), "x-of-"+base.name)
	}
}

type shape struct {
	name        string
	block, span int
}

func shapes(sizes ...int) []shape {
	var s []shape
	for _, n := range sizes {
		s = append(s, shape{fmt.Sprintf("cold/%dKiB", n>>10), n, coldSpan})
	}
	for _, n := range sizes {
		s = append(s, shape{fmt.Sprintf("hot/%dKiB", n>>10), n, n})
	}
	return s
}

func BenchmarkChecksum(b *testing.B) {
	for _, c := range shapes(4<<10, 64<<10, 1<<20) {
		b.Run(c.name, func(b *testing.B) {
			buf, other, third := filled(c.span, 9), filled(c.span, 10), filled(c.span, 11)
			// From memory a sender checksums with ChecksumCold; from
			// cache a receiver with Checksum. The other one runs as a
			// baseline too: what the prefetch gains in one case and
			// costs in the other.
			sum, alt, altName := Checksum, ChecksumCold, "ChecksumCold"
			if c.span > c.block {
				sum, alt, altName = ChecksumCold, Checksum, "Checksum"
			}
			compare(b, c.block, c.span,
				func(off int) { sink = sum(buf[off : off+c.block]) },
				baseline{"hash-crc32", func(off int) { sink = crc32.Checksum(other[off:off+c.block], table) }},
				baseline{altName, func(off int) { sink = alt(third[off : off+c.block]) }})
		})
	}
}

// BenchmarkCopy: Copy against copy followed by hash/crc32 (what it
// replaces), and against copy alone (the bound: memory moved, nothing
// checksummed).
func BenchmarkCopy(b *testing.B) {
	for _, c := range shapes(64<<10, 1<<20, 16<<20) {
		if c.span == c.block && c.block > 1<<20 {
			continue // not hot: larger than the cache
		}
		b.Run(c.name, func(b *testing.B) {
			// Destinations written once before: no run pays for faulting
			// their pages in.
			src, dst := filled(c.span, 11), filled(c.span, 14)
			src2, dst2 := filled(c.span, 12), filled(c.span, 15)
			src3, dst3 := filled(c.span, 13), filled(c.span, 16)
			compare(b, c.block, c.span,
				func(off int) { sink = Copy(dst[off:off+c.block], src[off:off+c.block]) },
				baseline{"copy-then-crc32", func(off int) {
					copy(dst2[off:off+c.block], src2[off:off+c.block])
					sink = crc32.Checksum(src2[off:off+c.block], table)
				}},
				baseline{"copy", func(off int) { copy(dst3[off:off+c.block], src3[off:off+c.block]) }})
		})
	}
}
