package data

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/crc32c"
)

// Op moves the local bytes Src into the peer's memory named by Dst;
// len(Src) must equal Dst.Length.
type Op struct {
	Src []byte
	Dst Descriptor
	// CRC, when HasCRC, is Checksum(Src) computed earlier (a sealed KV
	// block keeps its checksum), which spares the sender a pass over the
	// bytes. The receiver verifies it all the same.
	CRC    uint32
	HasCRC bool
}

// Transport moves bytes into one peer's registered regions. Callers only
// see this interface, so a new backend (RDMA through UCX) needs no change
// to them.
type Transport interface {
	// Name of the backend, e.g. "tcp" or "shm".
	Name() string
	// Write moves every op and returns once every byte has landed in the
	// peer's regions and its checksum verified there (the completion
	// notification). Src must not change until Write returns. An error
	// means some ops may not have landed; the transport is then broken and
	// must be closed and dialled again.
	Write(ctx context.Context, ops []Op) error
	Close() error
}

// DialOptions configures the dialled transports.
type DialOptions struct {
	// Prefer forces a backend by name ("tcp", "shm"); "" or "auto" picks
	// the first usable backend in order.
	Prefer string
	// HostID of this process; a peer with the same id is on this host.
	// Default: HostID().
	HostID string
	// Lanes is the number of TCP connections per peer (default 4).
	Lanes int
	// Token is sent in the hello frame; TLS, when set, wraps TCP lanes.
	Token string
	TLS   *tls.Config
	// FrameSize splits larger ops into frames of at most this many bytes
	// (default 1 MiB); BatchBytes bounds one writev (default 1 MiB);
	// Window bounds unacknowledged frames per lane (default 256).
	FrameSize, BatchBytes, Window int
	// DialTimeout bounds connecting (default 10 s); IOTimeout bounds a
	// batch write and the wait for the next ack (default 30 s).
	DialTimeout, IOTimeout time.Duration
	// SkipShmVerify sends shared-memory landed frames without a checksum:
	// the copy is then the only pass over the bytes, and the receiver must
	// run with skipVerify (see ListenShm) or it refuses them.
	SkipShmVerify bool
	Logger        *slog.Logger
	Metrics       *Metrics
}

