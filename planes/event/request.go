package event

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"
)

// Request sends req on subject and waits for one reply, until ctx ends or,
// when ctx has no deadline, the bus's RequestTimeout. Failures are distinct:
// ErrNoResponders, ErrTimeout, ErrCanceled, ErrDisconnected (the connection
// dropped while waiting: the request fails at once instead of hanging),
// ErrTooLarge, ErrMalformed (a reply that does not decode) and *RemoteError
// (the responder's handler failed).
func Request[Req, Resp proto.Message](ctx context.Context, b *Bus, subject string, req Req) (Resp, error) {
	var zero Resp
	bp, err := b.marshal(subject, req)
	if err != nil {
		return zero, err
	}
	defer b.release(bp)
	data := *bp
	if b.nc.Status() != nats.CONNECTED {
		return zero, b.reqErr("disconnected", fmt.Errorf("%w: request on %s (connection %s)", ErrDisconnected, subject, b.nc.Status()))
	}
	rctx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		rctx, cancel = context.WithTimeout(ctx, b.cfg.RequestTimeout)
		defer cancel()
	}
	rctx, cancel := context.WithCancelCause(rctx)
	defer cancel(nil)
	id, err := b.track(cancel)
	if err != nil {
		return zero, err
	}
	defer b.untrack(id)

	reply, err := b.nc.RequestWithContext(rctx, subject, data)
	if err != nil {
		return zero, b.classify(ctx, rctx, subject, err)
	}
	b.metrics.Received.Inc()
	if msg := reply.Header.Get(errorHeader); msg != "" {
		return zero, b.reqErr("remote", &RemoteError{Subject: subject, Message: msg})
	}
	v, err := Decode[Resp](reply.Data)
	if err != nil {
		return zero, b.reqErr("malformed", fmt.Errorf("event: reply on %s: %w", subject, err))
	}
	return v, nil
}

func (b *Bus) track(cancel context.CancelCauseFunc) (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, ErrClosed
	}
	b.nextReq++
	b.inflight[b.nextReq] = cancel
	return b.nextReq, nil
}

func (b *Bus) untrack(id uint64) {
	b.mu.Lock()
	delete(b.inflight, id)
	b.mu.Unlock()
}

func (b *Bus) reqErr(kind string, err error) error {
	b.metrics.RequestErrors.WithLabelValues(kind).Inc()
	return err
}

// classify turns nats.go's request errors into the plane's distinct ones.
func (b *Bus) classify(parent, rctx context.Context, subject string, err error) error {
	switch cause := context.Cause(rctx); {
	case errors.Is(err, nats.ErrNoResponders):
		return b.reqErr("no_responders", fmt.Errorf("%w: %s", ErrNoResponders, subject))
	case errors.Is(cause, ErrDisconnected), errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, nats.ErrConnectionReconnecting):
		return b.reqErr("disconnected", fmt.Errorf("%w: request on %s: %v", ErrDisconnected, subject, err))
	case errors.Is(cause, ErrClosed):
		return b.reqErr("closed", fmt.Errorf("%w: request on %s", ErrClosed, subject))
	case errors.Is(parent.Err(), context.Canceled):
		return b.reqErr("canceled", fmt.Errorf("%w: %s: %w", ErrCanceled, subject, context.Cause(parent)))
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout), errors.Is(parent.Err(), context.DeadlineExceeded):
		return b.reqErr("timeout", fmt.Errorf("%w: no reply on %s", ErrTimeout, subject))
	case errors.Is(err, context.Canceled):
		return b.reqErr("canceled", fmt.Errorf("%w: %s", ErrCanceled, subject))
	default:
		return b.reqErr("other", fmt.Errorf("event: request on %s: %w", subject, err))
	}
}

// Future is the pending result of an asynchronous request.
type Future[T any] struct {
	done chan struct{}
	v    T
	err  error
}

// Done is closed once the result is ready.
func (f *Future[T]) Done() <-chan struct{} { return f.done }

// Wait blocks until the result is ready or ctx ends (which abandons the
// wait, not the request: cancel the request's own context for that).
func (f *Future[T]) Wait(ctx context.Context) (T, error) {
	select {
	case <-f.done:
		return f.v, f.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("%w: waiting for a reply: %w", ErrCanceled, ctx.Err())
	}
}

