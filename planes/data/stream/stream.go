// Package stream carries response streams over the data plane: a worker
// sends the tokens of one request to the frontend as ordered frames, ending
// with a final frame that says why (a reason such as "stop", or an error).
// Cancellation goes both ways: the frontend going away (Close, its context
// ending, its connection dropping) cancels the worker's producer; the
// worker stopping ends the stream with an error frame.
//
// Wire format, on TCP (optionally TLS): each frame is a 4-byte little
// endian length and that many bytes of protobuf: StreamClientFrame from the
// frontend (open, then optionally cancel), StreamFrame from the worker.
package stream

import (
	"bufio"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/accept"
	"github.com/triplane-dev/triplane/planes/data/deadline"
	"github.com/triplane-dev/triplane/promreg"
)

// MaxFrame bounds one frame's protobuf bytes.
const MaxFrame = 4 << 20

// ErrBadFrame: bytes that are not a valid stream frame.
var ErrBadFrame = errors.New("stream: malformed frame")

// readFrame reads one length-prefixed protobuf frame into m.
func readFrame(r io.Reader, m proto.Message) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return err
	}
	size := binary.LittleEndian.Uint32(n[:])
	if size > MaxFrame {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadFrame, size, MaxFrame)
	}
	// The buffer grows with the bytes that arrive, 64 KiB first, then
	// doubling up to size: a length prefix alone does not hold MaxFrame of
	// memory, and a real frame is read in a few steps.
	b := make([]byte, min(int(size), 64<<10))
	got, err := io.ReadFull(r, b)
	for err == nil && got < int(size) {
		b = append(b, make([]byte, min(int(size), 2*len(b))-len(b))...)
		var k int
		k, err = io.ReadFull(r, b[got:])
		got += k
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%w: %d-byte frame cut short: %v", ErrBadFrame, size, err)
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return fmt.Errorf("%w: %v", ErrBadFrame, err)
	}
	return nil
}

// writeFrame writes m length-prefixed.
func writeFrame(w io.Writer, m proto.Message) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > MaxFrame {
		return fmt.Errorf("stream: frame of %d bytes exceeds %d", len(b), MaxFrame)
	}
	out := make([]byte, 4+len(b))
	binary.LittleEndian.PutUint32(out, uint32(len(b)))
	copy(out[4:], b)
	_, err = w.Write(out)
	return err
}

// Metrics counts streams.
type Metrics struct {
	opened, frames, cancelledByClient, refused prometheus.Counter
}

// NewMetrics creates the metrics, registered with reg unless nil.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	c := func(name, help string) prometheus.Counter {
		return promreg.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "stream", Name: name, Help: help}))
	}
	return &Metrics{
		opened:            c("opened_total", "Response streams opened."),
		frames:            c("frames_sent_total", "Response frames sent (final frames included)."),
		cancelledByClient: c("cancelled_by_client_total", "Streams whose frontend went away before the end."),
		refused:           c("refused_total", "Stream connections closed on bad input, failed authentication or at the connection limit."),
	}
}

// Refused returns how many connections were refused (for tests).
func (m *Metrics) Refused() float64 { return counterValue(m.refused) }

// Handler produces one response: it calls send for each frame in order and
// returns the final reason, or an error. ctx ends when the frontend goes
// away or the server closes; the handler must then stop.
type Handler func(ctx context.Context, open *triplanev1.StreamOpen, send func(data []byte) error) (reason string, err error)

