package data

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Descriptor names Length bytes at Offset inside the registered region
// Region.
type Descriptor struct {
	Region uint32
	Offset uint64
	Length uint64
}

func (d Descriptor) String() string {
	return fmt.Sprintf("region %d [%d, +%d)", d.Region, d.Offset, d.Length)
}

// Proto converts the descriptor to its wire form.
func (d Descriptor) Proto() *triplanev1.DataDescriptor {
	return &triplanev1.DataDescriptor{Region: d.Region, Offset: d.Offset, Length: d.Length}
}

// ErrOutOfRegion: a descriptor names bytes outside every registered region.
var ErrOutOfRegion = errors.New("data: descriptor outside registered regions")

// Region is a pool of fixed-size blocks of real bytes. Its memory is either
// the Go heap or, for regions that peers on the same host may map, a memfd
// mapped shared.
type Region struct {
	id        uint32
	blockSize int
	blocks    int
	mem       []byte
	fd        int // memfd, or -1
}

// NewRegion allocates a heap region of blocks blocks of blockSize bytes.
func NewRegion(id uint32, blockSize, blocks int) (*Region, error) {
	if err := checkSize(blockSize, blocks); err != nil {
		return nil, err
	}
	return &Region{id: id, blockSize: blockSize, blocks: blocks, mem: make([]byte, blockSize*blocks), fd: -1}, nil
}

// NewSharedRegion allocates a region backed by a memfd mapped shared, so
// that a peer on the same host can map it (see ShmServer).
func NewSharedRegion(id uint32, blockSize, blocks int) (*Region, error) {
	if err := checkSize(blockSize, blocks); err != nil {
		return nil, err
	}
	size := blockSize * blocks
	fd, err := unix.MemfdCreate(fmt.Sprintf("triplane-region-%d", id), unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("data: region %d: memfd_create: %w", id, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("data: region %d: ftruncate %d bytes: %w", id, size, err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("data: region %d: mmap %d bytes: %w", id, size, err)
	}
	return &Region{id: id, blockSize: blockSize, blocks: blocks, mem: mem, fd: fd}, nil
}

// OpenFileRegion maps the file at path (created or extended to the region's
// size) shared. Its bytes outlive the process, as a region in /dev/shm or on
// a disk-backed KV cache would: a receiver that restarts finds the blocks it
// already acknowledged. Same-host peers can map it like a memfd region.
func OpenFileRegion(path string, id uint32, blockSize, blocks int) (*Region, error) {
	if err := checkSize(blockSize, blocks); err != nil {
		return nil, err
	}
	size := blockSize * blocks
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data: region %d: open %s: %w", id, path, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("data: region %d: size %s to %d bytes: %w", id, path, size, err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("data: region %d: mmap %s: %w", id, path, err)
	}
	return &Region{id: id, blockSize: blockSize, blocks: blocks, mem: mem, fd: fd}, nil
}

func checkSize(blockSize, blocks int) error {
	const maxRegion = 1 << 40
	if blockSize <= 0 || blocks <= 0 || blockSize > maxRegion/blocks {
		return fmt.Errorf("data: region of %d blocks of %d bytes: sizes must be positive and total at most 1 TiB", blocks, blockSize)
	}
	return nil
}

// ID of the region.
func (r *Region) ID() uint32 { return r.id }

// BlockSize in bytes.
func (r *Region) BlockSize() int { return r.blockSize }

// Blocks in the region.
func (r *Region) Blocks() int { return r.blocks }

// Bytes is the region's whole memory.
func (r *Region) Bytes() []byte { return r.mem }

// Shared reports whether the region is backed by a memfd.
func (r *Region) Shared() bool { return r.fd >= 0 }

// Block returns block i's memory.
func (r *Region) Block(i int) []byte {
	return r.mem[i*r.blockSize : (i+1)*r.blockSize : (i+1)*r.blockSize]
}

// BlockDesc is the descriptor of block i.
func (r *Region) BlockDesc(i int) Descriptor {
	return Descriptor{Region: r.id, Offset: uint64(i * r.blockSize), Length: uint64(r.blockSize)}
}

// Proto describes the region for peers.
func (r *Region) Proto() *triplanev1.DataRegion {
	return &triplanev1.DataRegion{Id: r.id, BlockSize: uint64(r.blockSize), Blocks: uint64(r.blocks)}
}

// Close unmaps a shared or file region; heap regions are left to the
// collector. Close the servers writing into it first: their goroutines
// would fault on unmapped memory.
func (r *Region) Close() error {
	if r.fd < 0 {
		return nil
	}
	err := errors.Join(unix.Munmap(r.mem), unix.Close(r.fd))
	r.fd, r.mem = -1, nil
	return err
}

// Regions is the set of regions registered for receiving.
type Regions struct {
	mu sync.RWMutex
	m  map[uint32]*Region
}

// NewRegions registers rs.
func NewRegions(rs ...*Region) (*Regions, error) {
	x := &Regions{m: map[uint32]*Region{}}
	for _, r := range rs {
		if err := x.Register(r); err != nil {
			return nil, err
		}
	}
	return x, nil
}

// Register adds r; an id registered twice is an error.
func (x *Regions) Register(r *Region) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if _, dup := x.m[r.id]; dup {
		return fmt.Errorf("data: region %d registered twice", r.id)
	}
	x.m[r.id] = r
	return nil
}

// Unregister removes region id.
func (x *Regions) Unregister(id uint32) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.m, id)
}

// Region returns region id.
func (x *Regions) Region(id uint32) (*Region, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	r, ok := x.m[id]
	return r, ok
}

// List returns the registered regions' descriptions.
func (x *Regions) List() []*triplanev1.DataRegion {
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make([]*triplanev1.DataRegion, 0, len(x.m))
	for _, r := range x.m {
		out = append(out, r.Proto())
	}
	slices.SortFunc(out, func(a, b *triplanev1.DataRegion) int { return cmp.Compare(a.Id, b.Id) })
	return out
}

// Slice checks d against the registered regions and returns exactly the
// bytes it names. It is the only way the receiving side finds where to
// write.
func (x *Regions) Slice(d Descriptor) ([]byte, error) {
	r, ok := x.Region(d.Region)
	if !ok {
		return nil, fmt.Errorf("%w: %s: no such region", ErrOutOfRegion, d)
	}
	return checkIn(r.mem, d)
}

// checkIn returns mem[d.Offset:d.Offset+d.Length] if it is inside mem.
func checkIn(mem []byte, d Descriptor) ([]byte, error) {
	size := uint64(len(mem))
	if d.Length == 0 {
		return nil, fmt.Errorf("%w: %s: empty", ErrOutOfRegion, d)
	}
	if d.Offset > size || d.Length > size-d.Offset {
		return nil, fmt.Errorf("%w: %s: region holds %d bytes", ErrOutOfRegion, d, size)
	}
	return mem[d.Offset : d.Offset+d.Length : d.Offset+d.Length], nil
}
