package transfer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
	"github.com/triplane-dev/triplane/planetest"
)

func newHost(t *testing.T, ctx context.Context) *actors.Host {
	t.Helper()
	n := planetest.StartNATS(t)
	j, err := journal.Open(ctx, n.Connect(t), journal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := actors.NewHost(actors.HostConfig{Journal: j, Registry: actors.NewRegistry(Machine{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop(context.Background()) })
	return h
}

// receiver is the receiving worker: a region and a TCP server that can be
// killed and restarted on the same address. It checks every landing
// against the source: a block whose bytes differ from the source must never
// be reported landed.
type receiver struct {
	t       *testing.T
	region  *data.Region
	regions *data.Regions
	src     *data.Region
	metrics *data.Metrics
	addr    string

	mu       sync.Mutex
	srv      *data.Server
	landings map[uint64]int // block index -> times landed
	bad      int            // landings whose bytes differ from the source
	hook     func(n int)    // called after every landing with the count
	count    int
}

func newReceiver(t *testing.T, blockSize, blocks int) *receiver {
	region, _ := data.NewRegion(9, blockSize, blocks)
	regions, _ := data.NewRegions(region)
	src, _ := data.NewRegion(1, blockSize, blocks)
	b := src.Bytes()
	for i := range b {
		b[i] = byte(i*7 + i/4099)
	}
	r := &receiver{t: t, region: region, regions: regions, src: src, metrics: data.NewMetrics(nil), landings: map[uint64]int{}}
	r.start()
	t.Cleanup(r.kill)
	return r
}

func (r *receiver) start() {
	addr := r.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	srv, err := data.ListenTCP(addr, data.ServerConfig{Regions: r.regions, Metrics: r.metrics, OnLanded: r.landed})
	if err != nil {
		r.t.Fatal(err)
	}
	r.mu.Lock()
	r.srv, r.addr = srv, srv.Addr()
	r.mu.Unlock()
}

func (r *receiver) kill() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

func (r *receiver) landed(l data.Landed) {
	bs := uint64(r.region.BlockSize())
	i := l.Desc.Offset / bs
	dst := r.region.Block(int(i))
	r.mu.Lock()
	if data.Checksum(dst) != data.Checksum(r.src.Block(int(i))) || l.Desc.Length != bs {
		r.bad++
	}
	r.landings[i]++
	r.count++
	n, hook := r.count, r.hook
	r.mu.Unlock()
	if hook != nil {
		hook(n)
	}
}

func (r *receiver) spec(id string, maxAttempts uint32) Spec {
	ops := make([]data.Op, r.src.Blocks())
	for i := range ops {
		ops[i] = data.Op{Src: r.src.Block(i), Dst: r.region.BlockDesc(i)}
	}
	return Spec{ID: id, Blocks: ops, BlockSize: r.src.BlockSize(), MaxAttempts: maxAttempts, Peer: "decode-1"}
}

// verify checks every block's checksum against the source.
func (r *receiver) verify(t *testing.T) {
	t.Helper()
	for i := 0; i < r.src.Blocks(); i++ {
		if data.Checksum(r.region.Block(i)) != data.Checksum(r.src.Block(i)) {
			t.Fatalf("block %d checksum differs from the source", i)
		}
	}
	if r.bad != 0 {
		t.Fatalf("%d corrupted blocks reported landed", r.bad)
	}
}

func supervisor(t *testing.T, h *actors.Host, addr func() string) *Supervisor {
	s, err := NewSupervisor(Config{Host: h, Pacing: Pacing{RangeBlocks: 8, BackoffMin: 5 * time.Millisecond, BackoffMax: 50 * time.Millisecond},
		Dial: func(ctx context.Context) (data.Transport, error) {
			return data.NewDialer(data.DialOptions{Prefer: "tcp", Lanes: 2, IOTimeout: 5 * time.Second}).Dial(ctx, &triplanev1.DataPeer{TcpAddr: addr()})
		}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestReceiverKilledMidTransferResumes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	r := newReceiver(t, 64<<10, 256)
	killed := make(chan struct{})
	var once sync.Once
	r.hook = func(n int) {
		if n == 100 {
			once.Do(func() { go func() { r.kill(); close(killed) }() })
		}
	}
	restarted := make(chan struct{})
	go func() {
		<-killed
		r.start() // same address: the peer comes back where it was
		close(restarted)
	}()
	sup := supervisor(t, h, func() string { r.mu.Lock(); defer r.mu.Unlock(); return r.addr })
	st, err := sup.Run(ctx, r.spec("kill-1", 20))
	if err != nil {
		t.Fatal(err)
	}
	<-restarted
	if st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || st.Acked != 256 || st.Attempts == 0 {
		t.Fatalf("final state %v, want completed after at least one failed attempt", st)
	}
	r.verify(t)
	// Resumed, not restarted: only the range in flight when the receiver
	// died was sent again.
	again := 0
	for i := uint64(0); i < 256; i++ {
		switch r.landings[i] {
		case 0:
			t.Fatalf("block %d never landed", i)
		case 1:
		default:
			again++
		}
	}
	if again > 8 {
		t.Fatalf("%d blocks landed twice, want at most one range (8)", again)
	}
	// The journal has it: a fresh host recovers the completed session.
	got, err := h.Request(ctx, actors.Address{Kind: Kind, ID: "kill-1"}, &triplanev1.TransferGet{})
	if err != nil || got.(*triplanev1.TransferState).Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
		t.Fatalf("journaled state %v %v", got, err)
	}
}

// flipProxy forwards TCP to target and flips one byte at offset at of the
// first connection's sender-to-receiver stream.
func flipProxy(t *testing.T, target string, at int64) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var first atomic.Bool
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			flip := first.CompareAndSwap(false, true)
			go func() {
				defer u.Close()
				if !flip {
					io.Copy(u, c)
					return
				}
				buf := make([]byte, 32<<10)
				var off int64
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if at >= off && at < off+int64(n) {
							buf[at-off] ^= 0x40
						}
						off += int64(n)
						if _, werr := u.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
			go func() { defer c.Close(); io.Copy(c, u) }()
		}
	}()
	return ln.Addr().String()
}

func TestCorruptedBlockIsNeverMarkedComplete(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	r := newReceiver(t, 64<<10, 64)
	// Byte 100000 of the first lane is inside the second frame's payload.
	proxy := flipProxy(t, r.addr, 100000)
	sup := supervisor(t, h, func() string { return proxy })
	st, err := sup.Run(ctx, r.spec("flip-1", 5))
	if err != nil {
		t.Fatal(err)
	}
	if st.Attempts != 1 {
		t.Fatalf("attempts %d, want 1 failed attempt (the corrupted one)", st.Attempts)
	}
	if got := r.metrics.RejectedCount("tcp", "checksum"); got != 1 {
		t.Fatalf("checksum rejections %v, want 1", got)
	}
	r.verify(t)
}

func TestGivesUpWithErrorRequesterSees(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	r := newReceiver(t, 4096, 16)
	r.kill() // and never back
	sup := supervisor(t, h, func() string { return r.addr })
	st, err := sup.Run(ctx, r.spec("dead-1", 3))
	if !errors.Is(err, ErrGaveUp) || !strings.Contains(err.Error(), "dial") {
		t.Fatalf("err %v, want ErrGaveUp naming the dial failure", err)
	}
	if st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_FAILED || st.Attempts != 3 {
		t.Fatalf("state %v", st)
	}
	// Running it again reports the same end without new attempts.
	if _, err := sup.Run(ctx, r.spec("dead-1", 3)); !errors.Is(err, ErrGaveUp) {
		t.Fatalf("second run: %v", err)
	}
}

func TestCancelStopsTheTransfer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	r := newReceiver(t, 64<<10, 64)
	stall := make(chan struct{})
	stalled := make(chan struct{})
	var once sync.Once
	r.hook = func(n int) {
		if n == 10 {
			once.Do(func() { close(stalled) })
			<-stall // the receiver hangs: no more acks
		}
	}
	t.Cleanup(func() { close(stall) }) // before the receiver's cleanup
	sup := supervisor(t, h, func() string { return r.addr })
	done := make(chan error, 1)
	var st *triplanev1.TransferState
	go func() {
		var err error
		st, err = sup.Run(ctx, r.spec("cancel-1", 5))
		done <- err
	}()
	<-stalled
	// The same session asked again while it runs is refused; the running
	// one goes on.
	if _, err := sup.Run(ctx, r.spec("cancel-1", 5)); !errors.Is(err, ErrAlreadyRunning) {
		t.Fatalf("second run while running: %v, want ErrAlreadyRunning", err)
	}
	if err := sup.Cancel(ctx, "cancel-1", "client went away"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrCancelled) {
		t.Fatalf("err %v, want ErrCancelled", err)
	}
	if st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED || !strings.Contains(st.Error, "client went away") {
		t.Fatalf("state %v", st)
	}
	// A cancelled session stays cancelled.
	if _, err := sup.Run(ctx, r.spec("cancel-1", 5)); !errors.Is(err, ErrCancelled) {
		t.Fatalf("rerun: %v", err)
	}
}

// One supervisor without a dial function of its own runs sessions to
// different peers, each spec dialling its own; a spec without one is
// refused with an error that says so.
func TestSpecDialsItsOwnPeer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	sup, err := NewSupervisor(Config{Host: h, Pacing: Pacing{RangeBlocks: 8, BackoffMin: 5 * time.Millisecond, BackoffMax: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	dialer := data.NewDialer(data.DialOptions{Prefer: "tcp", Lanes: 1, IOTimeout: 5 * time.Second})
	for i, r := range []*receiver{newReceiver(t, 4096, 32), newReceiver(t, 4096, 32)} {
		spec := r.spec(fmt.Sprintf("peer-%d", i), 3)
		spec.Dial = func(ctx context.Context) (data.Transport, error) {
			return dialer.Dial(ctx, &triplanev1.DataPeer{TcpAddr: r.addr})
		}
		st, err := sup.Run(ctx, spec)
		if err != nil || st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED {
			t.Fatalf("peer %d: %v %v", i, st, err)
		}
		r.verify(t)
	}
	r := newReceiver(t, 4096, 4)
	if _, err := sup.Run(ctx, r.spec("no-dial", 3)); err == nil || !strings.Contains(err.Error(), "no dial function") {
		t.Fatalf("err %v, want one naming the missing dial function", err)
	}
}
