package event

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// Errors callers branch on.
var (
	// ErrTooLarge: the encoded payload exceeds the server's max payload; it
	// was not sent. Large payloads belong on the data plane.
	ErrTooLarge = errors.New("event: payload larger than the server's max payload")
	// ErrNoResponders: nobody subscribes to the request subject.
	ErrNoResponders = errors.New("event: no responders on the request subject")
	// ErrTimeout: no reply before the deadline.
	ErrTimeout = errors.New("event: request timed out")
	// ErrCanceled: the caller canceled the request's context.
	ErrCanceled = errors.New("event: request canceled")
	// ErrDisconnected: the connection to NATS was lost before or while the
	// request waited for its reply.
	ErrDisconnected = errors.New("event: disconnected from the NATS server")
	// ErrMalformed: a payload that does not decode as the expected message.
	ErrMalformed = errors.New("event: malformed payload")
	// ErrBadSubject: a subject token that is empty or holds '.', '*', '>' or
	// whitespace.
	ErrBadSubject = errors.New("event: bad subject token")
	// ErrClosed: the bus was closed.
	ErrClosed = errors.New("event: bus closed")
)

// RemoteError is an error a responder's handler returned, carried back in
// the reply.
type RemoteError struct {
	Subject string
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("event: responder on %s: %s", e.Subject, e.Message)
}

// errorHeader carries a responder's error in a reply.
const errorHeader = "Triplane-Error"

// Config configures a Bus.
type Config struct {
	// Prefix starts every subject; default "triplane".
	Prefix string
	// Registerer receives the plane's metrics; nil keeps them private (read
	// them through Bus.Metrics).
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// PendingMsgs and PendingBytes bound each subscription's queue of
	// messages not yet handled; beyond them NATS drops messages and the
	// drop is counted. Defaults 65536 messages, 64 MiB.
	PendingMsgs, PendingBytes int
	// MalformedLogInterval is the least time between two log lines about
	// malformed payloads on one subscription; default 10 s.
	MalformedLogInterval time.Duration
	// RequestTimeout bounds a request whose context has no deadline, and
	// the server's confirmation of a new subscription; default 5 s.
	RequestTimeout time.Duration
}

// Bus is the typed event plane over one NATS connection. It installs the
// connection's error and disconnect handlers (chaining the ones already
// set) to count slow consumers and fail in-flight requests when the
// connection drops.
type Bus struct {
	nc      *nats.Conn
	cfg     Config
	log     *slog.Logger
	metrics *Metrics

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc

	mu       sync.Mutex
	subs     map[*nats.Subscription]*Subscription
	inflight map[uint64]context.CancelCauseFunc
	nextReq  uint64
	closed   bool

	prevErr  nats.ErrHandler
	prevDisc nats.ConnErrHandler

	bufs sync.Pool
}