// ServerConfig configures a stream server.
type ServerConfig struct {
	Handler Handler
	// Token, when set, must be in the open frame.
	Token string
	// TLS, when set, serves TLS (ClientAuth for mutual TLS).
	TLS *tls.Config
	// OpenTimeout bounds the wait for the open frame; WriteTimeout a frame
	// write (a frontend that stops reading is cut off; it may fire up to an
	// eighth late, see package deadline). Defaults 10 s.
	OpenTimeout, WriteTimeout time.Duration
	// KeepAlive is how long a stream may be silent before the server sends
	// a keep-alive frame (seq 0, no data), so a frontend's IdleTimeout
	// tells a slow producer from a stuck one. Default 5 s; negative: none.
	KeepAlive time.Duration
	// ErrorCode, when set, classifies a handler's error into the final
	// frame's code, so clients need not parse error text.
	ErrorCode func(error) string
	// MaxConns bounds the connections served at once, open or opening
	// (default 4096); more get a final frame with ErrTooManyStreams (its
	// ErrorCode) and are counted as refused.
	MaxConns int
	Logger   *slog.Logger
	Metrics  *Metrics
}

// Server serves response streams.
type Server struct {
	cfg    ServerConfig
	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	conns  accept.Tracker[net.Conn]
	// refusing are goroutines writing a refusal at the connection limit.
	refusing atomic.Int64
}

// maxRefusing bounds the goroutines writing refusals at once.
const maxRefusing = 64

// ErrTooManyStreams: the server was at its connection limit (MaxConns).
// The final frame's code is ErrorCode's for it, so a producer can call it
// overloaded (a healthy server, busy) rather than failed.
var ErrTooManyStreams = errors.New("stream: the server is at its connection limit")

// Listen starts a stream server on addr.
func Listen(addr string, cfg ServerConfig) (*Server, error) {
	if cfg.Handler == nil {
		return nil, errors.New("stream: server needs a handler")
	}
	if cfg.OpenTimeout == 0 {
		cfg.OpenTimeout = 10 * time.Second
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 5 * time.Second
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("stream: listen %s: %w", addr, err)
	}
	if cfg.TLS != nil {
		ln = tls.NewListener(ln, cfg.TLS)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, ln: ln, ctx: ctx, cancel: cancel}
	s.conns.Start(ln.Accept, s.serve, cfg.MaxConns, s.full, cfg.Logger, "stream server")
	return s, nil
}

// Addr is the listening address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close cancels every running handler (their streams end with an error
// frame), stops accepting and waits.
func (s *Server) Close() error {
	s.cancel()
	return s.conns.Stop(s.ln)
}

// full answers a connection over the limit with a final frame saying so,
// off the accept loop (a TLS handshake may wait), by at most maxRefusing
// goroutines at once; beyond them the connection closes without a word.
func (s *Server) full(c net.Conn) {
	s.cfg.Metrics.refused.Inc()
	s.cfg.Logger.Warn("stream: refusing a connection: at the connection limit", "peer", c.RemoteAddr(), "max_conns", s.cfg.MaxConns)
	if s.refusing.Add(1) > maxRefusing {
		s.refusing.Add(-1)
		c.Close()
		return
	}
	s.conns.Go(func() {
		defer s.refusing.Add(-1)
		s.refuse(c, ErrTooManyStreams)
	})
}

// refuse answers a connection with a final frame carrying err (and its
// code), then closes it once the client's bytes are read: closing on
// unread bytes resets the connection, and the client could lose the
// frame.
func (s *Server) refuse(c net.Conn, err error) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	// Close does not wait out the second: it ends the refusal at once.
	defer context.AfterFunc(s.ctx, func() { c.SetDeadline(time.Unix(1, 0)) })()
	f := &triplanev1.StreamFrame{Final: true, Error: err.Error()}
	if s.cfg.ErrorCode != nil {
		f.Code = s.cfg.ErrorCode(err)
	}
	if writeFrame(c, f) != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	io.Copy(io.Discard, io.LimitReader(c, MaxFrame))
}

// refuseBad counts, logs and refuses a connection that sent bad input.
func (s *Server) refuseBad(c net.Conn, err error) {
	s.cfg.Metrics.refused.Inc()
	s.cfg.Logger.Warn("stream: closing connection on bad input", "peer", c.RemoteAddr(), "err", err)
	s.refuse(c, err)
}

