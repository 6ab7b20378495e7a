//go:build race

package crc32c

import (
	"runtime"
	"unsafe"
)

// The race detector does not see the assembly's loads and stores: these
// tell it which bytes the fast paths read and write.

func raceRead(b []byte) {
	if len(b) > 0 {
		runtime.RaceReadRange(unsafe.Pointer(&b[0]), len(b))
	}
}

func raceWrite(b []byte) {
	if len(b) > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(&b[0]), len(b))
	}
}
