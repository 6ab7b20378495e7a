package data

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// An idle connection is closed once IdleTimeout passed, never before; a
// frame that stops mid-way is closed by FrameTimeout though the idle
// timeout is far off. Both receivers.
func TestReceiverTimeouts(t *testing.T) {
	const frame, idle = 50 * time.Millisecond, 200 * time.Millisecond
	idleR := newReceiver(t, 4096, 4, func(c *ServerConfig) { c.FrameTimeout, c.IdleTimeout = frame, idle })
	stallR := newReceiver(t, 4096, 4, func(c *ServerConfig) { c.FrameTimeout, c.IdleTimeout = frame, time.Hour })
	dial := func(r *receiver, network string) net.Conn {
		addr := r.tcp.Addr()
		if network == "unix" {
			addr = r.shm.Path()
		}
		c, err := net.Dial(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// closed waits for the receiver to close c, at most 10 s.
	closed := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.ReadAll(c)
		return err == nil
	}
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			c := dial(idleR, network)
			start := time.Now()
			c.Write(rawFrame(Header{Type: FrameHello}, nil))
			if !closed(c) {
				t.Fatal("an idle connection was not closed")
			}
			if waited := time.Since(start); waited < idle {
				t.Fatalf("an idle connection was closed after %s, before the idle timeout %s", waited, idle)
			}
			// A connection that never says hello holds its slot for the
			// frame timeout only, though the idle timeout is far off.
			silent := dial(stallR, network)
			if !closed(silent) {
				t.Fatal("a connection that never sent a frame was not closed")
			}
			// Half a data frame's payload (a landed frame has none: its
			// header alone stalls nothing, so only TCP has this case).
			if network == "tcp" {
				c := dial(stallR, network)
				payload := make([]byte, 100)
				f := rawFrame(Header{Type: FrameData, Region: 7, Length: 100, CRC: Checksum(payload)}, payload)
				start := time.Now()
				c.Write(append(rawFrame(Header{Type: FrameHello}, nil), f[:len(f)-50]...))
				if !closed(c) {
					t.Fatal("a frame stalled mid-payload was not closed by the frame timeout")
				}
				// Closed by the timeout, not refused as bad input.
				if waited := time.Since(start); waited < frame {
					t.Fatalf("a stalled frame was closed after %s, before the frame timeout %s", waited, frame)
				}
				for _, reason := range []string{"length", "malformed", "checksum", "out_of_region"} {
					if n := stallR.metrics.RejectedCount("tcp", reason); n != 0 {
						t.Fatalf("a stalled frame was counted as a %s refusal", reason)
					}
				}
			}
		})
	}
}

// A lane that stays idle past its ack deadline is not broken by it: the
// next Write goes through.
func TestLaneIdlePastAckDeadline(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 4, nil)
	// Long enough for a round trip on a loaded machine under -race.
	const ioTimeout = 250 * time.Millisecond
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1, IOTimeout: ioTimeout}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	_, ops := source(r, 5)
	for i := range 3 {
		if err := tr.Write(ctx, ops[i:i+1]); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		// Past the deadline the last write left (IOTimeout and an eighth):
		// the ack reader wakes with nothing pending.
		time.Sleep(ioTimeout + ioTimeout/4)
	}
}

// A receiver that reads but never acknowledges fails the Write after
// IOTimeout, with an error that says so.
func TestNoAckFailsWrite(t *testing.T) {
	ctx := ctxT(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c)
	}()
	r := newReceiver(t, 4096, 4, nil)
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1, IOTimeout: 50 * time.Millisecond}).Dial(ctx, Peer(r.regions, &Server{ln: ln}, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	_, ops := source(r, 6)
	err = tr.Write(ctx, ops[:1])
	if err == nil || !strings.Contains(err.Error(), "no ack within") {
		t.Fatalf("write to a receiver that never acks: %v", err)
	}
}

// Connections past MaxConns are closed at once and counted; the ones
// within it are served.
func TestReceiverConnectionLimit(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 4, func(c *ServerConfig) { c.MaxConns = 2 })
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 2}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	_, ops := source(r, 7)
	if err := tr.Write(ctx, ops); err != nil {
		t.Fatal(err)
	}
	for _, network := range []string{"tcp", "unix"} {
		addr := r.tcp.Addr()
		if network == "unix" {
			addr = r.shm.Path()
			// Fill the shm server's two slots first.
			for range 2 {
				c, err := net.Dial("unix", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.Write(rawFrame(Header{Type: FrameHello}, nil))
			}
		}
		transport := map[string]string{"tcp": "tcp", "unix": "shm"}[network]
		// The accept loop may not have counted the slots' connections
		// yet: dial until one is turned away.
		for r.metrics.RejectedCount(transport, "too_many_connections") == 0 {
			if ctx.Err() != nil {
				t.Fatalf("%s: no connection refused at the limit", network)
			}
			c, err := net.Dial(network, addr)
			if err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			io.ReadAll(c)
			c.Close()
		}
	}
	// The lanes within the limit still work.
	if err := tr.Write(ctx, ops); err != nil {
		t.Fatalf("a write within the limit: %v", err)
	}
}