func (s *Server) serve(c net.Conn) {
	defer c.Close()
	// Closing the server unblocks reads (a frontend that never sends its
	// open frame does not hold Close up).
	defer context.AfterFunc(s.ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })()
	c.SetReadDeadline(time.Now().Add(s.cfg.OpenTimeout))
	br := bufio.NewReader(c)
	var first triplanev1.StreamClientFrame
	if err := readFrame(br, &first); err != nil {
		s.refuseBad(c, fmt.Errorf("stream: open frame: %w", err))
		return
	}
	open := first.GetOpen()
	if open == nil {
		s.refuseBad(c, fmt.Errorf("%w: first frame is not an open", ErrBadFrame))
		return
	}
	if s.cfg.Token != "" && subtle.ConstantTimeCompare([]byte(open.Token), []byte(s.cfg.Token)) != 1 {
		s.refuseBad(c, errors.New("stream: wrong token"))
		return
	}
	c.SetReadDeadline(time.Time{})
	s.cfg.Metrics.opened.Inc()
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	// The frontend's side: a cancel frame, EOF or a broken connection
	// cancels the producer.
	go func() {
		var f triplanev1.StreamClientFrame
		err := readFrame(br, &f)
		switch {
		case err == nil && f.GetCancel() != nil:
			err = fmt.Errorf("stream: frontend cancelled: %s", f.GetCancel().GetReason())
		case err == nil:
			err = fmt.Errorf("%w: unexpected frame after open", ErrBadFrame)
		default:
			err = fmt.Errorf("stream: frontend went away: %w", err)
		}
		cancel(err)
	}()
	var seq uint64
	var wmu sync.Mutex
	wdl := deadline.Lazy{Set: c.SetWriteDeadline} // under wmu
	lastWrite := time.Now()
	finished := false // the final frame went out: no keep-alive after it
	write := func(f *triplanev1.StreamFrame) error {
		wmu.Lock()
		defer wmu.Unlock()
		seq++
		f.Seq = seq
		lastWrite = time.Now()
		finished = finished || f.Final
		wdl.Extend(lastWrite, s.cfg.WriteTimeout)
		if err := writeFrame(c, f); err != nil {
			cancel(fmt.Errorf("stream: frontend went away: %w", err))
			return err
		}
		s.cfg.Metrics.frames.Inc()
		return nil
	}
	send := func(data []byte) error {
		if err := context.Cause(ctx); err != nil {
			return err
		}
		return write(&triplanev1.StreamFrame{Data: data})
	}
	if s.cfg.KeepAlive > 0 && open.KeepAlives {
		// A keep-alive takes no sequence number; it goes out once nothing
		// was written for KeepAlive (checked every half interval, so the
		// gap between two frames stays under 1.5 KeepAlive). Only clients
		// that ask get them: an older client would take one for a frame
		// out of order.
		t := time.NewTicker(s.cfg.KeepAlive / 2)
		defer t.Stop()
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				wmu.Lock()
				if time.Since(lastWrite) >= s.cfg.KeepAlive && !finished {
					wdl.Extend(time.Now(), s.cfg.WriteTimeout)
					if err := writeFrame(c, &triplanev1.StreamFrame{}); err != nil {
						wmu.Unlock()
						cancel(fmt.Errorf("stream: frontend went away: %w", err))
						return
					}
					lastWrite = time.Now()
				}
				wmu.Unlock()
			}
		}()
	}
	reason, err := s.cfg.Handler(ctx, open, send)
	if cause := context.Cause(ctx); cause != nil && s.ctx.Err() == nil {
		// The frontend is gone; nobody reads a final frame.
		s.cfg.Metrics.cancelledByClient.Inc()
		s.cfg.Logger.Info("stream: frontend went away, producer stopped", "request", open.RequestId, "cause", cause)
		return
	}
	final := &triplanev1.StreamFrame{Final: true, Reason: reason}
	if err != nil {
		final.Error = err.Error()
		if s.cfg.ErrorCode != nil {
			final.Code = s.cfg.ErrorCode(err)
		}
	} else if s.ctx.Err() != nil {
		final.Error = "stream: worker shutting down"
	}
	write(final)
}

