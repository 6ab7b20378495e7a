package data

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func fill(seed uint64, b []byte) {
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

type receiver struct {
	regions *Regions
	region  *Region
	tcp     *Server
	shm     *ShmServer
	metrics *Metrics
	mu      sync.Mutex
	landed  []Landed
}

func newReceiver(t *testing.T, blockSize, blocks int, mod func(*ServerConfig)) *receiver {
	t.Helper()
	reg, err := NewSharedRegion(7, blockSize, blocks)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	rs, err := NewRegions(reg)
	if err != nil {
		t.Fatal(err)
	}
	r := &receiver{regions: rs, region: reg, metrics: NewMetrics(nil)}
	cfg := ServerConfig{Regions: rs, Metrics: r.metrics, OnLanded: func(l Landed) {
		r.mu.Lock()
		r.landed = append(r.landed, l)
		r.mu.Unlock()
	}}
	if mod != nil {
		mod(&cfg)
	}
	r.tcp, err = ListenTCP("127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.tcp.Close() })
	r.shm, err = ListenShm(filepath.Join(t.TempDir(), "shm.sock"), cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.shm.Close() })
	return r
}

func (r *receiver) peer() *triplanev1.DataPeer { return Peer(r.regions, r.tcp, r.shm) }

// source builds blocks of random bytes and the ops that move them into the
// receiver's blocks.
func source(r *receiver, seed uint64) (*Region, []Op) {
	src, _ := NewRegion(1, r.region.BlockSize(), r.region.Blocks())
	fill(seed, src.Bytes())
	ops := make([]Op, src.Blocks())
	for i := range ops {
		ops[i] = Op{Src: src.Block(i), Dst: r.region.BlockDesc(i)}
	}
	return src, ops
}

func TestRegionsSliceChecksBounds(t *testing.T) {
	reg, _ := NewRegion(3, 4096, 4)
	rs, _ := NewRegions(reg)
	good := []Descriptor{{3, 0, 4096}, {3, 3 * 4096, 4096}, {3, 16383, 1}}
	for _, d := range good {
		b, err := rs.Slice(d)
		if err != nil || uint64(len(b)) != d.Length || cap(b) != len(b) {
			t.Fatalf("%s: %v (len %d cap %d)", d, err, len(b), cap(b))
		}
	}
	bad := []Descriptor{{4, 0, 1}, {3, 0, 0}, {3, 16384, 1}, {3, 16383, 2}, {3, 1<<64 - 1, 2}, {3, 1, 1<<64 - 1}}
	for _, d := range bad {
		if _, err := rs.Slice(d); !errors.Is(err, ErrOutOfRegion) {
			t.Fatalf("%s: %v, want ErrOutOfRegion", d, err)
		}
	}
	if err := rs.Register(reg); err == nil {
		t.Fatal("region registered twice")
	}
	if _, err := NewRegion(1, 0, 1); err == nil {
		t.Fatal("empty region accepted")
	}
}

func TestTransportsMoveEveryByte(t *testing.T) {
	for _, tc := range []struct {
		name, prefer string
		lanes        int
		blockSize    int
	}{
		{"tcp-1-lane-4k", "tcp", 1, 4096},
		{"tcp-1-lane-4k-reversed", "tcp", 1, 4096},
		{"tcp-1-lane-4k-old-receiver", "tcp", 1, 4096},
		{"tcp-4-lanes-64k", "tcp", 4, 64 << 10},
		{"tcp-3-lanes-5m-split", "tcp", 3, 5 << 20},
		{"shm-64k", "shm", 0, 64 << 10},
		// Frames from 256 KiB up are copied with non-temporal stores
		// into the receiver's mapping (crc32c.Copy).
		{"shm-1m", "shm", 0, 1 << 20},
		{"shm-5m-split", "shm", 0, 5 << 20},
		{"auto-is-shm", "", 0, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t)
			r := newReceiver(t, tc.blockSize, 6, nil)
			src, ops := source(r, 1)
			if strings.HasSuffix(tc.name, "reversed") {
				// No two destinations follow each other in the write:
				// one data frame per block instead of blocks frames.
				slices.Reverse(ops[:3])
				slices.Reverse(ops[3:])
			}
			d := NewDialer(DialOptions{Prefer: tc.prefer, Lanes: tc.lanes, FrameSize: 2 << 20})
			peer := r.peer()
			if strings.HasSuffix(tc.name, "old-receiver") {
				// A receiver from before blocks frames does not say it
				// takes them: it gets a data frame per block.
				peer.TcpBlocksFrames = false
			}
			tr, err := d.Dial(ctx, peer)
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			want := tc.prefer
			if want == "" {
				want = "shm"
			}
			if tr.Name() != want {
				t.Fatalf("transport %s, want %s", tr.Name(), want)
			}
			// Two writes: the first half of the blocks, then the rest.
			if err := tr.Write(ctx, ops[:3]); err != nil {
				t.Fatal(err)
			}
			if err := tr.Write(ctx, ops[3:]); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(src.Bytes(), r.region.Bytes()) {
				t.Fatal("receiver's region differs from the source")
			}
			r.mu.Lock()
			var n uint64
			for _, l := range r.landed {
				n += l.Desc.Length
			}
			r.mu.Unlock()
			if n != uint64(len(src.Bytes())) {
				t.Fatalf("landed notifications cover %d bytes, want %d", n, len(src.Bytes()))
			}
			frames := counterValue(r.metrics.framesLanded.WithLabelValues("tcp"))
			switch tc.name {
			case "tcp-1-lane-4k": // one blocks frame per Write
				if frames != 2 {
					t.Fatalf("%v frames landed, want 2", frames)
				}
			case "tcp-1-lane-4k-reversed", "tcp-1-lane-4k-old-receiver":
				if frames != 6 {
					t.Fatalf("%v frames landed, want 6", frames)
				}
			}
			if tc.blockSize <= 2<<20 {
				// Blocks sent together in one frame still land one by
				// one, each with its own checksum.
				r.mu.Lock()
				defer r.mu.Unlock()
				if len(r.landed) != len(ops) {
					t.Fatalf("%d landed notifications for %d blocks", len(r.landed), len(ops))
				}
				for _, l := range r.landed {
					i := int(l.Desc.Offset) / tc.blockSize
					if l.Desc != r.region.BlockDesc(i) || l.CRC != Checksum(src.Block(i)) {
						t.Fatalf("landed %s crc %#x, want %s crc %#x", l.Desc, l.CRC, r.region.BlockDesc(i), Checksum(src.Block(i)))
					}
				}
			}
		})
	}
}

