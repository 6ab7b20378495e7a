// Package crc32c computes the data plane's block checksums, CRC-32C
// (Castagnoli), and copies blocks while checksumming them.
//
// A transfer checksums every byte it moves, mostly bytes that are not in
// cache: a block of a large region, or one another core just wrote.
// hash/crc32 interleaves three CRC chains over short lanes (1,344 bytes)
// without reading ahead, and stalls on cache misses there (about half of
// what memory delivers on the machines we measured); checksumming after a
// copy reads the source a second time. On amd64 with SSE4.2 this package
// runs three CRC chains over the three 4 KiB lanes of each 12 KiB stripe
// while prefetching ahead in each, and Copy stores the bytes with
// non-temporal stores in the same pass that checksums them. The chains'
// CRCs are joined with the polynomial arithmetic below. Elsewhere, and for
// inputs shorter than a stripe, it is hash/crc32 (and copy).
package crc32c

import (
	"fmt"
	"hash/crc32"
	"sync"
	"unsafe"
)

// lane is the bytes one of the three streams covers per stripe: large
// enough that joining the streams' CRCs costs little against checksumming
// them, a multiple of 32 (the assembly's step) and of 16 (so a 16-byte
// aligned destination stays aligned in every stream).
const lane = 4096

// stripe is the bytes the fast path consumes per call.
const stripe = 3 * lane

// prefetchMin is the size from which ChecksumCold, on an input shorter
// than a stripe, first asks for all of its bytes: 4 KiB blocks that are
// not in cache are then checksummed 1.5-3.4x as fast; in cache the
// prefetch instructions cost 10-20%, so Checksum and Update skip them.
const prefetchMin = 1 << 10

// ntMin is the size from which Copy stores around the cache. Below it the
// destination would still fit in this core's cache, where a reader on
// the same core (or its neighbour, through the shared cache) finds it
// sooner than in memory; hot 64 KiB copies ran at a third of copy's speed
// with non-temporal stores.
const ntMin = 256 << 10

var table = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C of b.
func Checksum(b []byte) uint32 { return Update(0, b) }

// ChecksumCold is Checksum for bytes that are likely not in cache (a
// block of a large region, or one another core just wrote): a short input
// is asked for whole before it is checksummed.
func ChecksumCold(b []byte) uint32 {
	if fast && len(b) >= prefetchMin && len(b) < stripe {
		prefetch(&b[0], uintptr(len(b)))
	}
	return Update(0, b)
}

// Update returns crc (a CRC-32C result, 0 for none yet) extended by b, so
// that Update(Checksum(a), b) == Checksum(a followed by b).
func Update(crc uint32, b []byte) uint32 {
	if !fast || len(b) < stripe {
		return crc32.Update(crc, table, b)
	}
	// The streams run on the raw register: hash/crc32 inverts before and
	// after.
	raceRead(b)
	s := ^crc
	for len(b) >= stripe {
		a, m, c := sumStripe(&b[0], s)
		s = join(a, m, c)
		b = b[stripe:]
	}
	return crc32.Update(^s, table, b)
}

// Copy copies src into dst and returns the CRC-32C of src. It panics when
// dst is shorter than src. It is meant for a destination that another
// core or process reads next: from ntMin bytes up it reads the source
// from memory once, checksumming what it stores, and stores around this
// core's cache, as the runtime's copy does from 1 MiB up. Below that it
// is copy, then Checksum of the source (then in cache).
func Copy(dst, src []byte) uint32 {
	if len(dst) < len(src) {
		// Reslicing would only check the capacity, and write past len.
		panic(fmt.Sprintf("crc32c: Copy of %d bytes into %d", len(src), len(dst)))
	}
	dst = dst[:len(src)]
	if len(src) > 0 && overlap(dst, src) {
		// A copy into an overlapping destination changes the source:
		// checksum it first.
		crc := Checksum(src)
		copy(dst, src)
		return crc
	}
	if !fast || len(src) < ntMin {
		// The source is in cache after the copy, where the checksum then
		// reads it (6-12% faster than the other way round at 16-128 KiB).
		copy(dst, src)
		return Checksum(src)
	}
	raceRead(src)
	raceWrite(dst)
	// The vector stores need a 16-byte aligned destination: a few bytes
	// first, the ordinary way.
	head := int(-uintptrOf(dst) & 15)
	copy(dst[:head], src[:head])
	s := ^crc32.Update(0, table, src[:head])
	dst, src = dst[head:], src[head:]
	for len(src) >= stripe {
		a, m, c := copyStripe(&dst[0], &src[0], s)
		s = join(a, m, c)
		dst, src = dst[stripe:], src[stripe:]
	}
	storeFence()
	copy(dst, src)
	return crc32.Update(^s, table, src)
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// overlap reports whether a and b (both non-empty) share bytes.
func overlap(a, b []byte) bool {
	pa, pb := uintptrOf(a), uintptrOf(b)
	return pa < pb+uintptr(len(b)) && pb < pa+uintptr(len(a))
}

// join returns the raw CRC register after a whole stripe from the three
// streams' registers: a started from the register before the stripe, m and
// c from zero. The register is linear in its start and the data, so the
// CRC of a followed by lane bytes is a's register advanced over lane zero
// bytes (a multiplication by x^(8*lane) modulo the polynomial) xor the
// CRC of those bytes from zero.
func join(a, m, c uint32) uint32 {
	t := shiftTable()
	return shift(t, shift(t, a)^m) ^ c
}

// shift advances a raw register over lane zero bytes.
func shift(t *[4][256]uint32, s uint32) uint32 {
	return t[0][s&0xff] ^ t[1][s>>8&0xff] ^ t[2][s>>16&0xff] ^ t[3][s>>24]
}

// shiftTable holds the advance over lane zero bytes of each byte of a
// register in each position: the advance of a register is the xor of its
// four bytes' (linearity again). Built once, on first use, and never
// written after.
var shiftTable = sync.OnceValue(func() *[4][256]uint32 {
	x := xPow8n(lane)
	var t [4][256]uint32
	for k := range 4 {
		for i := range 256 {
			t[k][i] = mulMod(x, uint32(i)<<(8*k))
		}
	}
	return &t
})

// poly is CRC-32C's polynomial, bit-reversed as the register holds it:
// bit 31 is x^0.
const poly = 0x82f63b78

// mulMod returns a*b modulo poly, both in the register's reflected order.
func mulMod(a, b uint32) uint32 {
	var p uint32
	for m := uint32(1) << 31; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
		}
		// b *= x
		if b&1 != 0 {
			b = b>>1 ^ poly
		} else {
			b >>= 1
		}
	}
	return p
}

// xPow8n returns x^(8n) modulo poly: what advancing a register over n
// zero bytes multiplies it by.
func xPow8n(n int) uint32 {
	p := uint32(1) << 31  // x^0
	sq := uint32(1) << 30 // x^1, squared as the bits of 8n are walked
	for e := uint64(n) * 8; e != 0; e >>= 1 {
		if e&1 != 0 {
			p = mulMod(p, sq)
		}
		sq = mulMod(sq, sq)
	}
	return p
}
