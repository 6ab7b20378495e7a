package crc32c

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

var want = crc32.MakeTable(crc32.Castagnoli)

// lengths around every boundary of the fast path: below a stripe, at it,
// with the alignment head, several stripes and a tail.
var lengths = []int{0, 1, 7, 8, 15, 16, 31, 33, prefetchMin - 1, prefetchMin, prefetchMin + 1, lane - 1, lane, stripe - 1, stripe, stripe + 1, stripe + 15, stripe + 16,
	stripe + 17, 2*stripe + 100, 5*stripe + 4095, ntMin - 1, ntMin, ntMin + 15, ntMin + 16, ntMin + stripe + 17, 1 << 20, 1<<20 + 13}

func filled(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, uint64(n)))
	// Eight bytes per draw: the benchmarks fill 256 MiB buffers.
	i := 0
	for ; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for ; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// both runs f on the fast path (where the machine has it) and on the
// standard library's.
func both(t *testing.T, f func(t *testing.T)) {
	t.Helper()
	saved := fast
	defer func() { fast = saved }()
	for _, on := range []bool{saved, false} {
		fast = on
		f(t)
	}
}

func TestChecksumMatchesHashCRC32(t *testing.T) {
	both(t, func(t *testing.T) {
		for _, n := range lengths {
			buf := filled(n+64, 1)
			for off := range 17 { // every alignment of the input
				b := buf[off : off+n]
				w := crc32.Checksum(b, want)
				if got := Checksum(b); got != w {
					t.Fatalf("fast %v, %d bytes at offset %d: %#x, want %#x", fast, n, off, got, w)
				}
				if got := ChecksumCold(b); got != w {
					t.Fatalf("fast %v, cold, %d bytes at offset %d: %#x, want %#x", fast, n, off, got, w)
				}
			}
		}
	})
}

func TestUpdateChains(t *testing.T) {
	both(t, func(t *testing.T) {
		b := filled(3*stripe+777, 2)
		w := crc32.Checksum(b, want)
		for _, cut := range []int{0, 1, 100, stripe, stripe + 5, 2*stripe - 3, len(b)} {
			if got := Update(Checksum(b[:cut]), b[cut:]); got != w {
				t.Fatalf("fast %v, cut at %d: %#x, want %#x", fast, cut, got, w)
			}
		}
	})
}

func TestCopyCopiesAndChecksums(t *testing.T) {
	both(t, func(t *testing.T) {
		for _, n := range lengths {
			src := filled(n+32, 3)
			dstBuf := make([]byte, n+64)
			srcOffs := []int{0, 3, 8}
			if n < 64<<10 {
				srcOffs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
			}
			for _, so := range srcOffs {
				for do := range 17 { // every alignment of the destination
					s := src[so : so+n]
					clear(dstBuf)
					got := Copy(dstBuf[do:], s)
					if w := crc32.Checksum(s, want); got != w {
						t.Fatalf("fast %v, %d bytes, src+%d dst+%d: %#x, want %#x", fast, n, so, do, got, w)
					}
					if !bytes.Equal(dstBuf[do:do+n], s) {
						t.Fatalf("fast %v, %d bytes, src+%d dst+%d: the copy differs", fast, n, so, do)
					}
					// Nothing around the destination is touched.
					for i, c := range dstBuf {
						if (i < do || i >= do+n) && c != 0 {
							t.Fatalf("fast %v, %d bytes, dst+%d: byte %d outside the destination written", fast, n, do, i)
						}
					}
				}
			}
		}
	})
}

func TestCopyIntoAShortDestinationPanics(t *testing.T) {
	for _, n := range []int{11, ntMin + 100} {
		// Room past the destination's length: reslicing to the source's
		// length would succeed and write there.
		buf := make([]byte, n+16)
		func() {
			defer func() {
				if recover() == nil {
					t.Fatalf("Copy of %d bytes into %d did not panic", n, n-10)
				}
			}()
			Copy(buf[:n-10], make([]byte, n))
		}()
		for i, c := range buf {
			if c != 0 {
				t.Fatalf("Copy of %d bytes into %d wrote byte %d before panicking", n, n-10, i)
			}
		}
	}
}

func TestCopyBetweenOverlappingSlices(t *testing.T) {
	both(t, func(t *testing.T) {
		for _, n := range []int{100, stripe + 40, ntMin + stripe + 17} {
			for _, shift := range []int{-16, -1, 1, 16, 5000} {
				buf := filled(n+2*5000, 4)
				src := buf[5000 : 5000+n]
				w := crc32.Checksum(src, want)
				moved := make([]byte, n+2*5000)
				copy(moved, buf)
				copy(moved[5000+shift:5000+shift+n], moved[5000:5000+n])
				if got := Copy(buf[5000+shift:5000+shift+n], src); got != w {
					t.Fatalf("fast %v, %d bytes moved by %d: %#x, want the source's %#x", fast, n, shift, got, w)
				}
				if !bytes.Equal(buf, moved) {
					t.Fatalf("fast %v, %d bytes moved by %d: not what copy leaves", fast, n, shift)
				}
			}
		}
	})
}

func TestShiftIsAdvanceOverZeros(t *testing.T) {
	zeros := make([]byte, lane)
	for _, s := range []uint32{1, 0x80000000, 0xdeadbeef, 0xffffffff} {
		// The raw register advanced over zeros, via the standard library
		// (which inverts before and after).
		w := ^crc32.Update(^s, want, zeros)
		if got := shift(shiftTable(), s); got != w {
			t.Fatalf("shift(%#x) = %#x, want %#x", s, got, w)
		}
	}
}

// FuzzChecksum checks Update's chaining and Copy (on this machine's path)
// against hash/crc32. The input is repeated to a length that grows with
// size, up to past ntMin (which mutations alone rarely reach), and copied
// to an offset of a destination (every alignment of the vector stores).
func FuzzChecksum(f *testing.F) {
	f.Add([]byte("123456789"), uint16(0), uint8(0), uint8(0))
	f.Add(bytes.Repeat([]byte{0xa5}, stripe+40), uint16(stripe/2), uint8(1), uint8(3))
	f.Add([]byte("a block of a KV cache"), uint16(7), uint8(255), uint8(15))
	f.Fuzz(func(t *testing.T, in []byte, cut uint16, size, dstOff uint8) {
		b := in
		if n := int(size) * (ntMin + 2*stripe) / 255; len(in) > 0 && n > len(in) {
			b = bytes.Repeat(in, n/len(in)+1)[:n]
		}
		c := min(int(cut)*len(b)/65535, len(b))
		w := crc32.Checksum(b, want)
		if got := Update(Checksum(b[:c]), b[c:]); got != w {
			t.Fatalf("%d bytes cut at %d: %#x, want %#x", len(b), c, got, w)
		}
		off := int(dstOff % 16)
		if got := ChecksumCold(b); got != w {
			t.Fatalf("ChecksumCold of %d bytes: %#x, want %#x", len(b), got, w)
		}
		dst := make([]byte, len(b)+off)
		if got := Copy(dst[off:], b); got != w || !bytes.Equal(dst[off:], b) {
			t.Fatalf("Copy of %d bytes to offset %d: %#x (want %#x) or bytes differ", len(b), off, got, w)
		}
	})
}
