package data

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/accept"
	"github.com/triplane-dev/triplane/planes/data/crc32c"
	"github.com/triplane-dev/triplane/planes/data/deadline"
)

// Shared memory: the receiver serves a unix socket. A sender on the same
// host says hello (with the token), asks for each region it will write
// (map-request) and gets the region's memfd with SCM_RIGHTS, maps it, and
// from then on moves a block by copying it into the mapping and sending a
// landed frame (region, offset, length, checksum). The receiver checks the
// descriptor against its regions, verifies the checksum over its own
// mapping unless told not to, and acknowledges.

// ShmServer hands out shared regions to same-host senders and verifies
// what they report landed.
type ShmServer struct {
	cfg        ServerConfig
	skipVerify bool
	ln         *net.UnixListener
	path       string

	conns accept.Tracker[*net.UnixConn]
}

// ListenShm serves shared regions on the unix socket path (removed first if
// it exists). skipVerify trusts the sender's copy without recomputing the
// checksum (it then costs one copy and no read pass on the receiver).
func ListenShm(path string, cfg ServerConfig, skipVerify bool) (*ShmServer, error) {
	cfg.defaults()
	if cfg.Regions == nil {
		return nil, errors.New("data: shm server needs regions")
	}
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("data: listen unix %s: %w", path, err)
	}
	s := &ShmServer{cfg: cfg, skipVerify: skipVerify, ln: ln, path: path}
	s.conns.Start(ln.AcceptUnix, s.serve, cfg.MaxConns, func(c *net.UnixConn) { s.cfg.tooMany("shm", c) }, cfg.Logger, "data shm server")
	return s, nil
}

// Path of the socket.
func (s *ShmServer) Path() string { return s.path }

// Close stops the server and closes every connection (mappings senders
// already hold stay valid in their processes).
func (s *ShmServer) Close() error { return s.conns.Close(s.ln) }

func (s *ShmServer) serve(c *net.UnixConn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	bw := bufio.NewWriterSize(c, 16<<10)
	err := s.handle(c, br, bw)
	if err == nil {
		return
	}
	var rj *rejectError
	if errors.As(err, &rj) {
		// Count before answering, so a peer that sees the refusal sees it
		// counted.
		refused(&s.cfg, "shm", c.RemoteAddr(), err)
		c.SetWriteDeadline(time.Now().Add(time.Second))
		writeMessage(bw, FrameError, err.Error())
		bw.Flush()
		return
	}
	s.cfg.Logger.Info("data: shm connection ended", "err", err)
}

func (s *ShmServer) handle(c *net.UnixConn, br *bufio.Reader, bw *bufio.Writer) error {
	var hdr, out [HeaderSize]byte
	landedBytes := s.cfg.Metrics.bytesLanded.WithLabelValues("shm")
	landedFrames := s.cfg.Metrics.framesLanded.WithLabelValues("shm")
	g := newHandshake(s.cfg.Token)
	var last Header // last landed frame verified
	unacked := false
	rdl, wdl := deadline.Lazy{Set: c.SetReadDeadline}, deadline.Lazy{Set: c.SetWriteDeadline}
	for {
		h, err := g.await(br, hdr[:], &rdl, &s.cfg)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		wdl.Extend(time.Now(), s.cfg.FrameTimeout)
		switch h.Type {
		case FrameHello:
			if err := g.hello(br, h); err != nil {
				return err
			}
		case FrameMapReq:
			r, ok := s.cfg.Regions.Region(h.Region)
			if !ok || !r.Shared() {
				return reject("out_of_region", fmt.Errorf("%w: region %d is not a registered shared region", ErrOutOfRegion, h.Region))
			}
			if unacked {
				last.ack().Encode(out[:])
				bw.Write(out[:])
				unacked = false
			}
			if err := bw.Flush(); err != nil {
				return fmt.Errorf("write acks: %w", err)
			}
			Header{Type: FrameMapRes, Region: r.id, Offset: uint64(len(r.mem))}.Encode(out[:])
			if _, _, err := c.WriteMsgUnix(out[:], unix.UnixRights(r.fd), nil); err != nil {
				return fmt.Errorf("send region %d fd: %w", r.id, err)
			}
		case FrameLanded:
			mem, err := s.cfg.Regions.Slice(h.Desc())
			if err != nil {
				return reject("out_of_region", err)
			}
			if !s.skipVerify {
				// The sender wrote these bytes from another core, maybe
				// with non-temporal stores: they are not in this cache
				// (crc32c reads ahead).
				if got := crc32c.ChecksumCold(mem); got != h.CRC {
					return reject("checksum", fmt.Errorf("landed frame %d: %s: checksum %#x, frame says %#x", h.Seq, h.Desc(), got, h.CRC))
				}
			}
			landedBytes.Add(float64(h.Length))
			landedFrames.Inc()
			if s.cfg.OnLanded != nil {
				s.cfg.OnLanded(Landed{Transport: "shm", Desc: h.Desc(), CRC: h.CRC})
			}
			// Acks are cumulative: one for the last frame verified, sent
			// once every landed frame read so far is verified.
			last, unacked = h, true
			if br.Buffered() < HeaderSize {
				last.ack().Encode(out[:])
				if _, err := bw.Write(out[:]); err != nil {
					return fmt.Errorf("write ack: %w", err)
				}
				if err := bw.Flush(); err != nil {
					return fmt.Errorf("write ack: %w", err)
				}
				unacked = false
			}
		default:
			return reject("unexpected", fmt.Errorf("data: unexpected %s frame from a sender", h.Type))
		}
	}
}

