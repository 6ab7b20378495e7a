package data

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
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

	conns connTracker[*net.UnixConn]
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
	s.conns.start(ln.AcceptUnix, s.serve, cfg.Logger, "shm server")
	return s, nil
}

// Path of the socket.
func (s *ShmServer) Path() string { return s.path }

// Close stops the server and closes every connection (mappings senders
// already hold stay valid in their processes).
func (s *ShmServer) Close() error { return s.conns.close(s.ln) }

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
	for {
		c.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		h, err := g.next(br, hdr[:])
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		c.SetWriteDeadline(time.Now().Add(s.cfg.FrameTimeout))
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
				if got := Checksum(mem); got != h.CRC {
					return reject("checksum", fmt.Errorf("landed frame %d: %s: checksum %#x, frame says %#x", h.Seq, h.Desc(), got, h.CRC))
				}
			}
			landedBytes.Add(float64(h.Length))
			landedFrames.Inc()
			if s.cfg.OnLanded != nil {
				s.cfg.OnLanded(Landed{Transport: "shm", Desc: h.Desc(), CRC: h.CRC})
			}
			Header{Type: FrameAck, Region: h.Region, Length: h.Length, Offset: h.Offset, Seq: h.Seq, CRC: h.CRC}.Encode(out[:])
			if _, err := bw.Write(out[:]); err != nil {
				return fmt.Errorf("write ack: %w", err)
			}
			if br.Buffered() < HeaderSize {
				if err := bw.Flush(); err != nil {
					return fmt.Errorf("write ack: %w", err)
				}
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
type shmTransport struct {
	o    *DialOptions
	path string
	conn *net.UnixConn
	br   *bufio.Reader

	mu    sync.Mutex // one Write at a time
	maps  map[uint32][]byte
	seq   uint64 // last landed frame sent
	acked uint64 // last frame acknowledged
	err   error
}

// readAcks reads n acks, which must come in order.
func (t *shmTransport) readAcks(ctx context.Context, n int) error {
	var hdr [HeaderSize]byte
	for i := 0; i < n; i++ {
		if _, err := io.ReadFull(t.br, hdr[:]); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read ack: %w", err)
		}
		h, err := DecodeHeader(hdr[:])
		if err != nil {
			return fmt.Errorf("receiver sent: %w", err)
		}
		if h.Type == FrameError {
			msg := make([]byte, h.Length)
			io.ReadFull(t.br, msg)
			return fmt.Errorf("receiver refused: %s", msg)
		}
		if h.Type != FrameAck || h.Seq != t.acked+1 {
			return fmt.Errorf("receiver sent %s frame %d, want ack %d", h.Type, h.Seq, t.acked+1)
		}
		t.acked++
	}
	return nil
}

func dialShm(ctx context.Context, p *triplanev1.DataPeer, o *DialOptions) (*shmTransport, error) {
	d := net.Dialer{Timeout: o.DialTimeout}
	c, err := d.DialContext(ctx, "unix", p.GetShmSocket())
	if err != nil {
		return nil, err
	}
	t := &shmTransport{o: o, path: p.GetShmSocket(), conn: c.(*net.UnixConn), maps: map[uint32][]byte{}}
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
	var err error
	for id, m := range t.maps {
		err = errors.Join(err, unix.Munmap(m))
		delete(t.maps, id)
	}
	return errors.Join(err, t.conn.Close())
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
	frames, err := split(ops, MaxFrame)
	if err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok {
		t.conn.SetDeadline(d)
	} else {
		t.conn.SetDeadline(time.Now().Add(t.o.IOTimeout))
	}
	stop := context.AfterFunc(ctx, func() { t.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	t.acked = t.seq
	// Landed frames go in chunks; the acks of one chunk are read after the
	// next is sent, so neither side waits on a full socket buffer.
	const chunk = 256
	hdrs := make([]byte, HeaderSize*min(len(frames), chunk))
	var bytes int
	prev := 0 // frames sent whose acks are unread
	for off := 0; off < len(frames); off += chunk {
		fs := frames[off:min(off+chunk, len(frames))]
		for i, f := range fs {
			m, ok := t.maps[f.dst.Region]
			if !ok {
				return fmt.Errorf("%w: %s: region not mapped", ErrOutOfRegion, f.dst)
			}
			dst, err := checkIn(m, f.dst)
			if err != nil {
				return err
			}
			var crc uint32
			if t.o.SkipShmVerify {
				copy(dst, f.src) // the one copy
			} else {
				crc = f.crc
				if f.hasCRC {
					copy(dst, f.src)
				} else {
					crc = copyChecksum(dst, f.src)
				}
			}
			t.seq++
			Header{Type: FrameLanded, Region: f.dst.Region, Offset: f.dst.Offset, Length: uint32(len(f.src)), Seq: t.seq, CRC: crc}.Encode(hdrs[i*HeaderSize:])
			bytes += len(f.src)
		}
		if _, err := t.conn.Write(hdrs[:len(fs)*HeaderSize]); err != nil {
			return fmt.Errorf("send landed frames: %w", err)
		}
		if err := t.readAcks(ctx, prev); err != nil {
			return err
		}
		prev = len(fs)
	}
	if err := t.readAcks(ctx, prev); err != nil {
		return err
	}
	t.o.Metrics.bytesSent.WithLabelValues("shm").Add(float64(bytes))
	t.o.Metrics.framesSent.WithLabelValues("shm").Add(float64(len(frames)))
	return nil
}

// copyChecksum copies src into dst (the one copy) and returns the checksum
// of the bytes, computed a cache-sized piece at a time right after each
// piece is copied so that it does not cost a second trip to memory.
func copyChecksum(dst, src []byte) uint32 {
	const piece = 64 << 10
	var crc uint32
	for off := 0; off < len(src); off += piece {
		end := min(off+piece, len(src))
		copy(dst[off:end], src[off:end])
		crc = crc32.Update(crc, castagnoli, dst[off:end])
	}
	return crc
}
