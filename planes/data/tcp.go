package data

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/triplane-dev/triplane/planes/data/deadline"
)

// tcpTransport sends frames over several TCP connections (lanes) to one
// receiver.
type tcpTransport struct {
	o     *DialOptions
	addr  string
	lanes []*lane
	next  atomic.Uint64
	// runBlocks bounds the blocks of one frame: MaxFrameBlocks when the
	// receiver accepts blocks frames, else 1 (a data frame per block).
	runBlocks int
}

// lane is one TCP connection: writers take turns on it, one reader
// goroutine matches acks to pending frames.
type lane struct {
	t      *tcpTransport
	conn   net.Conn
	wmu    sync.Mutex    // one batch write at a time
	wdl    deadline.Lazy // under wmu
	window chan struct{}

	mu sync.Mutex
	// pending are the frames written and not yet acknowledged, in seq
	// order: pending[0] is frame acked+1. Acks are cumulative.
	pending []pendingFrame
	acked   uint64
	seq     uint64
	err     error
	// rdl bounds the wait for acks while frames are pending. It is left
	// in place when the last ack comes (the next write would only set it
	// again); a reader woken by it with nothing pending clears it.
	rdl  deadline.Lazy
	done chan struct{}
}

type pendingFrame struct {
	crc uint32
	n   uint32
	c   *call
}

func dialTCP(ctx context.Context, addr string, o *DialOptions, blocksFrames bool) (*tcpTransport, error) {
	t := &tcpTransport{o: o, addr: addr, runBlocks: 1}
	if blocksFrames {
		t.runBlocks = MaxFrameBlocks
	}
	for i := 0; i < o.Lanes; i++ {
		l, err := t.dialLane(ctx)
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("lane %d to %s: %w", i, addr, err)
		}
		t.lanes = append(t.lanes, l)
	}
	return t, nil
}

func (t *tcpTransport) dialLane(ctx context.Context) (*lane, error) {
	d := net.Dialer{Timeout: t.o.DialTimeout}
	var c net.Conn
	var err error
	if t.o.TLS != nil {
		c, err = (&tls.Dialer{NetDialer: &d, Config: t.o.TLS}).DialContext(ctx, "tcp", t.addr)
	} else {
		c, err = d.DialContext(ctx, "tcp", t.addr)
	}
	if err != nil {
		return nil, err
	}
	c.SetWriteDeadline(time.Now().Add(t.o.IOTimeout))
	if err := writeMessage(c, FrameHello, t.o.Token); err != nil {
		c.Close()
		return nil, fmt.Errorf("hello: %w", err)
	}
	l := &lane{t: t, conn: c, window: make(chan struct{}, t.o.Window), done: make(chan struct{})}
	l.wdl.Set, l.rdl.Set = c.SetWriteDeadline, c.SetReadDeadline
	go l.readAcks()
	return l, nil
}

func (t *tcpTransport) Name() string { return "tcp" }

func (t *tcpTransport) Close() error {
	for _, l := range t.lanes {
		l.fail(ErrBroken)
		<-l.done
	}
	return nil
}

func (t *tcpTransport) Write(ctx context.Context, ops []Op) error {
	split, err := split(ops, t.o.FrameSize)
	if err != nil {
		return err
	}
	frames := coalesce(split, t.o.FrameSize, t.runBlocks)
	c := newCall(len(frames))
	// Frames go round-robin over the lanes, starting where the last Write
	// stopped so that streams of single-block writes use every lane.
	n := len(t.lanes)
	start := int(t.next.Add(uint64(len(frames))) - uint64(len(frames)))
	per := make([][]run, n)
	for i, f := range frames {
		k := (start + i) % n
		per[k] = append(per[k], f)
	}
	// A cancelled Write breaks the lanes: closing them is what unblocks a
	// writev stuck on a full socket buffer.
	stop := context.AfterFunc(ctx, func() {
		for _, l := range t.lanes {
			l.fail(fmt.Errorf("write cancelled: %w", context.Cause(ctx)))
		}
	})
	defer stop()
	var wg sync.WaitGroup
	for k, fs := range per {
		if len(fs) == 0 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := t.lanes[k].send(ctx, c, fs); err != nil {
				c.fail(err)
			}
		}()
	}
	// Writers may not touch Src after Write returns: wait for them first.
	wg.Wait()
	select {
	case <-c.done:
	case <-ctx.Done():
		c.fail(ctx.Err())
	}
	<-c.done
	if c.err != nil {
		return fmt.Errorf("data: tcp write to %s: %w", t.addr, c.err)
	}
	var bytes uint64
	for _, f := range frames {
		bytes += f.dst.Length
	}
	t.o.Metrics.bytesSent.WithLabelValues("tcp").Add(float64(bytes))
	t.o.Metrics.framesSent.WithLabelValues("tcp").Add(float64(len(frames)))
	return nil
}

