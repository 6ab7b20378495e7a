package data

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
)

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
		for {
			c, err := accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					log.Error("data: accept failed, "+what+" stops", "err", err)
				}
				return
			}
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
