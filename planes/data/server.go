package data

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/triplane-dev/triplane/planes/data/accept"
	"github.com/triplane-dev/triplane/planes/data/crc32c"
	"github.com/triplane-dev/triplane/planes/data/deadline"
)

// Landed reports that the bytes of one frame landed in a region and their
// checksum verified: the receiving side's completion notification.
type Landed struct {
	Transport string
	Desc      Descriptor
	CRC       uint32
}

// ServerConfig configures a TCP block receiver.
type ServerConfig struct {
	// Regions are the only memory the server writes to.
	Regions *Regions
	// Token, when set, must be the payload of the peer's first (hello)
	// frame; a peer without it is refused.
	Token string
	// TLS, when set, serves TLS; set ClientAuth to
	// tls.RequireAndVerifyClientCert for mutual TLS.
	TLS *tls.Config
	// OnLanded, when set, is called (on the connection's goroutine) for
	// every frame that landed and verified, before it is acknowledged.
	OnLanded func(Landed)
	// IdleTimeout bounds the wait for the next frame (default 5 min; a
	// value below FrameTimeout counts as FrameTimeout); FrameTimeout bounds
	// reading one frame and writing acks (default 30 s). Deadlines move
	// lazily (see package deadline): FrameTimeout may fire up to an eighth
	// late; idleness is checked in steps of FrameTimeout, so an idle
	// connection closes between IdleTimeout and IdleTimeout plus 9/8 of
	// FrameTimeout. Neither fires early.
	IdleTimeout, FrameTimeout time.Duration
	// MaxConns bounds the connections served at once (default 4096); more
	// are closed at once and counted as rejected (too_many_connections).
	// A connection must send its first frame within FrameTimeout.
	MaxConns int
	Logger   *slog.Logger
	Metrics  *Metrics
}