// run is frames whose destinations are contiguous in one region, sent as
// one frame: a data frame when alone, else a blocks frame that keeps each
// block's checksum.
type run struct {
	parts []frame
	dst   Descriptor // all of them
}

// coalesce groups consecutive frames into runs of at most size bytes and
// blocks blocks. Only destinations need to be contiguous: the sources go
// out as separate pieces of one writev.
func coalesce(fs []frame, size, blocks int) []run {
	rs := make([]run, 0, len(fs))
	for i := 0; i < len(fs); {
		d, j := fs[i].dst, i+1
		for ; j < len(fs) && j-i < blocks; j++ {
			next := fs[j].dst
			if next.Region != d.Region || next.Offset != d.Offset+d.Length || d.Length+next.Length > uint64(size) {
				break
			}
			d.Length += next.Length
		}
		rs = append(rs, run{parts: fs[i:j], dst: d})
		i = j
	}
	return rs
}

// prepare returns the bytes that go before r's sources, with room for the
// frame header at the start (hdr itself when r is a single block; else a
// new buffer that also holds the block table), and the frame's checksum,
// which its ack repeats. The sources are read here; writev then copies
// them from cache.
func (r run) prepare(hdr []byte) ([]byte, uint32) {
	if len(r.parts) == 1 {
		return hdr, r.parts[0].checksum()
	}
	b := make([]byte, HeaderSize, HeaderSize+blockTableHeader+blockEntry*len(r.parts))
	b = appendBlockTable(b, len(r.parts))
	for _, f := range r.parts {
		b = appendBlock(b, uint32(len(f.src)), f.checksum())
	}
	return b, Checksum(b[HeaderSize:])
}

// header writes r's frame header into b.
func (r run) header(b []byte, seq uint64, crc uint32) {
	t := FrameData
	if len(r.parts) > 1 {
		t = FrameBlocks
	}
	Header{Type: t, Region: r.dst.Region, Offset: r.dst.Offset, Length: uint32(r.dst.Length), Seq: seq, CRC: crc}.Encode(b)
}

// send writes fs in writev batches of up to BatchBytes, each frame holding
// a window slot until its ack arrives (backpressure).
func (l *lane) send(ctx context.Context, c *call, fs []run) error {
	for len(fs) > 0 {
		// Frames are numbered and written under wmu, so they go out in
		// seq order and a cumulative ack covers exactly the frames before
		// it.
		l.wmu.Lock()
		var bufs net.Buffers
		var size int
		hdrs := make([]byte, 0, HeaderSize*min(len(fs), 1024))
		n := 0
		// stop ends the Write early; frames already registered in this
		// batch are still written so that their window slots come back.
		var stop error
		now := time.Now() // one clock read per batch: deadlines move lazily anyway
	fill:
		for n < len(fs) && (n == 0 || size+int(fs[n].dst.Length) <= l.t.o.BatchBytes) && len(hdrs)+HeaderSize <= cap(hdrs) {
			if n > 0 {
				// Frames of this batch hold window slots but their acks
				// cannot come before they are written: write them rather
				// than wait for a slot.
				select {
				case l.window <- struct{}{}:
				default:
					break fill
				}
			} else {
				select {
				case l.window <- struct{}{}:
				case <-ctx.Done():
					stop = ctx.Err()
					break fill
				case <-l.done:
					l.wmu.Unlock()
					return l.failure()
				case <-c.done:
					stop = errCallDone // another lane failed this call
					break fill
				}
			}
			r := fs[n]
			h, crc := r.prepare(hdrs[len(hdrs) : len(hdrs)+HeaderSize])
			l.mu.Lock()
			if l.err != nil {
				err := l.err
				l.mu.Unlock()
				<-l.window
				// Frames of this batch already registered failed with
				// the lane.
				l.wmu.Unlock()
				return err
			}
			l.seq++
			seq := l.seq
			l.pending = append(l.pending, pendingFrame{crc: crc, n: uint32(r.dst.Length), c: c})
			// In the same lock section as the append: the ack reader,
			// woken by a deadline that passed while the lane was idle,
			// must not find this frame pending under it.
			l.rdl.Extend(now, l.t.o.IOTimeout)
			l.mu.Unlock()
			if len(r.parts) == 1 {
				hdrs = hdrs[:len(hdrs)+HeaderSize] // h is this slot
			}
			r.header(h, seq, crc)
			bufs = append(bufs, h)
			for _, f := range r.parts {
				bufs = append(bufs, f.src)
			}
			size += int(r.dst.Length)
			n++
		}
		fs = fs[n:]
		if len(bufs) == 0 {
			l.wmu.Unlock()
			return stopErr(stop)
		}
		l.wdl.Extend(time.Now(), l.t.o.IOTimeout)
		_, err := bufs.WriteTo(l.conn) // writev on a plain TCP conn
		l.wmu.Unlock()
		if err != nil {
			l.fail(fmt.Errorf("write frames: %w", err))
			return l.failure()
		}
		if stop != nil {
			return stopErr(stop)
		}
	}
	return nil
}

