// Package accept runs the data plane's accept loops: the block receivers
// (TCP, shared memory) and the response-stream server share one loop that
// backs off through failures that pass, bounds the connections served at
// once and waits for every handler when it stops.
package accept

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// Backoff paces an accept loop through failures that pass (out of file
// descriptors or memory, an aborted handshake), as net/http does, instead
// of ending it: a worker that stopped accepting would stay registered and
// serve nothing. The zero value is ready.
type Backoff struct{ delay time.Duration }

// Retry waits before the next Accept and reports true when err may pass;
// false (at once) for a closed listener or any other error.
func (b *Backoff) Retry(err error) bool {
	var ne net.Error
	passing := errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) ||
		errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ECONNABORTED) || (errors.As(err, &ne) && ne.Timeout())
	if !passing || errors.Is(err, net.ErrClosed) {
		return false
	}
	b.delay = min(max(2*b.delay, 5*time.Millisecond), time.Second)
	time.Sleep(b.delay)
	return true
}

// Reset is called after a successful Accept.
func (b *Backoff) Reset() { b.delay = 0 }

// Tracker runs a listener's accept loop and tracks its connections and
// the goroutines serving them, so that a server can stop and know that
// nothing of it still runs.
type Tracker[C interface {
	comparable
	io.Closer
}] struct {
	mu     sync.Mutex
	conns  map[C]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Start runs accept in the background, handing each connection to serve
// on a goroutine of its own; past max connections at once, a new one goes
// to full instead, on the accept loop, which then owns it (it must close
// it, and do any slow work through Go). what names the server in logs.
func (t *Tracker[C]) Start(accept func() (C, error), serve func(C), max int, full func(C), log *slog.Logger, what string) {
	t.mu.Lock()
	t.conns = map[C]struct{}{}
	t.mu.Unlock()
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		var backoff Backoff
		for {
			c, err := accept()
			if err != nil {
				if backoff.Retry(err) {
					log.Warn("accept failed, retrying", "server", what, "err", err)
					continue
				}
				if !errors.Is(err, net.ErrClosed) {
					log.Error("accept failed, the server stops accepting", "server", what, "err", err)
				}
				return
			}
			backoff.Reset()
			t.mu.Lock()
			if t.closed {
				t.mu.Unlock()
				c.Close()
				return
			}
			if len(t.conns) >= max {
				t.mu.Unlock()
				full(c)
				continue
			}
			t.conns[c] = struct{}{}
			t.wg.Add(1)
			t.mu.Unlock()
			go func() {
				defer t.wg.Done()
				serve(c)
				t.mu.Lock()
				delete(t.conns, c)
				t.mu.Unlock()
			}()
		}
	}()
}

// Len is the number of connections being served.
func (t *Tracker[C]) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// Go runs f on a goroutine that Close and Stop wait for.
func (t *Tracker[C]) Go(f func()) {
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		f()
	}()
}

// Close closes ln and every connection, then waits for the handlers.
func (t *Tracker[C]) Close(ln io.Closer) error { return t.stop(ln, true) }

// Stop closes ln and waits for the handlers, leaving their connections
// to them: for a server whose handlers end on their own terms (a final
// frame) once told to.
func (t *Tracker[C]) Stop(ln io.Closer) error { return t.stop(ln, false) }

func (t *Tracker[C]) stop(ln io.Closer, conns bool) error {
	t.mu.Lock()
	t.closed = true
	if conns {
		for c := range t.conns {
			c.Close()
		}
	}
	t.mu.Unlock()
	err := ln.Close()
	t.wg.Wait()
	return err
}