func (c *ServerConfig) defaults() {
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.FrameTimeout == 0 {
		c.FrameTimeout = 30 * time.Second
	}
	// The idle wait runs in steps of FrameTimeout.
	c.IdleTimeout = max(c.IdleTimeout, c.FrameTimeout)
	if c.MaxConns <= 0 {
		c.MaxConns = 4096
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
}

// rejectError is bad input from a peer: the connection is closed, the
// reason counted.
type rejectError struct {
	reason string
	err    error
}

func (e *rejectError) Error() string { return e.err.Error() }
func (e *rejectError) Unwrap() error { return e.err }

func reject(reason string, err error) error { return &rejectError{reason: reason, err: err} }

// Server receives blocks over TCP into registered regions.
type Server struct {
	cfg ServerConfig
	ln  net.Listener

	conns accept.Tracker[net.Conn]
}

// ListenTCP starts a block receiver on addr ("127.0.0.1:0" for any port).
func ListenTCP(addr string, cfg ServerConfig) (*Server, error) {
	cfg.defaults()
	if cfg.Regions == nil {
		return nil, errors.New("data: tcp server needs regions")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("data: listen tcp %s: %w", addr, err)
	}
	if cfg.TLS != nil {
		ln = tls.NewListener(ln, cfg.TLS)
	}
	s := &Server{cfg: cfg, ln: ln}
	s.conns.Start(ln.Accept, s.serve, cfg.MaxConns, func(c net.Conn) { s.cfg.tooMany("tcp", c) }, cfg.Logger, "data tcp receiver")
	return s, nil
}

// Addr is the listening address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops accepting, closes every connection and waits for them.
func (s *Server) Close() error { return s.conns.Close(s.ln) }

func (s *Server) serve(c net.Conn) {
	defer c.Close()
	if tc, ok := c.(*tls.Conn); ok {
		tc.SetDeadline(time.Now().Add(s.cfg.FrameTimeout))
		if err := tc.HandshakeContext(context.Background()); err != nil {
			refused(&s.cfg, "tcp", c.RemoteAddr(), reject("tls", fmt.Errorf("tls handshake: %w", err)))
			return
		}
		tc.SetDeadline(time.Time{})
	}
	br := bufio.NewReaderSize(c, 64<<10)
	bw := bufio.NewWriterSize(c, 16<<10)
	err := s.handle(br, bw, c)
	if err == nil {
		return
	}
	var rj *rejectError
	if errors.As(err, &rj) {
		// Count first, so a peer that sees the refusal sees it counted;
		// then tell the peer why, best effort, and close.
		refused(&s.cfg, "tcp", c.RemoteAddr(), err)
		c.SetWriteDeadline(time.Now().Add(time.Second))
		writeMessage(bw, FrameError, err.Error())
		bw.Flush()
		return
	}
	s.cfg.Logger.Info("data: tcp receiver connection ended", "peer", c.RemoteAddr(), "err", err)
}

// tooMany closes, counts and logs a connection over the MaxConns limit.
func (cfg *ServerConfig) tooMany(transport string, c net.Conn) {
	peer := c.RemoteAddr()
	c.Close()
	cfg.Metrics.rejected.WithLabelValues(transport, "too_many_connections").Inc()
	cfg.Logger.Warn("data: closing a connection: at the connection limit", "transport", transport, "peer", peer, "max_conns", cfg.MaxConns)
}

func refused(cfg *ServerConfig, transport string, peer net.Addr, err error) {
	var rj *rejectError
	reason := "other"
	if errors.As(err, &rj) {
		reason = rj.reason
	}
	cfg.Metrics.rejected.WithLabelValues(transport, reason).Inc()
	cfg.Logger.Warn("data: closing connection on bad input", "transport", transport, "peer", peer, "reason", reason, "err", err)
}

// writeMessage writes a hello or error frame.
func writeMessage(w io.Writer, t FrameType, msg string) error {
	if len(msg) > maxMessage {
		msg = msg[:maxMessage]
	}
	var hdr [HeaderSize]byte
	Header{Type: t, Length: uint32(len(msg))}.Encode(hdr[:])
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := io.WriteString(w, msg)
	return err
}

// readBlocks reads frame h's payload straight into dst (no staging buffer
// for payloads at least as large as br's buffer) and checks every block's
// checksum, computed piece by piece as the bytes arrive, while they are
// still in cache. A block whose checksum differs fails the frame: nothing
// of it is acknowledged, so the sender resends it.
func readBlocks(br *bufio.Reader, h Header, dst []byte, blocks []blockSum) error {
	k := 0                  // the block being read
	end := int(blocks[0].n) // where it ends in dst
	var crc uint32
	for off := 0; off < len(dst); {
		// Reads of at most 256 KiB: each piece is checksummed while it
		// is still in cache (a whole 1 MiB+ read would be evicted
		// first).
		n, err := br.Read(dst[off:min(off+256<<10, len(dst))])
		for p := off; p < off+n; {
			q := min(off+n, end)
			crc = crc32c.Update(crc, dst[p:q])
			p = q
			if p < end {
				continue
			}
			if crc != blocks[k].crc {
				d := h.Desc()
				d.Offset += uint64(end) - uint64(blocks[k].n)
				d.Length = uint64(blocks[k].n)
				return reject("checksum", fmt.Errorf("%s frame %d: block %d (%s): checksum %#x, frame says %#x", h.Type, h.Seq, k, d, crc, blocks[k].crc))
			}
			crc = 0
			if k++; k < len(blocks) {
				end += int(blocks[k].n)
			}
		}
		off += n
		if err != nil && off < len(dst) {
			if errors.Is(err, io.EOF) {
				return reject("length", fmt.Errorf("%s frame %d: %s: payload ended after %d bytes: %w", h.Type, h.Seq, h.Desc(), off, io.ErrUnexpectedEOF))
			}
			return fmt.Errorf("%s frame %d: read payload: %w", h.Type, h.Seq, err)
		}
	}
	return nil
}

// await waits for the next frame and reads its header, under rdl: the
// wait for its first byte goes on in steps of FrameTimeout until the
// connection has been idle for IdleTimeout; the rest of the frame then has
// at least FrameTimeout. A clean end of the connection at a frame boundary
// is io.EOF.
func (g *handshake) await(br *bufio.Reader, hdr []byte, rdl *deadline.Lazy, cfg *ServerConfig) (Header, error) {
	if br.Buffered() > 0 {
		rdl.Extend(time.Now(), cfg.FrameTimeout)
	} else {
		start := time.Now()
		for {
			// Extended before each wait: the frame's payload then has at
			// least FrameTimeout from its first byte's wait.
			rdl.Extend(time.Now(), cfg.FrameTimeout)
			_, err := br.Peek(1)
			if err == nil {
				break
			}
			if errors.Is(err, io.EOF) {
				return Header{}, io.EOF
			}
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				return Header{}, fmt.Errorf("read frame header: %w", err)
			}
			limit := cfg.IdleTimeout
			if g.first {
				// Nothing yet, not even a hello: an unauthenticated
				// connection holds a slot (MaxConns) only so long.
				limit = cfg.FrameTimeout
			}
			if idle := time.Since(start); idle >= limit {
				return Header{}, fmt.Errorf("no frame for %s: %w", idle.Round(time.Millisecond), err)
			}
		}
	}
	return g.next(br, hdr)
}

