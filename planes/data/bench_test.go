package data

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
)

func BenchmarkTCPOneLane1MiB(b *testing.B) {
	for _, distinct := range []bool{false, true} {
		for _, shared := range []bool{false, true} {
			for _, hasCRC := range []bool{true, false} {
				b.Run(fmt.Sprintf("distinct=%v/shared=%v/precomputed-crc=%v", distinct, shared, hasCRC), func(b *testing.B) {
					benchTCP(b, distinct, shared, hasCRC)
				})
			}
		}
	}
}

func benchTCP(b *testing.B, distinct, shared, hasCRC bool) {
	ctx := context.Background()
	reg, _ := NewRegion(7, 1<<20, 64)
	if shared {
		reg, _ = NewSharedRegion(7, 1<<20, 64)
		defer reg.Close()
	}
	rs, _ := NewRegions(reg)
	srv, err := ListenTCP("127.0.0.1:0", ServerConfig{Regions: rs})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	src, _ := NewRegion(1, 1<<20, 64)
	ops := make([]Op, 64)
	for i := range ops {
		ops[i] = Op{Src: src.Block(i % 2), Dst: reg.BlockDesc(i % 2), CRC: Checksum(src.Block(i % 2)), HasCRC: true}
	}
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1}).Dial(ctx, Peer(rs, srv, nil))
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	b.SetBytes(64 << 20)
	for i := 0; i < b.N; i++ {
		if err := tr.Write(ctx, ops); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPlainStream1MiB(b *testing.B) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 1<<20)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
		}
	}()
	c, _ := net.Dial("tcp", ln.Addr().String())
	defer c.Close()
	buf := make([]byte, 1<<20)
	b.SetBytes(64 << 20)
	for i := 0; i < b.N; i++ {
		for k := 0; k < 64; k++ {
			c.Write(buf)
		}
	}
}