// New wraps a connection.
func New(nc *nats.Conn, cfg Config) (*Bus, error) {
	if nc == nil {
		return nil, errors.New("event: nil NATS connection")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "triplane"
	}
	if err := checkToken(cfg.Prefix); err != nil {
		return nil, fmt.Errorf("event: prefix: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PendingMsgs <= 0 {
		cfg.PendingMsgs = 65536
	}
	if cfg.PendingBytes <= 0 {
		cfg.PendingBytes = 64 << 20
	}
	if cfg.MalformedLogInterval <= 0 {
		cfg.MalformedLogInterval = 10 * time.Second
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	b := &Bus{
		nc: nc, cfg: cfg, log: cfg.Logger.With("plane", "event"), metrics: m,
		subs:     map[*nats.Subscription]*Subscription{},
		inflight: map[uint64]context.CancelCauseFunc{},
		prevErr:  nc.ErrorHandler(),
		prevDisc: nc.DisconnectErrHandler(),
	}
	b.bufs.New = func() any { s := make([]byte, 0, 512); return &s }
	b.ctx, b.cancel = context.WithCancel(context.Background())
	nc.SetErrorHandler(b.onAsyncError)
	nc.SetDisconnectErrHandler(b.onDisconnect)
	return b, nil
}

// Conn is the underlying connection.
func (b *Bus) Conn() *nats.Conn { return b.nc }

// Prefix is the first token of every subject.
func (b *Bus) Prefix() string { return b.cfg.Prefix }

// Metrics are the bus's counters.
func (b *Bus) Metrics() *Metrics { return b.metrics }

// Logger is the bus's logger.
func (b *Bus) Logger() *slog.Logger { return b.log }

// MaxPayload is the largest payload the server accepts, in bytes.
func (b *Bus) MaxPayload() int64 { return b.nc.MaxPayload() }

// Close unsubscribes every subscription made through the bus and fails the
// requests in flight with ErrClosed. The connection stays open: its owner
// closes it.
func (b *Bus) Close() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.closed = true
	subs := b.subs
	b.subs = map[*nats.Subscription]*Subscription{}
	inflight := b.inflight
	b.inflight = map[uint64]context.CancelCauseFunc{}
	b.mu.Unlock()
	b.cancel()
	for _, s := range subs {
		_ = s.sub.Unsubscribe()
		s.countDropped()
	}
	for _, c := range inflight {
		c(ErrClosed)
	}
}

// Subject builds <prefix>.<namespace>.<component>.<rest...>, checking that
// every part is one subject token.
func (b *Bus) Subject(namespace, component string, rest ...string) (string, error) {
	parts := append([]string{b.cfg.Prefix, namespace, component}, rest...)
	for _, p := range parts {
		if err := checkToken(p); err != nil {
			return "", fmt.Errorf("event: subject %q: %w", strings.Join(parts, "."), err)
		}
	}
	return strings.Join(parts, "."), nil
}

// MustSubject is Subject for parts known to be valid; it panics otherwise.
func (b *Bus) MustSubject(namespace, component string, rest ...string) string {
	s, err := b.Subject(namespace, component, rest...)
	if err != nil {
		panic(err)
	}
	return s
}

// CheckToken reports whether s can be one subject token.
func CheckToken(s string) error { return checkToken(s) }

func checkToken(s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty", ErrBadSubject)
	}
	if strings.ContainsAny(s, ".*> \t\r\n") {
		return fmt.Errorf("%w: %q holds '.', '*', '>' or whitespace", ErrBadSubject, s)
	}
	return nil
}

func (b *Bus) onAsyncError(nc *nats.Conn, sub *nats.Subscription, err error) {
	if errors.Is(err, nats.ErrSlowConsumer) {
		b.metrics.SlowConsumers.Inc()
		if sub != nil {
			b.mu.Lock()
			s := b.subs[sub]
			b.mu.Unlock()
			if s != nil {
				s.countDropped()
				s.slowEpisodes.Add(1)
			}
			b.log.Warn("slow consumer: messages dropped", "subject", sub.Subject)
		}
	}
	if b.prevErr != nil {
		b.prevErr(nc, sub, err)
	}
}

func (b *Bus) onDisconnect(nc *nats.Conn, err error) {
	b.mu.Lock()
	inflight := b.inflight
	b.inflight = map[uint64]context.CancelCauseFunc{}
	b.mu.Unlock()
	for _, c := range inflight {
		c(ErrDisconnected)
	}
	if b.prevDisc != nil {
		b.prevDisc(nc, err)
	}
}

// marshal encodes m into a pooled buffer and checks it against the max
// payload. The caller hands the buffer back with b.release once the bytes
// are no longer needed (nats.go copies them on publish).
func (b *Bus) marshal(subject string, m proto.Message) (*[]byte, error) {
	bp := b.bufs.Get().(*[]byte)
	data, err := proto.MarshalOptions{}.MarshalAppend((*bp)[:0], m)
	*bp = data
	if err != nil {
		b.release(bp)
		return nil, fmt.Errorf("event: encode %T for %s: %w", m, subject, err)
	}
	if err := b.checkSize(subject, len(data)); err != nil {
		b.release(bp)
		return nil, err
	}
	return bp, nil
}

