package mocker

import (
	"encoding/binary"
	"unsafe"

	"github.com/cespare/xxhash/v2"

	"github.com/triplane-dev/triplane/blockmap"
	"github.com/triplane-dev/triplane/engine"
)

// pool is a paged KV cache: NumBlocks blocks of BlockBytes real bytes.
// A full block whose contents are known is registered under its chained
// hash and can be shared by every sequence with the same prefix. Registered
// blocks nobody holds stay cached in LRU order until space is needed.
type pool struct {
	blockBytes int
	data       []byte
	meta       []blockMeta
	free       []int32             // never used, or released unregistered
	cached     blockmap.Map[int32] // hash -> block
	lruHead    int32               // least recently released
	lruTail    int32
	lruCount   int
	used       int // blocks with ref > 0
	events     []engine.KVEvent
	nextEvent  uint64
}

type blockMeta struct {
	ref        int32
	hash       uint64
	parent     uint64
	registered bool
	// imported: registered by adopt (a peer's transfer) and not yet
	// taken by an admitted sequence, for the hit rate.
	imported   bool
	prev, next int32 // LRU links, -1 when not in the LRU
	inLRU      bool
}

func newPool(blocks, blockBytes int) *pool {
	p := &pool{blockBytes: blockBytes, data: make([]byte, blocks*blockBytes), meta: make([]blockMeta, blocks),
		lruHead: -1, lruTail: -1, nextEvent: 1}
	p.free = make([]int32, blocks)
	for i := range blocks {
		p.free[i] = int32(blocks - 1 - i) // pop from the end: block 0 first
		p.meta[i].prev, p.meta[i].next = -1, -1
	}
	return p
}

func (p *pool) emit(kind engine.KVEventKind, hash, parent uint64) {
	if len(p.events) == cap(p.events) {
		// Events are appended to a chunk that successive steps share
		// (takeEvents hands out full slices of it): one allocation for many
		// steps instead of one or more per step.
		p.events = append(make([]engine.KVEvent, 0, max(64, 2*len(p.events))), p.events...)
	}
	p.events = append(p.events, engine.KVEvent{ID: p.nextEvent, Kind: kind, Hash: hash, Parent: parent})
	p.nextEvent++
}

// takeEvents returns the events emitted since the last call (nil for none)
// and forgets them. The slice is full, and later events go past its end:
// the caller may keep it.
func (p *pool) takeEvents() []engine.KVEvent {
	n := len(p.events)
	if n == 0 {
		return nil
	}
	ev := p.events[:n:n]
	p.events = p.events[n:]
	return ev
}

// Block returns the bytes of block b.
func (p *pool) Block(b int32) []byte {
	return p.data[int(b)*p.blockBytes : int(b+1)*p.blockBytes]
}

// lookup returns the cached block for hash and takes a reference on it.
func (p *pool) lookup(hash uint64) (int32, bool) {
	b, ok := p.cached.Get(hash)
	if !ok {
		return 0, false
	}
	p.ref(b)
	return b, true
}

func (p *pool) ref(b int32) {
	m := &p.meta[b]
	if m.ref == 0 {
		p.lruRemove(b)
		p.used++
	}
	m.ref++
}

// alloc takes a fresh block, evicting the least recently used cached one
// when no block is free. It fails only when every block is held.
func (p *pool) alloc() (int32, bool) {
	var b int32
	switch {
	case len(p.free) > 0:
		b = p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
	case p.lruHead >= 0:
		b = p.lruHead
		p.lruRemove(b)
		m := &p.meta[b]
		p.cached.Delete(m.hash)
		p.emit(engine.KVRemoved, m.hash, 0)
		m.registered, m.imported, m.hash, m.parent = false, false, 0, 0
	default:
		return 0, false
	}
	p.meta[b].ref = 1
	p.used++
	return b, true
}

// release drops a reference; an unreferenced registered block stays cached.
func (p *pool) release(b int32) {
	m := &p.meta[b]
	m.ref--
	if m.ref > 0 {
		return
	}
	p.used--
	if m.registered {
		p.lruPush(b)
		return
	}
	p.free = append(p.free, b)
}

// register makes a full block shareable under its hash and fills it with
// bytes derived from the hash, so a transferred copy can be verified. When
// another block already holds the hash (two sequences computed the same
// block at once), the caller keeps its private copy unregistered.
func (p *pool) register(b int32, hash, parent uint64) bool {
	if !p.cached.Insert(hash, b) {
		return false
	}
	m := &p.meta[b]
	m.registered, m.hash, m.parent = true, hash, parent
	Fill(p.Block(b), hash)
	p.emit(engine.KVStored, hash, parent)
	return true
}