// Stream is the frontend's end of one response stream.
type Stream struct {
	idle time.Duration
	rdl  deadline.Lazy // of c, used by Recv only
	c    net.Conn
	br   *bufio.Reader
	seq  uint64
	done atomic.Bool
	stop func() bool
	once sync.Once
}

// ClientOptions configures Open.
type ClientOptions struct {
	Token string
	TLS   *tls.Config
	// IdleTimeout bounds the wait for the next frame, keep-alives included
	// (default: none; ctx ends the stream; it may fire up to an eighth
	// late, never early). Setting it asks the server for
	// keep-alives; set it above 1.5 times the server's KeepAlive.
	IdleTimeout time.Duration
}

// Open starts a stream for open at the worker at addr. Ending ctx closes
// the stream, which cancels the producer.
func Open(ctx context.Context, addr string, open *triplanev1.StreamOpen, o ClientOptions) (*Stream, error) {
	d := net.Dialer{}
	var c net.Conn
	var err error
	if o.TLS != nil {
		c, err = (&tls.Dialer{NetDialer: &d, Config: o.TLS}).DialContext(ctx, "tcp", addr)
	} else {
		c, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("stream: dial %s: %w", addr, err)
	}
	o2 := proto.Clone(open).(*triplanev1.StreamOpen)
	o2.Token = o.Token
	o2.KeepAlives = o.IdleTimeout > 0
	if err := writeFrame(c, &triplanev1.StreamClientFrame{Kind: &triplanev1.StreamClientFrame_Open{Open: o2}}); err != nil {
		c.Close()
		return nil, fmt.Errorf("stream: open %s: %w", addr, err)
	}
	s := &Stream{c: c, br: bufio.NewReader(c), idle: o.IdleTimeout, rdl: deadline.Lazy{Set: c.SetReadDeadline}}
	// The callback must not read s.stop: with ctx already done it runs at
	// once, racing this assignment.
	s.stop = context.AfterFunc(ctx, s.closeConn)
	return s, nil
}

// Recv returns the next frame. The final frame is returned once (check
// Final, Reason, Error); after it Recv returns io.EOF. Frames out of order
// are an error.
func (s *Stream) Recv() (*triplanev1.StreamFrame, error) {
	if s.done.Load() {
		return nil, io.EOF
	}
	var f triplanev1.StreamFrame
	for {
		if s.idle > 0 {
			s.rdl.Extend(time.Now(), s.idle)
		}
		if err := readFrame(s.br, &f); err != nil {
			s.done.Store(true)
			s.Close()
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, fmt.Errorf("stream: no frame from the worker for %s (not even a keep-alive): %w", s.idle, err)
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("stream: worker connection ended before the final frame: %w", err)
		}
		if f.Seq != 0 || f.Final || len(f.Data) > 0 {
			break
		}
		// A keep-alive: the worker is there, the producer is slow.
	}
	if f.Seq != s.seq+1 && !(f.Final && f.Seq == 0) {
		s.done.Store(true)
		s.Close()
		return nil, fmt.Errorf("stream: frame %d after %d", f.Seq, s.seq)
	}
	s.seq = f.Seq
	if f.Final {
		s.done.Store(true)
		s.Close()
	}
	return &f, nil
}

// Close tells the worker the frontend is gone (cancelling the producer)
// and closes the connection.
func (s *Stream) Close() error {
	s.stop()
	s.closeConn()
	return nil
}

func (s *Stream) closeConn() {
	s.once.Do(func() {
		if !s.done.Load() {
			s.c.SetWriteDeadline(time.Now().Add(time.Second))
			writeFrame(s.c, &triplanev1.StreamClientFrame{Kind: &triplanev1.StreamClientFrame_Cancel{Cancel: &triplanev1.StreamCancel{Reason: "frontend closed the stream"}}})
		}
		s.c.Close()
	})
}