func (b *Bus) release(bp *[]byte) {
	if cap(*bp) <= 1<<20 { // keep pooled buffers small
		*bp = (*bp)[:0]
		b.bufs.Put(bp)
	}
}

func (b *Bus) checkSize(subject string, n int) error {
	if max := b.nc.MaxPayload(); max > 0 && int64(n) > max {
		b.metrics.TooLarge.Inc()
		return fmt.Errorf("%w: %d bytes on %s, the server accepts at most %d bytes; send large payloads over the data plane",
			ErrTooLarge, n, subject, max)
	}
	return nil
}

// Publish sends msg to every subscriber of subject (core NATS: at most
// once, nothing kept).
func Publish[T proto.Message](b *Bus, subject string, msg T) error {
	bp, err := b.marshal(subject, msg)
	if err != nil {
		return err
	}
	err = b.nc.Publish(subject, *bp)
	b.release(bp)
	if err != nil {
		return fmt.Errorf("event: publish on %s: %w", subject, err)
	}
	b.metrics.Published.Inc()
	return nil
}

// Decode decodes one payload as T; the error wraps ErrMalformed.
func Decode[T proto.Message](data []byte) (T, error) {
	m := newMessage[T]()
	if err := proto.Unmarshal(data, m); err != nil {
		var zero T
		return zero, fmt.Errorf("%w: not a %s: %v", ErrMalformed, m.ProtoReflect().Descriptor().FullName(), err)
	}
	return m, nil
}

// newMessage allocates a T. Generated messages are pointers to structs, so
// reflect.New of the element type is the cheap way (the protoreflect
// Type().New() path costs a few hundred ns more per message).
func newMessage[T proto.Message]() T {
	if t := reflect.TypeFor[T](); t.Kind() == reflect.Pointer {
		return reflect.New(t.Elem()).Interface().(T)
	}
	var zero T
	return zero.ProtoReflect().Type().New().Interface().(T)
}

// Subscription is a typed subscription made through a Bus.
type Subscription struct {
	b *Bus
	// subject is what was subscribed to: set before the handler can run
	// (sub is set only once the server confirmed the subscription, and
	// messages may arrive before that).
	subject       string
	sub           *nats.Subscription
	malformed     prometheus.Counter
	malformedN    atomic.Uint64
	lastLog       atomic.Int64 // unix nanos of the last malformed log line
	loggedN       atomic.Uint64
	dropped       atomic.Int64 // drops already counted
	slowEpisodes  atomic.Uint64
	droppedReport sync.Mutex
}

// Subject is the subscribed subject (possibly with wildcards).
func (s *Subscription) Subject() string { return s.subject }

// Malformed is the number of payloads dropped because they did not decode.
func (s *Subscription) Malformed() uint64 { return s.malformedN.Load() }

// Dropped is the number of messages NATS dropped because the subscriber
// fell behind its pending limits.
func (s *Subscription) Dropped() int {
	n, err := s.sub.Dropped()
	if err != nil {
		return int(s.dropped.Load())
	}
	return n
}

// SlowConsumerEvents is how many times the subscriber was reported slow.
func (s *Subscription) SlowConsumerEvents() uint64 { return s.slowEpisodes.Load() }

// Unsubscribe stops delivery at once.
func (s *Subscription) Unsubscribe() error {
	s.countDropped()
	s.b.mu.Lock()
	delete(s.b.subs, s.sub)
	s.b.mu.Unlock()
	return s.sub.Unsubscribe()
}

// Drain stops interest and lets the messages already received be handled.
func (s *Subscription) Drain() error {
	s.countDropped()
	s.b.mu.Lock()
	delete(s.b.subs, s.sub)
	s.b.mu.Unlock()
	return s.sub.Drain()
}