type shmBackend struct{}

func (shmBackend) Name() string { return "shm" }
func (shmBackend) Usable(o *DialOptions, p *triplanev1.DataPeer) bool {
	return p.GetShmSocket() != "" && p.GetHostId() != "" && p.GetHostId() == o.HostID
}
func (shmBackend) Dial(ctx context.Context, o *DialOptions, p *triplanev1.DataPeer) (Transport, error) {
	return dialShm(ctx, p, o)
}

// shmTransport writes into a same-host peer's mapped regions.
//
// A Write copies frame after frame into the mapping and sends their landed
// frames in batches (one write per shmFlushBytes copied), so that the
// receiver verifies a range on its core while the sender copies the next
// one. Acks are cumulative: an ack for frame n
// acknowledges every landed frame up to n. A goroutine reads them for the
// transport's lifetime.
type shmTransport struct {
	o    *DialOptions
	path string
	conn *net.UnixConn
	br   *bufio.Reader

	mu   sync.Mutex // one Write at a time
	maps map[uint32][]byte
	seq  uint64 // last landed frame sent
	err  error

	acked  atomic.Uint64 // last frame acknowledged (cumulative)
	ackc   chan struct{} // poked after every ack, and when the reader stops
	rdone  chan struct{} // closed when the ack reader stopped; rerr says why
	rerr   error
	sent   atomic.Uint64 // last landed frame sent (the reader's bound)
	closed atomic.Bool
}

const (
	// shmFlushBytes: landed frames are sent after this many bytes were
	// copied, so the receiver's verification runs alongside the copy (and
	// finds smaller frames still in the shared cache).
	shmFlushBytes = 256 << 10
	// shmWindowBytes bounds the bytes copied but not yet acknowledged: the
	// receiver's verification trails the copy by at most this.
	shmWindowBytes = 4 << 20
)

// readAcks runs for the transport's lifetime and records cumulative acks.
func (t *shmTransport) readAcks() {
	defer func() {
		close(t.rdone)
		select {
		case t.ackc <- struct{}{}:
		default:
		}
	}()
	var hdr [HeaderSize]byte
	for {
		if _, err := io.ReadFull(t.br, hdr[:]); err != nil {
			t.rerr = fmt.Errorf("read ack: %w", err)
			return
		}
		h, err := DecodeHeader(hdr[:])
		if err != nil {
			t.rerr = fmt.Errorf("receiver sent: %w", err)
			return
		}
		if h.Type == FrameError {
			msg := make([]byte, h.Length)
			io.ReadFull(t.br, msg)
			t.rerr = fmt.Errorf("receiver refused: %s", msg)
			return
		}
		if h.Type != FrameAck || h.Seq <= t.acked.Load() || h.Seq > t.sent.Load() {
			t.rerr = fmt.Errorf("receiver sent %s frame %d, want an ack in (%d, %d]", h.Type, h.Seq, t.acked.Load(), t.sent.Load())
			return
		}
		t.acked.Store(h.Seq)
		select {
		case t.ackc <- struct{}{}:
		default:
		}
	}
}