func TestDialerChoice(t *testing.T) {
	d := NewDialer(DialOptions{HostID: "a"})
	for _, tc := range []struct {
		peer *triplanev1.DataPeer
		want string
	}{
		{&triplanev1.DataPeer{HostId: "a", TcpAddr: "x:1", ShmSocket: "/s"}, "shm"},
		{&triplanev1.DataPeer{HostId: "b", TcpAddr: "x:1", ShmSocket: "/s"}, "tcp"},
		{&triplanev1.DataPeer{HostId: "a", TcpAddr: "x:1"}, "tcp"},
	} {
		b, err := d.Choose(tc.peer)
		if err != nil || b.Name() != tc.want {
			t.Fatalf("%v: %v %v, want %s", tc.peer, b, err, tc.want)
		}
	}
	if _, err := d.Choose(&triplanev1.DataPeer{HostId: "b"}); err == nil {
		t.Fatal("unreachable peer chosen")
	}
	if _, err := NewDialer(DialOptions{HostID: "a", Prefer: "shm"}).Choose(&triplanev1.DataPeer{HostId: "b", TcpAddr: "x:1", ShmSocket: "/s"}); err == nil {
		t.Fatal("shm forced across hosts")
	}
	if _, err := NewDialer(DialOptions{Prefer: "ucx"}).Choose(&triplanev1.DataPeer{TcpAddr: "x:1"}); err == nil || !strings.Contains(err.Error(), "unknown transport") {
		t.Fatalf("unknown backend: %v", err)
	}
	// A further backend goes in front without changing callers.
	b, err := NewDialer(DialOptions{HostID: "a"}, fakeRDMA{}).Choose(&triplanev1.DataPeer{HostId: "a", TcpAddr: "x:1", ShmSocket: "/s"})
	if err != nil || b.Name() != "rdma" {
		t.Fatalf("extra backend: %v %v", b, err)
	}
}

