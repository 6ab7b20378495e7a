#include "textflag.h"

// The lane of crc32c.go: three lanes make a stripe; the loops below step
// 32 bytes of each lane at a time.
#define LANE 4096
#define STEPS 128

// Prefetch this far ahead in each lane: far enough to cover the memory's
// latency at the rate the CRCs consume bytes.
#define AHEAD 512

// CRC32_STEP feeds the 32 bytes at SI of each lane (lanes R11 and R12
// bytes apart) to the lanes' CRC registers R8, R9 and R10, interleaved so
// that the three dependent chains overlap.
#define CRC32_STEP \
	CRC32Q (SI), R8; \
	CRC32Q (SI)(R11*1), R9; \
	CRC32Q (SI)(R12*1), R10; \
	CRC32Q 8(SI), R8; \
	CRC32Q 8(SI)(R11*1), R9; \
	CRC32Q 8(SI)(R12*1), R10; \
	CRC32Q 16(SI), R8; \
	CRC32Q 16(SI)(R11*1), R9; \
	CRC32Q 16(SI)(R12*1), R10; \
	CRC32Q 24(SI), R8; \
	CRC32Q 24(SI)(R11*1), R9; \
	CRC32Q 24(SI)(R12*1), R10

// func sumStripe(p *byte, s uint32) (a, m, c uint32)
TEXT ·sumStripe(SB), NOSPLIT, $0-28
	MOVQ p+0(FP), SI
	MOVL s+8(FP), R8
	XORL R9, R9
	XORL R10, R10
	MOVQ $LANE, R11
	MOVQ $(2*LANE), R12
	MOVQ $STEPS, CX

sum:
	PREFETCHT0 AHEAD(SI)
	PREFETCHT0 AHEAD(SI)(R11*1)
	PREFETCHT0 AHEAD(SI)(R12*1)
	CRC32_STEP
	ADDQ $32, SI
	DECQ CX
	JNZ  sum

	MOVL R8, a+16(FP)
	MOVL R9, m+20(FP)
	MOVL R10, c+24(FP)
	RET

// func copyStripe(dst, src *byte, s uint32) (a, m, c uint32)
TEXT ·copyStripe(SB), NOSPLIT, $0-36
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVL s+16(FP), R8
	XORL R9, R9
	XORL R10, R10
	MOVQ $LANE, R11
	MOVQ $(2*LANE), R12
	MOVQ $STEPS, CX

copy:
	// The source is read once: into registers for the stores, and by the
	// CRCs from L1, where the moves just brought it.
	PREFETCHNTA AHEAD(SI)
	PREFETCHNTA AHEAD(SI)(R11*1)
	PREFETCHNTA AHEAD(SI)(R12*1)
	MOVOU (SI), X0
	MOVOU 16(SI), X1
	MOVOU (SI)(R11*1), X2
	MOVOU 16(SI)(R11*1), X3
	MOVOU (SI)(R12*1), X4
	MOVOU 16(SI)(R12*1), X5
	CRC32_STEP
	MOVNTO X0, (DI)
	MOVNTO X1, 16(DI)
	MOVNTO X2, (DI)(R11*1)
	MOVNTO X3, 16(DI)(R11*1)
	MOVNTO X4, (DI)(R12*1)
	MOVNTO X5, 16(DI)(R12*1)
	ADDQ $32, SI
	ADDQ $32, DI
	DECQ CX
	JNZ  copy

	MOVL R8, a+24(FP)
	MOVL R9, m+28(FP)
	MOVL R10, c+32(FP)
	RET

// func storeFence()
TEXT ·storeFence(SB), NOSPLIT, $0-0
	SFENCE
	RET

// func prefetch(p *byte, n uintptr)
TEXT ·prefetch(SB), NOSPLIT, $0-16
	MOVQ p+0(FP), SI
	MOVQ n+8(FP), CX
	ADDQ SI, CX

line:
	CMPQ SI, CX
	JAE  done
	PREFETCHT0 (SI)
	ADDQ $64, SI
	JMP  line

done:
	RET