// waitAcked waits until frame seq is acknowledged, at most IOTimeout
// without progress.
func (t *shmTransport) waitAcked(ctx context.Context, seq uint64) error {
	var timer *time.Timer
	for t.acked.Load() < seq {
		if timer == nil {
			timer = time.NewTimer(t.o.IOTimeout)
			defer timer.Stop()
		}
		before := t.acked.Load()
		select {
		case <-t.ackc:
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			return fmt.Errorf("no ack for %s", t.o.IOTimeout)
		}
		select {
		case <-t.rdone:
			if t.acked.Load() < seq {
				return t.rerr
			}
		default:
		}
		if t.acked.Load() != before {
			timer.Reset(t.o.IOTimeout)
		}
	}
	return nil
}

func dialShm(ctx context.Context, p *triplanev1.DataPeer, o *DialOptions) (*shmTransport, error) {
	d := net.Dialer{Timeout: o.DialTimeout}
	c, err := d.DialContext(ctx, "unix", p.GetShmSocket())
	if err != nil {
		return nil, err
	}
	t := &shmTransport{o: o, path: p.GetShmSocket(), conn: c.(*net.UnixConn), maps: map[uint32][]byte{},
		ackc: make(chan struct{}, 1), rdone: make(chan struct{})}
	t.conn.SetDeadline(time.Now().Add(o.IOTimeout))
	if err := writeMessage(t.conn, FrameHello, o.Token); err != nil {
		t.Close()
		return nil, fmt.Errorf("hello: %w", err)
	}
	for _, r := range p.GetRegions() {
		if err := t.mapRegion(r.GetId()); err != nil {
			t.Close()
			return nil, err
		}
	}
	t.conn.SetDeadline(time.Time{})
	t.br = bufio.NewReaderSize(t.conn, 16<<10)
	go t.readAcks()
	return t, nil
}

// mapRegion asks for region id's memfd and maps it. It runs before the
// buffered reader exists, so no byte of a reply is read ahead.
func (t *shmTransport) mapRegion(id uint32) error {
	var req [HeaderSize]byte
	Header{Type: FrameMapReq, Region: id}.Encode(req[:])
	if _, err := t.conn.Write(req[:]); err != nil {
		return fmt.Errorf("map region %d: %w", id, err)
	}
	var hdr [HeaderSize]byte
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := t.conn.ReadMsgUnix(hdr[:], oob)
	if err != nil {
		return fmt.Errorf("map region %d: %w", id, err)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return fmt.Errorf("map region %d: control message: %w", id, err)
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err == nil {
				fds = append(fds, got...)
			}
		}
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if n < HeaderSize {
		if _, err := io.ReadFull(t.conn, hdr[n:]); err != nil {
			return fmt.Errorf("map region %d: %w", id, err)
		}
	}
	h, err := DecodeHeader(hdr[:])
	if err != nil {
		return fmt.Errorf("map region %d: %w", id, err)
	}
	if h.Type == FrameError {
		msg := make([]byte, h.Length)
		io.ReadFull(t.conn, msg)
		return fmt.Errorf("map region %d: receiver refused: %s", id, msg)
	}
	if h.Type != FrameMapRes || h.Region != id || len(fds) != 1 || h.Offset == 0 || h.Offset > 1<<40 {
		return fmt.Errorf("map region %d: bad reply (%s frame for region %d, %d fds, %d bytes)", id, h.Type, h.Region, len(fds), h.Offset)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fds[0], &st); err != nil || uint64(st.Size) < h.Offset {
		return fmt.Errorf("map region %d: fd holds %d bytes, peer says %d (%v)", id, st.Size, h.Offset, err)
	}
	mem, err := unix.Mmap(fds[0], 0, int(h.Offset), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map region %d: mmap: %w", id, err)
	}
	t.maps[id] = mem
	return nil
}