// RequestAsync starts Request in the background and returns its future.
// ctx bounds the request as it does for Request.
func RequestAsync[Req, Resp proto.Message](ctx context.Context, b *Bus, subject string, req Req) *Future[Resp] {
	f := &Future[Resp]{done: make(chan struct{})}
	go func() {
		defer close(f.done)
		f.v, f.err = Request[Req, Resp](ctx, b, subject, req)
	}()
	return f
}

// RequestFunc starts Request in the background and calls cb with its result.
func RequestFunc[Req, Resp proto.Message](ctx context.Context, b *Bus, subject string, req Req, cb func(Resp, error)) {
	go func() { cb(Request[Req, Resp](ctx, b, subject, req)) }()
}

// Serve answers requests on subject with h. A non-empty queue makes the
// responders a queue group (each request answered by one member). A request
// that does not decode, or a handler error, is answered with an error reply
// the requester sees as *RemoteError, so it never waits for a timeout.
// Handlers run one at a time per subscription; their context ends when the
// bus closes.
func Serve[Req, Resp proto.Message](b *Bus, subject, queue string, h func(context.Context, Req) (Resp, error)) (*Subscription, error) {
	return b.subscribe(subject, queue, func(s *Subscription, m *nats.Msg) { serveMsg(b, s, m, h) })
}

// ServeConcurrent is Serve with up to limit handlers running at once, each
// on its own goroutine (Serve runs one at a time). A request beyond the
// limit is refused at once with a RemoteError saying the responder is busy,
// and counted (Metrics.Busy), so the caller can go elsewhere instead of
// queueing without bound.
func ServeConcurrent[Req, Resp proto.Message](b *Bus, subject, queue string, limit int, h func(context.Context, Req) (Resp, error)) (*Subscription, error) {
	if limit < 1 {
		return nil, fmt.Errorf("event: serve %s: limit %d must be at least 1", subject, limit)
	}
	sem := make(chan struct{}, limit)
	return b.subscribe(subject, queue, func(s *Subscription, m *nats.Msg) {
		select {
		case sem <- struct{}{}:
		default:
			b.metrics.Busy.Inc()
			if m.Reply != "" {
				b.respondErr(m, fmt.Sprintf("%s: busy, %d requests running", ErrBusyText, limit))
			}
			return
		}
		go func() {
			defer func() { <-sem }()
			serveMsg(b, s, m, h)
		}()
	})
}

// ErrBusyText starts the error a ServeConcurrent responder sends when it
// is at its limit.
const ErrBusyText = "responder busy"

func serveMsg[Req, Resp proto.Message](b *Bus, s *Subscription, m *nats.Msg, h func(context.Context, Req) (Resp, error)) {
	b.metrics.Received.Inc()
	if m.Reply == "" {
		s.badPayload(m.Subject, errors.New("request without a reply subject"))
		return
	}
	req, err := Decode[Req](m.Data)
	if err != nil {
		s.badPayload(m.Subject, err)
		b.respondErr(m, err.Error())
		return
	}
	resp, err := h(b.ctx, req)
	if err != nil {
		b.respondErr(m, err.Error())
		return
	}
	bp, err := b.marshal(m.Reply, resp)
	if err != nil {
		b.log.Warn("cannot send reply", "subject", m.Subject, "err", err)
		b.respondErr(m, err.Error())
		return
	}
	defer b.release(bp)
	if err := b.nc.Publish(m.Reply, *bp); err != nil {
		b.log.Warn("cannot send reply", "subject", m.Subject, "err", err)
		return
	}
	b.metrics.Published.Inc()
}

func (b *Bus) respondErr(m *nats.Msg, msg string) {
	// A header value is one line.
	msg = strings.Join(strings.Fields(msg), " ")
	if msg == "" {
		msg = "error"
	}
	r := nats.NewMsg(m.Reply)
	r.Header.Set(errorHeader, msg)
	if err := b.nc.PublishMsg(r); err != nil {
		b.log.Warn("cannot send error reply", "subject", m.Subject, "err", err)
	}
}