// countDropped adds the drops NATS reports since the last count to the
// dropped-messages counter.
func (s *Subscription) countDropped() {
	s.droppedReport.Lock()
	defer s.droppedReport.Unlock()
	n, err := s.sub.Dropped()
	if err != nil {
		return
	}
	if d := int64(n) - s.dropped.Load(); d > 0 {
		s.b.metrics.Dropped.Add(float64(d))
		s.dropped.Store(int64(n))
	}
}

// badPayload counts a malformed payload and logs it at most once per
// interval, with how many were dropped since the last line.
func (s *Subscription) badPayload(subject string, err error) {
	s.malformed.Inc()
	n := s.malformedN.Add(1)
	now := time.Now().UnixNano()
	last := s.lastLog.Load()
	if last != 0 && time.Duration(now-last) < s.b.cfg.MalformedLogInterval {
		return
	}
	if !s.lastLog.CompareAndSwap(last, now) {
		return
	}
	prev := s.loggedN.Swap(n)
	s.b.log.Warn("dropping malformed payloads", "subject", subject, "subscription", s.subject,
		"dropped_since_last_log", n-prev, "err", err)
}

func (b *Bus) subscribe(subject, queue string, cb func(s *Subscription, m *nats.Msg)) (*Subscription, error) {
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	s := &Subscription{b: b, subject: subject, malformed: b.metrics.Malformed.WithLabelValues(subject)}
	handler := func(m *nats.Msg) { cb(s, m) }
	var (
		sub *nats.Subscription
		err error
	)
	if queue == "" {
		sub, err = b.nc.Subscribe(subject, handler)
	} else {
		sub, err = b.nc.QueueSubscribe(subject, queue, handler)
	}
	if err != nil {
		return nil, fmt.Errorf("event: subscribe to %s: %w", subject, err)
	}
	if err := sub.SetPendingLimits(b.cfg.PendingMsgs, b.cfg.PendingBytes); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("event: pending limits on %s: %w", subject, err)
	}
	// nats.go sends the subscription to the server in the background: a
	// message another connection publishes right after Subscribe returned
	// could find no interest yet and vanish uncounted (a test found it
	// under load). One round trip makes "subscribed" mean the server has
	// it. While reconnecting there is no server to ask; the client sends
	// its subscriptions again on reconnect.
	if b.nc.IsConnected() {
		if err := b.nc.FlushTimeout(b.cfg.RequestTimeout); err != nil {
			_ = sub.Unsubscribe()
			return nil, fmt.Errorf("event: subscribe to %s: the server did not confirm: %w", subject, err)
		}
	}
	s.sub = sub
	b.mu.Lock()
	if b.closed {
		// Close ran meanwhile and unsubscribed what it found: this one
		// was not there yet.
		b.mu.Unlock()
		_ = sub.Unsubscribe()
		return nil, ErrClosed
	}
	b.subs[sub] = s
	b.mu.Unlock()
	return s, nil
}

// Subscribe calls h with every message published on subject (wildcards
// allowed). h runs on the subscription's goroutine, one message at a time;
// malformed payloads never reach it. When it returns (connected), the
// server has the subscription: what is published afterwards is delivered.
func Subscribe[T proto.Message](b *Bus, subject string, h func(T)) (*Subscription, error) {
	return QueueSubscribe(b, subject, "", h)
}

// QueueSubscribe is Subscribe in a queue group: each message goes to one
// member of the group.
func QueueSubscribe[T proto.Message](b *Bus, subject, queue string, h func(T)) (*Subscription, error) {
	return b.subscribe(subject, queue, func(s *Subscription, m *nats.Msg) {
		b.metrics.Received.Inc()
		v, err := Decode[T](m.Data)
		if err != nil {
			s.badPayload(m.Subject, err)
			return
		}
		h(v)
	})
}