type fakeRDMA struct{ tcpBackend }

func (fakeRDMA) Name() string { return "rdma" }

// rawFrame builds a data frame by hand.
func rawFrame(h Header, payload []byte) []byte {
	b := make([]byte, HeaderSize+len(payload))
	if h.Length == 0 {
		h.Length = uint32(len(payload))
	}
	h.Encode(b)
	copy(b[HeaderSize:], payload)
	return b
}

// rawBlocks builds a blocks frame by hand: the table of blocks (changed by
// mod when set), then payload. h's Length and CRC default to the payload's
// length and the table's checksum.
func rawBlocks(h Header, blocks []blockSum, payload []byte, mod func(table []byte)) []byte {
	table := appendBlockTable(nil, len(blocks))
	for _, b := range blocks {
		table = appendBlock(table, b.n, b.crc)
	}
	if mod != nil {
		mod(table)
	}
	h.Type = FrameBlocks
	if h.Length == 0 {
		h.Length = uint32(len(payload))
	}
	if h.CRC == 0 {
		h.CRC = Checksum(table)
	}
	return append(rawFrame(h, table)[:HeaderSize+len(table)], payload...)
}

func TestCoalesceGroupsContiguousDestinations(t *testing.T) {
	d := func(region uint32, off, n uint64) frame {
		return frame{src: make([]byte, n), dst: Descriptor{Region: region, Offset: off, Length: n}}
	}
	fs := []frame{d(1, 0, 100), d(1, 100, 100), d(1, 200, 100), // one run
		d(1, 400, 100),                // a gap before it
		d(2, 500, 100),                // another region
		d(2, 600, 900), d(2, 1500, 1), // the size limit splits here
	}
	var got []Descriptor
	for _, r := range coalesce(fs, 1000, MaxFrameBlocks) {
		got = append(got, r.dst)
	}
	want := []Descriptor{{1, 0, 300}, {1, 400, 100}, {2, 500, 1000}, {2, 1500, 1}}
	if !slices.Equal(got, want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	many := make([]frame, MaxFrameBlocks+1)
	for i := range many {
		many[i] = d(1, uint64(i), 1)
	}
	rs := coalesce(many, 1<<20, MaxFrameBlocks)
	if len(rs) != 2 || len(rs[0].parts) != MaxFrameBlocks {
		t.Fatalf("%d runs of %d blocks, want the first to hold %d", len(rs), len(rs[0].parts), MaxFrameBlocks)
	}
}

func TestBadInputClosesOnlyThatConnection(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 4, nil)
	// A good sender keeps a lane open across the bad connections.
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 2}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	src, ops := source(r, 2)
	if err := tr.Write(ctx, ops[:1]); err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte{0xAB}, 100)
	hello := rawFrame(Header{Type: FrameHello}, nil)
	garbage := bytes.Repeat([]byte("not a frame at all! "), 4)
	corruptHeader := rawFrame(Header{Type: FrameData, Region: 7, Length: 100, CRC: Checksum(payload)}, payload)
	corruptHeader[20] ^= 1
	// Two blocks of 100 bytes for blocks frames.
	two := bytes.Repeat([]byte{0xCD}, 200)
	two[150] = 1
	twoBlocks := []blockSum{{100, Checksum(two[:100])}, {100, Checksum(two[100:])}}
	for _, tc := range []struct {
		name, reason string
		bytes        []byte
		closeWrite   bool
	}{
		{"garbage", "malformed", garbage, false},
		{"header checksum", "malformed", append(hello, corruptHeader...), false},
		{"unknown type", "malformed", append(hello, rawFrame(Header{Type: 99}, nil)...), false},
		{"too long", "malformed", append(hello, rawFrame(Header{Type: FrameData, Region: 7, Length: MaxFrame + 1}, nil)...), false},
		{"outside region", "out_of_region", append(hello, rawFrame(Header{Type: FrameData, Region: 7, Offset: 4 * 4096, Length: 100, CRC: Checksum(payload)}, payload)...), false},
		{"straddles region end", "out_of_region", append(hello, rawFrame(Header{Type: FrameData, Region: 7, Offset: 4*4096 - 50, Length: 100, CRC: Checksum(payload)}, payload)...), false},
		{"unknown region", "out_of_region", append(hello, rawFrame(Header{Type: FrameData, Region: 8, Length: 100, CRC: Checksum(payload)}, payload)...), false},
		{"bad checksum", "checksum", append(hello, rawFrame(Header{Type: FrameData, Region: 7, Offset: 8192, Length: 100, CRC: 12345}, payload)...), false},
		{"short payload", "length", append(hello, rawFrame(Header{Type: FrameData, Region: 7, Offset: 8192, Length: 200, CRC: Checksum(payload)}, payload)...), true},
		{"truncated header", "length", hello[:20], true},
		{"ack from sender", "unexpected", append(hello, rawFrame(Header{Type: FrameAck}, nil)...), false},
		{"blocks: table checksum", "malformed", append(hello, rawBlocks(Header{Region: 7, Offset: 8192, CRC: 1}, twoBlocks, two, nil)...), false},
		{"blocks: no blocks", "malformed", append(hello, rawBlocks(Header{Region: 7, Offset: 8192, Length: 200}, nil, two, nil)...), false},
		{"blocks: too many blocks", "malformed", append(hello, rawBlocks(Header{Region: 7, Offset: 8192}, twoBlocks, two, func(b []byte) { binary.LittleEndian.PutUint32(b, MaxFrameBlocks+1) })...), false},
		{"blocks: reserved bits", "malformed", append(hello, rawBlocks(Header{Region: 7, Offset: 8192}, twoBlocks, two, func(b []byte) { b[4] = 1 })...), false},
		{"blocks: empty block", "malformed", append(hello, rawBlocks(Header{Region: 7, Offset: 8192}, []blockSum{{0, 0}, {200, Checksum(two)}}, two, nil)...), false},
		{"blocks: lengths disagree", "length", append(hello, rawBlocks(Header{Region: 7, Offset: 8192, Length: 100}, twoBlocks, two[:100], nil)...), false},
		{"blocks: truncated table", "length", append(hello, rawBlocks(Header{Region: 7, Offset: 8192}, twoBlocks, nil, nil)[:HeaderSize+12]...), true},
		{"blocks: outside region", "out_of_region", append(hello, rawBlocks(Header{Region: 7, Offset: 4*4096 - 150}, twoBlocks, two, nil)...), false},
		{"blocks: second block corrupt", "checksum", append(hello, rawBlocks(Header{Region: 7, Offset: 8192}, []blockSum{twoBlocks[0], {100, 12345}}, two, nil)...), false},
		{"blocks: short payload", "length", append(hello, rawBlocks(Header{Region: 7, Offset: 8192, Length: 200}, twoBlocks, two[:150], nil)...), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.metrics.RejectedCount("tcp", tc.reason)
			r.mu.Lock()
			landed := len(r.landed)
			r.mu.Unlock()
			c, err := net.Dial("tcp", r.tcp.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write(tc.bytes)
			if tc.closeWrite {
				c.(*net.TCPConn).CloseWrite()
			}
			// The receiver answers with an error frame and closes.
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			br := bufio.NewReader(c)
			var hdr [HeaderSize]byte
			if _, err := io.ReadFull(br, hdr[:]); err != nil {
				t.Fatalf("no error frame: %v", err)
			}
			h, err := DecodeHeader(hdr[:])
			if err != nil || h.Type != FrameError {
				t.Fatalf("got %v %v, want an error frame", h, err)
			}
			if _, err := io.Copy(io.Discard, br); err != nil {
				t.Fatalf("connection not closed cleanly: %v", err)
			}
			if got := r.metrics.RejectedCount("tcp", tc.reason); got != before+1 {
				t.Fatalf("rejections for %q: %v, want %v", tc.reason, got, before+1)
			}
			// No block of a refused frame is reported landed, even one
			// whose own checksum matched.
			r.mu.Lock()
			defer r.mu.Unlock()
			if len(r.landed) != landed {
				t.Fatalf("%d blocks landed from a refused connection", len(r.landed)-landed)
			}
		})
	}
	// Nothing outside the region moved, the good lanes still work.
	if err := tr.Write(ctx, ops[1:]); err != nil {
		t.Fatalf("good connection after bad ones: %v", err)
	}
	if !bytes.Equal(src.Bytes()[:8192], r.region.Bytes()[:8192]) || !bytes.Equal(src.Bytes()[12288:], r.region.Bytes()[12288:]) {
		t.Fatal("good blocks differ")
	}
}

