package data

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"testing"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Diagnostics for `triplane bench transfer`: the same 64 MiB
// region-to-region moves, one path at a time, so that a CPU profile
// (go test -bench X -cpuprofile) shows one path only.

const benchRegion = 64 << 20

func benchRegions(b *testing.B, bs int) (src, dst *Region, rs *Regions, ops []Op) {
	src, _ = NewRegion(2, bs, benchRegion/bs)
	for i := range src.Bytes() {
		src.Bytes()[i] = byte(i*7 + i>>13)
	}
	dst, err := NewSharedRegion(1, bs, benchRegion/bs)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dst.Close() })
	rs, _ = NewRegions(dst)
	ops = make([]Op, src.Blocks())
	for i := range ops {
		ops[i] = Op{Src: src.Block(i), Dst: dst.BlockDesc(i)}
	}
	return src, dst, rs, ops
}

var benchBlocks = []int{4 << 10, 64 << 10, 1 << 20, 16 << 20}

func BenchmarkTCP(b *testing.B) {
	for _, lanes := range []int{1, 4} {
		for _, bs := range benchBlocks {
			b.Run(fmt.Sprintf("lanes=%d/block=%dK", lanes, bs>>10), func(b *testing.B) {
				_, _, rs, ops := benchRegions(b, bs)
				srv, err := ListenTCP("127.0.0.1:0", ServerConfig{Regions: rs})
				if err != nil {
					b.Fatal(err)
				}
				defer srv.Close()
				benchWrite(b, DialOptions{Prefer: "tcp", Lanes: lanes}, Peer(rs, srv, nil), ops)
			})
		}
	}
}

func BenchmarkShm(b *testing.B) {
	for _, verify := range []bool{true, false} {
		for _, bs := range benchBlocks {
			b.Run(fmt.Sprintf("verify=%v/block=%dK", verify, bs>>10), func(b *testing.B) {
				_, _, rs, ops := benchRegions(b, bs)
				shm, err := ListenShm(filepath.Join(b.TempDir(), "s.sock"), ServerConfig{Regions: rs}, !verify)
				if err != nil {
					b.Fatal(err)
				}
				defer shm.Close()
				benchWrite(b, DialOptions{Prefer: "shm", SkipShmVerify: !verify}, Peer(rs, nil, shm), ops)
			})
		}
	}
}

func benchWrite(b *testing.B, o DialOptions, peer *triplanev1.DataPeer, ops []Op) {
	ctx := context.Background()
	tr, err := NewDialer(o).Dial(ctx, peer)
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	if err := tr.Write(ctx, ops); err != nil { // warm-up
		b.Fatal(err)
	}
	b.SetBytes(benchRegion)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := tr.Write(ctx, ops); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCopy(b *testing.B) {
	src, dst, _, _ := benchRegions(b, 1<<20)
	b.SetBytes(benchRegion)
	copy(dst.Bytes(), src.Bytes()) // fault the pages in, as the other paths warm up
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(dst.Bytes(), src.Bytes())
	}
}

// BenchmarkPlainStream is the TCP baseline: 1 MiB writes of one cache-hot
// buffer, or (regions) walking 64 MiB regions on both ends.
func BenchmarkPlainStream(b *testing.B) {
	for _, regions := range []bool{false, true} {
		b.Run(fmt.Sprintf("regions=%v", regions), func(b *testing.B) {
			const chunk = 1 << 20
			n := 1
			if regions {
				n = benchRegion / chunk
			}
			src, dst := make([]byte, n*chunk), make([]byte, n*chunk)
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			defer ln.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				for i := 0; ; i++ {
					if _, err := io.ReadFull(c, dst[i%n*chunk:][:chunk]); err != nil {
						return
					}
				}
			}()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			write := func() {
				for k := 0; k < 64; k++ {
					if _, err := c.Write(src[k%n*chunk:][:chunk]); err != nil {
						b.Fatal(err)
					}
				}
			}
			write() // warm up (pages, connection), as the other paths do
			b.SetBytes(64 << 20)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				write()
			}
			c.Close()
			<-done
		})
	}
}