func (o *DialOptions) defaults() {
	if o.HostID == "" {
		o.HostID = HostID()
	}
	if o.Lanes <= 0 {
		o.Lanes = 4
	}
	// 1 MiB frames and writes keep each frame in cache between its
	// checksum and its send (and read and checksum on the receiver).
	if o.FrameSize <= 0 || o.FrameSize > MaxFrame {
		o.FrameSize = 1 << 20
	}
	if o.BatchBytes <= 0 {
		o.BatchBytes = 1 << 20
	}
	if o.Window <= 0 {
		o.Window = 256
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.IOTimeout == 0 {
		o.IOTimeout = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
}

// Backend is one way to reach a peer.
type Backend interface {
	Name() string
	// Usable reports whether the backend can reach peer from this host.
	Usable(o *DialOptions, peer *triplanev1.DataPeer) bool
	Dial(ctx context.Context, o *DialOptions, peer *triplanev1.DataPeer) (Transport, error)
}

// Dialer picks a backend per peer and dials it.
type Dialer struct {
	opts     DialOptions
	backends []Backend
}

// NewDialer returns a dialer trying extra backends first (an RDMA backend
// goes here), then shared memory, then TCP.
func NewDialer(o DialOptions, extra ...Backend) *Dialer {
	o.defaults()
	bs := append(append([]Backend{}, extra...), shmBackend{}, tcpBackend{})
	return &Dialer{opts: o, backends: bs}
}

// Choose returns the backend Dial would use for peer.
func (d *Dialer) Choose(peer *triplanev1.DataPeer) (Backend, error) {
	if p := d.opts.Prefer; p != "" && p != "auto" {
		var names []string
		for _, b := range d.backends {
			if b.Name() == p {
				if !b.Usable(&d.opts, peer) {
					return nil, fmt.Errorf("data: transport %q forced but cannot reach peer (host %q, tcp %q, shm %q)", p, peer.GetHostId(), peer.GetTcpAddr(), peer.GetShmSocket())
				}
				return b, nil
			}
			names = append(names, b.Name())
		}
		return nil, fmt.Errorf("data: unknown transport %q (known: %s)", p, strings.Join(names, ", "))
	}
	for _, b := range d.backends {
		if b.Usable(&d.opts, peer) {
			return b, nil
		}
	}
	return nil, fmt.Errorf("data: no transport reaches peer (host %q, tcp %q, shm %q)", peer.GetHostId(), peer.GetTcpAddr(), peer.GetShmSocket())
}

// Dial connects to peer with the chosen backend. With the automatic
// choice, a backend that fails to connect falls back to the next usable one
// (the same boot id does not prove a shared filesystem: containers on one
// node share it but not /tmp), and the error names every attempt.
func (d *Dialer) Dial(ctx context.Context, peer *triplanev1.DataPeer) (Transport, error) {
	b, err := d.Choose(peer)
	if err != nil {
		return nil, err
	}
	t, err := b.Dial(ctx, &d.opts, peer)
	if err == nil {
		return t, nil
	}
	d.opts.Metrics.connErrors.WithLabelValues(b.Name()).Inc()
	errs := []error{fmt.Errorf("data: dial %s: %w", b.Name(), err)}
	if p := d.opts.Prefer; p == "" || p == "auto" {
		tried := false
		for _, next := range d.backends {
			if !tried {
				tried = next == b
				continue
			}
			if !next.Usable(&d.opts, peer) {
				continue
			}
			t, err := next.Dial(ctx, &d.opts, peer)
			if err == nil {
				d.opts.Logger.Info("data: transport fell back", "from", b.Name(), "to", next.Name(), "cause", errs[0])
				return t, nil
			}
			d.opts.Metrics.connErrors.WithLabelValues(next.Name()).Inc()
			errs = append(errs, fmt.Errorf("data: dial %s: %w", next.Name(), err))
		}
	}
	return nil, errors.Join(errs...)
}

var hostIDOnce = sync.OnceValue(func() string {
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		return strings.TrimSpace(string(b))
	}
	h, _ := os.Hostname()
	return h
})

// HostID identifies this host: the kernel boot id, else the hostname.
func HostID() string { return hostIDOnce() }

type tcpBackend struct{}

func (tcpBackend) Name() string { return "tcp" }
func (tcpBackend) Usable(_ *DialOptions, p *triplanev1.DataPeer) bool {
	return p.GetTcpAddr() != ""
}
func (tcpBackend) Dial(ctx context.Context, o *DialOptions, p *triplanev1.DataPeer) (Transport, error) {
	return dialTCP(ctx, p.GetTcpAddr(), o, p.GetTcpBlocksFrames())
}

// call tracks the frames of one Write.
type call struct {
	remaining atomic.Int64
	done      chan struct{}
	once      sync.Once
	err       error
}

func newCall(frames int) *call {
	c := &call{done: make(chan struct{})}
	c.remaining.Store(int64(frames))
	if frames == 0 {
		close(c.done)
	}
	return c
}

func (c *call) landed() {
	if c.remaining.Add(-1) == 0 {
		c.once.Do(func() { close(c.done) })
	}
}

func (c *call) fail(err error) {
	c.once.Do(func() { c.err = err; close(c.done) })
}

// frame is one op or a piece of one.
type frame struct {
	src    []byte
	dst    Descriptor
	crc    uint32
	hasCRC bool
}

// checksum is the frame's CRC: the one its op came with, else computed
// (from memory that is likely not cached, which crc32c reads ahead of).
func (f frame) checksum() uint32 {
	if f.hasCRC {
		return f.crc
	}
	return crc32c.ChecksumCold(f.src)
}

// split cuts ops into frames of at most size bytes after checking them.
func split(ops []Op, size int) ([]frame, error) {
	var fs []frame
	for i, op := range ops {
		if uint64(len(op.Src)) != op.Dst.Length || len(op.Src) == 0 {
			return nil, fmt.Errorf("data: op %d: %d source bytes for %s", i, len(op.Src), op.Dst)
		}
		if len(op.Src) <= size {
			fs = append(fs, frame{src: op.Src, dst: op.Dst, crc: op.CRC, hasCRC: op.HasCRC})
			continue
		}
		for off := 0; off < len(op.Src); off += size {
			end := min(off+size, len(op.Src))
			fs = append(fs, frame{src: op.Src[off:end], dst: Descriptor{Region: op.Dst.Region, Offset: op.Dst.Offset + uint64(off), Length: uint64(end - off)}})
		}
	}
	return fs, nil
}

// ErrBroken: the transport failed earlier and must be dialled again.
var ErrBroken = errors.New("data: transport broken")
