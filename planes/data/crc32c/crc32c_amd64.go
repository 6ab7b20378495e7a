package crc32c

import "golang.org/x/sys/cpu"

// fast: the CRC32 instruction is there (SSE4.2); the rest of what the
// assembly uses (SSE2 moves, prefetch, non-temporal stores) is in every
// amd64.
var fast = cpu.X86.HasSSE42

// sumStripe returns the raw CRC registers of the three lanes of the stripe
// at p: the first lane started from s, the others from zero.
//
//go:noescape
func sumStripe(p *byte, s uint32) (a, m, c uint32)

// copyStripe is sumStripe of src that also copies the stripe to dst (16-byte
// aligned) with non-temporal stores; storeFence must follow the last one.
//
//go:noescape
func copyStripe(dst, src *byte, s uint32) (a, m, c uint32)

// storeFence orders the non-temporal stores before any later store (the
// message that says the bytes landed).
func storeFence()

// prefetch asks for the n bytes at p to be brought into cache, without
// waiting for them: the CRC chain that follows then finds them arriving
// instead of stalling on one miss after another.
//
//go:noescape
func prefetch(p *byte, n uintptr)