// deadliner is the part of a connection handle uses; nil in the fuzz test.
type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// handle runs the receive loop of one connection. It returns nil when the
// peer closed between frames, a *rejectError on bad input, and other
// errors for I/O failures.
//
// The loop reads a payload straight into its block, checksumming each
// piece as it arrives (while it is in cache), compares the checksum,
// reports the block landed and acknowledges it. A block is acknowledged
// only after its checksum matched. Acks are cumulative (an ack for frame n
// covers every frame of the connection up to n) and written once the
// frames read so far are verified, before a read that may wait: one ack
// per batch the sender wrote, not one per frame.
func (s *Server) handle(br *bufio.Reader, bw *bufio.Writer, dl deadliner) error {
	cfg := &s.cfg
	// Looked up once: a label lookup per frame shows at small blocks.
	landedBytes := cfg.Metrics.bytesLanded.WithLabelValues("tcp")
	landedFrames := cfg.Metrics.framesLanded.WithLabelValues("tcp")
	var hdr, ack [HeaderSize]byte
	var last Header // last frame verified and not yet acknowledged
	unacked := false
	var blocks []blockSum // the frame's blocks; reused
	g := newHandshake(cfg.Token)
	var rdl, wdl deadline.Lazy
	if dl != nil {
		rdl.Set, wdl.Set = dl.SetReadDeadline, dl.SetWriteDeadline
	}
	for {
		if unacked && br.Buffered() < HeaderSize {
			last.ack().Encode(ack[:])
			wdl.Extend(time.Now(), cfg.FrameTimeout)
			bw.Write(ack[:])
			if err := bw.Flush(); err != nil {
				return fmt.Errorf("write ack: %w", err)
			}
			unacked = false
		}
		h, err := g.await(br, hdr[:], &rdl, cfg)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch h.Type {
		case FrameHello:
			if err := g.hello(br, h); err != nil {
				return err
			}
		case FrameData, FrameBlocks:
			blocks = append(blocks[:0], blockSum{n: h.Length, crc: h.CRC})
			if h.Type == FrameBlocks {
				if blocks, err = readBlockTable(br, h, blocks); err != nil {
					return err
				}
			}
			dst, err := cfg.Regions.Slice(h.Desc())
			if err != nil {
				return reject("out_of_region", err)
			}
			if err := readBlocks(br, h, dst, blocks); err != nil {
				return err
			}
			landedBytes.Add(float64(h.Length))
			landedFrames.Inc()
			if cfg.OnLanded != nil {
				d := h.Desc()
				for _, b := range blocks {
					d.Length = uint64(b.n)
					cfg.OnLanded(Landed{Transport: "tcp", Desc: d, CRC: b.crc})
					d.Offset += d.Length
				}
			}
			last, unacked = h, true
		default:
			return reject("unexpected", fmt.Errorf("data: unexpected %s frame from a sender", h.Type))
		}
	}
}
