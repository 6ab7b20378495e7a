package data

import (
	"bufio"
	"bytes"
	"io"
	"testing"
)

// FuzzDecodeHeader: any bytes decode to a valid header or an ErrBadFrame,
// never a panic; a valid header re-encodes to the same bytes.
func FuzzDecodeHeader(f *testing.F) {
	f.Add(rawFrame(Header{Type: FrameData, Region: 1, Length: 10, Offset: 4096, Seq: 3, CRC: 9}, nil))
	f.Add(rawFrame(Header{Type: FrameAck, Seq: 1}, nil))
	f.Add([]byte("TPD1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHeader(b)
		if err != nil {
			return
		}
		var again [HeaderSize]byte
		h.Encode(again[:])
		if !bytes.Equal(again[:], b[:HeaderSize]) {
			t.Fatalf("header %+v does not round-trip", h)
		}
	})
}

// FuzzReceiver feeds arbitrary bytes to the receive loop. It must never
// panic, and never write outside its region: the region sits between guard
// bytes that must stay untouched.
func FuzzReceiver(f *testing.F) {
	payload := bytes.Repeat([]byte{7}, 64)
	good := rawFrame(Header{Type: FrameData, Region: 1, Offset: 64, CRC: Checksum(payload)}, payload)
	f.Add(append(rawFrame(Header{Type: FrameHello}, []byte("tok")), good...))
	f.Add(good)
	f.Add(append(rawFrame(Header{Type: FrameHello}, []byte("tok")), rawFrame(Header{Type: FrameData, Region: 1, Offset: 250, Length: 64, CRC: Checksum(payload)}, payload)...))
	// Blocks frames: two blocks in a row, and one whose run straddles the
	// region's end.
	two := bytes.Repeat([]byte{9}, 96)
	blocks := []blockSum{{32, Checksum(two[:32])}, {64, Checksum(two[32:])}}
	f.Add(rawBlocks(Header{Region: 1, Offset: 100}, blocks, two, nil))
	f.Add(rawBlocks(Header{Region: 1, Offset: 200}, blocks, two, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		const guard, size = 128, 256
		mem := make([]byte, guard+size+guard)
		for i := range mem {
			mem[i] = 0xEE
		}
		reg := &Region{id: 1, blockSize: 64, blocks: size / 64, mem: mem[guard : guard+size : guard+size], fd: -1}
		rs, _ := NewRegions(reg)
		for _, token := range []string{"", "tok"} {
			cfg := ServerConfig{Regions: rs, Token: token}
			cfg.defaults()
			s := &Server{cfg: cfg}
			err := s.handle(bufio.NewReader(bytes.NewReader(in)), bufio.NewWriter(io.Discard), nil)
			_ = err
			for i := 0; i < guard; i++ {
				if mem[i] != 0xEE || mem[guard+size+i] != 0xEE {
					t.Fatalf("byte outside the region written (token %q)", token)
				}
			}
		}
	})
}