func TestShmBadInputAndAuth(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 4, func(c *ServerConfig) { c.Token = "s3cret" })
	if _, err := NewDialer(DialOptions{Prefer: "shm"}).Dial(ctx, r.peer()); err == nil {
		t.Fatal("shm sender without the token accepted")
	}
	tr, err := NewDialer(DialOptions{Prefer: "shm", Token: "s3cret"}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	src, ops := source(r, 3)
	if err := tr.Write(ctx, ops); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(src.Bytes(), r.region.Bytes()) {
		t.Fatal("regions differ")
	}
	// A descriptor beyond the mapping is refused by the sender before any
	// copy.
	err = tr.Write(ctx, []Op{{Src: make([]byte, 10), Dst: Descriptor{Region: 7, Offset: 4*4096 - 5, Length: 10}}})
	if !errors.Is(err, ErrOutOfRegion) {
		t.Fatalf("out of mapping: %v", err)
	}
	// A raw peer naming bytes outside the region is refused by the receiver.
	c, err := net.Dial("unix", r.shm.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(append(rawFrame(Header{Type: FrameHello}, []byte("s3cret")), rawFrame(Header{Type: FrameLanded, Region: 7, Offset: 4 * 4096, Length: 1}, nil)...))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	msg, _ := io.ReadAll(c)
	if !bytes.Contains(msg, []byte("outside registered regions")) {
		t.Fatalf("receiver answered %q", msg)
	}
	if got := r.metrics.RejectedCount("shm", "out_of_region"); got != 1 {
		t.Fatalf("shm out_of_region rejections %v, want 1", got)
	}
	if got := r.metrics.RejectedCount("shm", "auth"); got != 1 {
		t.Fatalf("shm auth rejections %v, want 1", got)
	}
}

func TestReceiverGoneFailsWrite(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 1<<20, 8, nil)
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 2}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	_, ops := source(r, 4)
	r.tcp.Close()
	if err := tr.Write(ctx, ops); err == nil {
		t.Fatal("write to a closed receiver succeeded")
	}
	if err := tr.Write(ctx, ops[:1]); err == nil {
		t.Fatal("write on a broken transport succeeded")
	}
}