var errCallDone = errors.New("call already done")

func stopErr(err error) error {
	if errors.Is(err, errCallDone) {
		return nil
	}
	return err
}

func (l *lane) failure() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil {
		return ErrBroken
	}
	return l.err
}

// fail breaks the lane: every pending frame's call fails with err.
func (l *lane) fail(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
		if !errors.Is(err, ErrBroken) {
			l.t.o.Metrics.connErrors.WithLabelValues("tcp").Inc()
		}
	}
	ps := l.pending
	l.pending = nil
	l.mu.Unlock()
	l.conn.Close()
	for _, p := range ps {
		p.c.fail(err)
	}
}

func (l *lane) readAcks() {
	defer close(l.done)
	br := bufio.NewReaderSize(l.conn, 32<<10)
	var hdr [HeaderSize]byte
	for {
		if err := l.awaitAck(br); err != nil {
			l.fail(fmt.Errorf("read ack: %w", err))
			return
		}
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			l.fail(fmt.Errorf("read ack: %w", err))
			return
		}
		h, err := DecodeHeader(hdr[:])
		if err != nil {
			l.fail(fmt.Errorf("receiver sent: %w", err))
			return
		}
		switch h.Type {
		case FrameAck:
			// Cumulative: frames acked+1 .. h.Seq landed and verified;
			// the ack repeats frame h.Seq's length and checksum.
			l.mu.Lock()
			k := h.Seq - l.acked
			if h.Seq <= l.acked || k > uint64(len(l.pending)) || l.pending[k-1].crc != h.CRC || l.pending[k-1].n != h.Length {
				l.mu.Unlock()
				l.fail(fmt.Errorf("receiver acknowledged unknown frame %d (%s)", h.Seq, h.Desc()))
				return
			}
			done := l.pending[:k]
			l.pending = l.pending[k:]
			if len(l.pending) == 0 {
				l.pending = nil // let the backing array go
			}
			l.acked = h.Seq
			if len(l.pending) > 0 {
				l.rdl.Extend(time.Now(), l.t.o.IOTimeout)
			}
			l.mu.Unlock()
			for _, p := range done {
				<-l.window
				p.c.landed()
			}
		case FrameError:
			msg := make([]byte, h.Length)
			io.ReadFull(br, msg)
			l.fail(fmt.Errorf("receiver refused: %s", msg))
			return
		default:
			l.fail(fmt.Errorf("receiver sent unexpected %s frame", h.Type))
			return
		}
	}
}

// awaitAck returns once the next ack's first byte is here. A deadline that
// passes with nothing pending (the lane went idle after its last ack) is
// cleared and the wait goes on; so is one a writer has moved since.
func (l *lane) awaitAck(br *bufio.Reader) error {
	for {
		_, err := br.Peek(1)
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		l.mu.Lock()
		idle, passed := len(l.pending) == 0, l.rdl.Passed(time.Now())
		if idle {
			l.rdl.Clear()
		}
		l.mu.Unlock()
		if !idle && passed {
			return fmt.Errorf("no ack within %s: %w", l.t.o.IOTimeout, err)
		}
	}
}