func (t *shmTransport) Name() string { return "shm" }

func (t *shmTransport) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err == nil {
		t.err = ErrBroken
	}
	err := t.conn.Close()
	if t.br != nil && !t.closed.Swap(true) {
		<-t.rdone
	}
	for id, m := range t.maps {
		err = errors.Join(err, unix.Munmap(m))
		delete(t.maps, id)
	}
	return err
}

func (t *shmTransport) Write(ctx context.Context, ops []Op) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return fmt.Errorf("data: shm write to %s: %w", t.path, t.err)
	}
	if err := t.write(ctx, ops); err != nil {
		t.err = err
		t.o.Metrics.connErrors.WithLabelValues("shm").Inc()
		t.conn.Close()
		return fmt.Errorf("data: shm write to %s: %w", t.path, err)
	}
	return nil
}

func (t *shmTransport) write(ctx context.Context, ops []Op) error {
	frames, err := split(ops, t.o.FrameSize)
	if err != nil {
		return err
	}
	// A cancelled ctx unblocks a write on a full socket; waits for acks
	// watch ctx themselves.
	stop := context.AfterFunc(ctx, func() { t.conn.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	first := t.seq + 1
	hdrs := make([]byte, 0, HeaderSize*min(len(frames), 1024))
	// ends[i] is the byte count of this Write up to and including frame
	// first+i: the window is counted in bytes.
	ends := make([]int, len(frames))
	var bytes, unflushed int
	flush := func() error {
		if len(hdrs) == 0 {
			return nil
		}
		t.sent.Store(t.seq)
		t.conn.SetWriteDeadline(time.Now().Add(t.o.IOTimeout))
		if _, err := t.conn.Write(hdrs); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("send landed frames: %w", err)
		}
		hdrs, unflushed = hdrs[:0], 0
		return nil
	}
	for i, f := range frames {
		m, ok := t.maps[f.dst.Region]
		if !ok {
			return fmt.Errorf("%w: %s: region not mapped", ErrOutOfRegion, f.dst)
		}
		dst, err := checkIn(m, f.dst)
		if err != nil {
			return err
		}
		// Backpressure: keep the receiver's verification close behind.
		if bytes > shmWindowBytes {
			done := 0
			if acked := t.acked.Load(); acked >= first {
				done = ends[acked-first]
			}
			if bytes-done > shmWindowBytes {
				if err := flush(); err != nil {
					return err
				}
				// Wait for the frame that brings the backlog under half
				// the window.
				k := sort.SearchInts(ends[:i], bytes-shmWindowBytes/2)
				if err := t.waitAcked(ctx, first+uint64(k)); err != nil {
					return err
				}
			}
		}
		var crc uint32
		switch {
		case t.o.SkipShmVerify:
			copy(dst, f.src) // the one copy
		case f.hasCRC:
			crc = f.crc
			copy(dst, f.src)
		default:
			crc = crc32c.Copy(dst, f.src) // the one copy, checksummed as it goes
		}
		t.seq++
		hdrs = hdrs[:len(hdrs)+HeaderSize]
		Header{Type: FrameLanded, Region: f.dst.Region, Offset: f.dst.Offset, Length: uint32(len(f.src)), Seq: t.seq, CRC: crc}.Encode(hdrs[len(hdrs)-HeaderSize:])
		bytes += len(f.src)
		unflushed += len(f.src)
		ends[i] = bytes
		if unflushed >= shmFlushBytes || len(hdrs) == cap(hdrs) {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	if err := t.waitAcked(ctx, t.seq); err != nil {
		return err
	}
	t.o.Metrics.bytesSent.WithLabelValues("shm").Add(float64(bytes))
	t.o.Metrics.framesSent.WithLabelValues("shm").Add(float64(len(frames)))
	return nil
}
