package data

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// AcceptBackoff paces an accept loop through failures that pass (out of
// file descriptors or memory, an aborted handshake), as net/http does,
// instead of ending it: a worker that stopped accepting would stay
// registered and serve nothing. The zero value is ready.
type AcceptBackoff struct{ delay time.Duration }

// Retry waits before the next Accept and reports true when err may pass;
// false (at once) for a closed listener or any other error.
func (b *AcceptBackoff) Retry(err error) bool {
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
func (b *AcceptBackoff) Reset() { b.delay = 0 }

// connTracker runs a listener's accept loop and tracks its connections, so
// Close can end every one and wait for their handlers. The TCP receiver and
// the shared-memory server share it.
type connTracker[C interface {
	comparable
	io.Closer
}] struct {
	mu     sync.Mutex
	conns  map[C]struct{}
	closed bool
	wg     sync.WaitGroup
}

// start runs accept in the background, handing each connection to serve;
// past max connections at once, a new one is closed and handed to full
// instead.
func (t *connTracker[C]) start(accept func() (C, error), serve func(C), max int, full func(C), log *slog.Logger, what string) {
	t.conns = map[C]struct{}{}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		var backoff AcceptBackoff
		for {
			c, err := accept()
			if err != nil {
				if backoff.Retry(err) {
					log.Warn("data: accept failed, "+what+" retries", "err", err)
					continue
				}
				if !errors.Is(err, net.ErrClosed) {
					log.Error("data: accept failed, "+what+" stops", "err", err)
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
				c.Close()
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

// close closes ln and every connection, then waits for the handlers.
func (t *connTracker[C]) close(ln io.Closer) error {
	t.mu.Lock()
	t.closed = true
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	err := ln.Close()
	t.wg.Wait()
	return err
}
