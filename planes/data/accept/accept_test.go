package accept

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// An accept loop goes on after failures that pass (out of descriptors,
// an aborted connection, a timeout), paced; a closed listener or another
// error ends it.
func TestBackoff(t *testing.T) {
	var b Backoff
	for _, err := range []error{syscall.EMFILE, fmt.Errorf("accept: %w", syscall.ENFILE), syscall.ECONNABORTED, os.ErrDeadlineExceeded} {
		if !b.Retry(err) {
			t.Errorf("%v: the loop stops, want a retry", err)
		}
	}
	if b.delay != 40*time.Millisecond {
		t.Errorf("after four failures the wait is %s, want 40ms (doubling from 5ms)", b.delay)
	}
	b.Reset()
	for _, err := range []error{net.ErrClosed, errors.New("something else"), syscall.EINVAL} {
		if b.Retry(err) {
			t.Errorf("%v: retried, want the loop to stop", err)
		}
	}
}

// The tracker serves up to max connections at once and hands the rest
// to full; Close ends the connections it serves and waits for their
// handlers, Stop waits for handlers to end on their own.
func TestTracker(t *testing.T) {
	for _, closeConns := range []bool{true, false} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var tr Tracker[net.Conn]
		serving := make(chan net.Conn, 2)
		release := make(chan struct{})
		var served, refused atomic.Int64
		tr.Start(ln.Accept, func(c net.Conn) {
			served.Add(1)
			serving <- c
			if closeConns {
				c.Read(make([]byte, 1)) // until Close closes c
			} else {
				<-release
			}
			c.Close()
		}, 2, func(c net.Conn) {
			refused.Add(1)
			tr.Go(func() { c.Close() })
		}, slog.New(slog.DiscardHandler), "test")
		var clients []net.Conn
		for range 2 {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
			<-serving
		}
		// A third is over the limit: the server closes it.
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a connection over the limit was not closed: %v", err)
		}
		c.Close()
		if closeConns {
			if err := tr.Close(ln); err != nil {
				t.Fatal(err)
			}
		} else {
			close(release)
			if err := tr.Stop(ln); err != nil {
				t.Fatal(err)
			}
		}
		if served.Load() != 2 || refused.Load() != 1 {
			t.Errorf("served %d, refused %d; want 2 and 1", served.Load(), refused.Load())
		}
		for _, c := range clients {
			c.Close()
		}
	}
}