func TestWriteRejectsMismatchedOps(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 2, nil)
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if err := tr.Write(ctx, []Op{{Src: make([]byte, 10), Dst: Descriptor{Region: 7, Length: 11}}}); err == nil {
		t.Fatal("length mismatch accepted")
	}
}

// Same boot id but no reachable shared-memory socket (containers on one
// node): the automatic choice falls back to TCP instead of failing.
func TestDialFallsBackFromShmToTCP(t *testing.T) {
	r, err := NewRegion(1, 64, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rs, err := NewRegions(r)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ListenTCP("127.0.0.1:0", ServerConfig{Regions: rs})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	peer := &triplanev1.DataPeer{HostId: HostID(), TcpAddr: srv.Addr(), ShmSocket: filepath.Join(t.TempDir(), "gone.sock")}
	tr, err := NewDialer(DialOptions{}).Dial(context.Background(), peer)
	if err != nil {
		t.Fatalf("no fallback: %v", err)
	}
	defer tr.Close()
	if tr.Name() != "tcp" {
		t.Fatalf("transport %s, want tcp", tr.Name())
	}
	// Forced shared memory does not fall back.
	if _, err := NewDialer(DialOptions{Prefer: "shm"}).Dial(context.Background(), peer); err == nil {
		t.Fatal("forced shm fell back")
	}
}