// adopt registers a block whose bytes were written by a peer, after
// checking they are the contents of hash. A block already cached under
// hash elsewhere is left private (like register). False: wrong bytes.
func (p *pool) adopt(b int32, hash, parent uint64) bool {
	if !Verify(p.Block(b), hash) {
		return false
	}
	if !p.cached.Insert(hash, b) {
		return true
	}
	m := &p.meta[b]
	m.registered, m.imported, m.hash, m.parent = true, true, hash, parent
	p.emit(engine.KVStored, hash, parent)
	return true
}

// Verify reports whether b holds the contents of the block with hash.
func Verify(b []byte, hash uint64) bool {
	x := hash | 1
	for i := 0; i+8 <= len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		if binary.LittleEndian.Uint64(b[i:]) != x {
			return false
		}
	}
	return true
}

// Fill writes the deterministic contents of a block with the given hash.
func Fill(dst []byte, hash uint64) {
	x := hash | 1
	for i := 0; i+8 <= len(dst); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(dst[i:], x)
	}
}

func (p *pool) lruPush(b int32) {
	m := &p.meta[b]
	m.prev, m.next, m.inLRU = p.lruTail, -1, true
	p.lruCount++
	if p.lruTail >= 0 {
		p.meta[p.lruTail].next = b
	} else {
		p.lruHead = b
	}
	p.lruTail = b
}

func (p *pool) lruRemove(b int32) {
	m := &p.meta[b]
	if !m.inLRU {
		return
	}
	if m.prev >= 0 {
		p.meta[m.prev].next = m.next
	} else {
		p.lruHead = m.next
	}
	if m.next >= 0 {
		p.meta[m.next].prev = m.prev
	} else {
		p.lruTail = m.prev
	}
	m.prev, m.next, m.inLRU = -1, -1, false
	p.lruCount--
}

// Cached returns the hashes of every registered block, for checks.
func (p *pool) Cached() map[uint64]uint64 {
	out := make(map[uint64]uint64, p.cached.Len())
	p.cached.Each(func(h uint64, b int32) { out[h] = p.meta[b].parent })
	return out
}

// BlockHash chains a block's tokens onto its parent's hash.
func BlockHash(parent uint64, tokens []uint32) uint64 {
	// The bytes are the parent then each token, little-endian. A block
	// that fits a buffer (every usual block size) is hashed in one call,
	// the same hash as streaming them (a Digest's Write and Sum64 cost
	// more than the hashing).
	var buf [512]byte
	if 8+4*len(tokens) <= len(buf) {
		return sumInto(buf[:], parent, tokens)
	}
	var d xxhash.Digest // on the stack: this runs for every block of every prompt
	d.Reset()
	// Longer blocks go in in chunks, since a 4-byte Write per token was
	// most of the cost.
	binary.LittleEndian.PutUint64(buf[:], parent)
	n := 8
	for _, t := range tokens {
		if n == len(buf) {
			_, _ = d.Write(buf[:n])
			n = 0
		}
		binary.LittleEndian.PutUint32(buf[n:], t)
		n += 4
	}
	_, _ = d.Write(buf[:n])
	return d.Sum64()
}

// sumInto hashes parent and tokens laid out in buf, which holds them.
func sumInto(buf []byte, parent uint64, tokens []uint32) uint64 {
	binary.LittleEndian.PutUint64(buf, parent)
	// On a little-endian machine the tokens' memory already is their
	// bytes: one copy instead of a store per token halves the hash's cost.
	if littleEndian && len(tokens) > 0 {
		copy(buf[8:], unsafe.Slice((*byte)(unsafe.Pointer(&tokens[0])), 4*len(tokens)))
	} else {
		for i, t := range tokens {
			binary.LittleEndian.PutUint32(buf[8+4*i:], t)
		}
	}
	return xxhash.Sum64(buf[:8+4*len(tokens)])
}

// BlockHashes returns the chained hashes of the full blocks of tokens.
func BlockHashes(tokens []uint32, blockSize int) []uint64 {
	n := len(tokens) / blockSize
	out := make([]uint64, n)
	var parent uint64
	for i := range n {
		parent = BlockHash(parent, tokens[i*blockSize:(i+1)*blockSize])
		out[i] = parent
	}
	return out
}

// littleEndian: the machine stores a uint32 as its little-endian bytes.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1
