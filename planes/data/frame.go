package data

import (
	"bufio"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/triplane-dev/triplane/planes/data/crc32c"
)

// Wire format of block frames (TCP lanes and the shared-memory control
// socket). Every frame starts with a fixed 40-byte header, little endian:
//
//	0  magic   u32  "TPD1"
//	4  type    u8
//	5  flags   u8   (must be 0)
//	6  resv    u16  (must be 0)
//	8  region  u32
//	12 length  u32  payload bytes (data frames) or landed bytes (acks, shm)
//	16 offset  u64
//	24 seq     u64  sender-chosen frame number, echoed in the ack
//	32 crc     u32  CRC-32C (Castagnoli) of the block bytes
//	36 hcrc    u32  CRC-32C of header bytes 0..36
//
// A data frame is followed by length payload bytes, which the receiver reads
// straight into the region bytes named by (region, offset, length).
//
// A blocks frame carries a run of blocks whose destinations are contiguous
// in one region, each with its own checksum: its header's crc is the
// CRC-32C of a block table that follows the header,
//
//	0  count   u32  blocks in the frame, 1..MaxFrameBlocks
//	4  resv    u32  (must be 0)
//	8  count × (length u32, crc u32)  each block's bytes and CRC-32C
//
// and the blocks' bytes follow the table, length (the header's) in all,
// landing at (region, offset). Small blocks then cost one header, one
// window slot and one acknowledgement per frame instead of per block, and
// the receiver reads the payload straight into the region instead of
// through its buffer.
const (
	HeaderSize = 40
	magic      = 0x31445054 // "TPD1" little endian

	// MaxFrame bounds one frame's payload; larger ops are split.
	MaxFrame = 16 << 20
	// maxMessage bounds the payload of hello and error frames.
	maxMessage = 4096
	// MaxFrameBlocks bounds the blocks of one blocks frame (a 32 KiB
	// table).
	MaxFrameBlocks = 4096
	// blockTableHeader and blockEntry are the sizes of a block table's
	// parts.
	blockTableHeader = 8
	blockEntry       = 8
)

// FrameType says what a frame carries.
type FrameType uint8

// Frame types.
const (
	FrameData   FrameType = 1 // block bytes follow
	FrameAck    FrameType = 2 // receiver: bytes of frame seq landed and verified
	FrameHello  FrameType = 3 // sender's first frame; payload is the auth token
	FrameError  FrameType = 4 // receiver's last frame; payload says why
	FrameMapReq FrameType = 5 // shm: map region; reply carries its fd
	FrameMapRes FrameType = 6 // shm: offset field is the region size
	FrameLanded FrameType = 7 // shm: sender copied the bytes into the mapping
	FrameBlocks FrameType = 8 // a block table, then the blocks' bytes
)

func (t FrameType) String() string {
	switch t {
	case FrameData:
		return "data"
	case FrameAck:
		return "ack"
	case FrameHello:
		return "hello"
	case FrameError:
		return "error"
	case FrameMapReq:
		return "map-request"
	case FrameMapRes:
		return "map-response"
	case FrameLanded:
		return "landed"
	case FrameBlocks:
		return "blocks"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Header is a decoded frame header.
type Header struct {
	Type   FrameType
	Region uint32
	Length uint32
	Offset uint64
	Seq    uint64
	CRC    uint32
}

// ack is the cumulative acknowledgement of every frame up to h: it repeats
// h's descriptor and checksum, which the sender checks against the frame
// it sent with that seq.
func (h Header) ack() Header {
	h.Type = FrameAck
	return h
}

// Desc is the descriptor the header names.
func (h Header) Desc() Descriptor {
	return Descriptor{Region: h.Region, Offset: h.Offset, Length: uint64(h.Length)}
}

// Checksum is CRC-32C of b, the checksum of every block and frame.
func Checksum(b []byte) uint32 { return crc32c.Checksum(b) }

// ErrBadFrame: the bytes are not a valid frame.
var ErrBadFrame = errors.New("data: malformed frame")

// Encode writes h into b (at least HeaderSize bytes).
func (h Header) Encode(b []byte) {
	_ = b[HeaderSize-1]
	binary.LittleEndian.PutUint32(b[0:], magic)
	b[4] = byte(h.Type)
	b[5] = 0
	binary.LittleEndian.PutUint16(b[6:], 0)
	binary.LittleEndian.PutUint32(b[8:], h.Region)
	binary.LittleEndian.PutUint32(b[12:], h.Length)
	binary.LittleEndian.PutUint64(b[16:], h.Offset)
	binary.LittleEndian.PutUint64(b[24:], h.Seq)
	binary.LittleEndian.PutUint32(b[32:], h.CRC)
	binary.LittleEndian.PutUint32(b[36:], crc32c.Checksum(b[:36]))
}

// DecodeHeader parses and validates a header: magic, header checksum, known
// type, zero flags, and a payload length within the type's bound.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: %d header bytes, want %d", ErrBadFrame, len(b), HeaderSize)
	}
	if m := binary.LittleEndian.Uint32(b[0:]); m != magic {
		return Header{}, fmt.Errorf("%w: bad magic %#x", ErrBadFrame, m)
	}
	if want, got := crc32c.Checksum(b[:36]), binary.LittleEndian.Uint32(b[36:]); want != got {
		return Header{}, fmt.Errorf("%w: header checksum %#x, computed %#x", ErrBadFrame, got, want)
	}
	if b[5] != 0 || binary.LittleEndian.Uint16(b[6:]) != 0 {
		return Header{}, fmt.Errorf("%w: reserved bits set", ErrBadFrame)
	}
	h := Header{
		Type:   FrameType(b[4]),
		Region: binary.LittleEndian.Uint32(b[8:]),
		Length: binary.LittleEndian.Uint32(b[12:]),
		Offset: binary.LittleEndian.Uint64(b[16:]),
		Seq:    binary.LittleEndian.Uint64(b[24:]),
		CRC:    binary.LittleEndian.Uint32(b[32:]),
	}
	switch h.Type {
	case FrameData, FrameLanded, FrameBlocks:
		if h.Length == 0 || h.Length > MaxFrame {
			return Header{}, fmt.Errorf("%w: %s frame of %d bytes, want 1..%d", ErrBadFrame, h.Type, h.Length, MaxFrame)
		}
	case FrameHello, FrameError:
		if h.Length > maxMessage {
			return Header{}, fmt.Errorf("%w: %s frame of %d bytes, want at most %d", ErrBadFrame, h.Type, h.Length, maxMessage)
		}
	case FrameMapReq, FrameMapRes:
		if h.Length != 0 {
			return Header{}, fmt.Errorf("%w: %s frame with length %d, want 0", ErrBadFrame, h.Type, h.Length)
		}
	case FrameAck:
	default:
		return Header{}, fmt.Errorf("%w: unknown frame type %d", ErrBadFrame, uint8(h.Type))
	}
	return h, nil
}

// blockSum is one block of a blocks frame's table.
type blockSum struct {
	n   uint32
	crc uint32
}

// appendBlockTable appends the head of a block table of count blocks to
// b; appendBlock then appends each block's entry. The frame header's crc is
// the table's checksum.
func appendBlockTable(b []byte, count int) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(count))
	return binary.LittleEndian.AppendUint32(b, 0)
}

func appendBlock(b []byte, n, crc uint32) []byte {
	b = binary.LittleEndian.AppendUint32(b, n)
	return binary.LittleEndian.AppendUint32(b, crc)
}

// readBlockTable reads the table of blocks frame h into buf (reused
// between frames) and checks it: its checksum, the block count, and block
// lengths that are positive and add up to the frame's length.
func readBlockTable(br *bufio.Reader, h Header, buf []blockSum) ([]blockSum, error) {
	var head [blockTableHeader]byte
	if _, err := io.ReadFull(br, head[:]); err != nil {
		return nil, tableErr(h, err)
	}
	count := binary.LittleEndian.Uint32(head[0:])
	if count == 0 || count > MaxFrameBlocks || binary.LittleEndian.Uint32(head[4:]) != 0 {
		return nil, reject("malformed", fmt.Errorf("%w: blocks frame %d: %d blocks (want 1..%d) or reserved bits set", ErrBadFrame, h.Seq, count, MaxFrameBlocks))
	}
	crc := crc32c.Checksum(head[:])
	buf = buf[:0]
	var total uint64
	// The entries are checksummed and parsed where they sit in br's
	// buffer, as much of them at a time as it holds.
	for left := int(count) * blockEntry; left > 0; {
		b, err := br.Peek(min(left, br.Size()/blockEntry*blockEntry))
		if err != nil {
			return nil, tableErr(h, err)
		}
		crc = crc32c.Update(crc, b)
		for i := 0; i < len(b); i += blockEntry {
			p := blockSum{n: binary.LittleEndian.Uint32(b[i:]), crc: binary.LittleEndian.Uint32(b[i+4:])}
			if p.n == 0 {
				return nil, reject("malformed", fmt.Errorf("%w: blocks frame %d: a block of 0 bytes", ErrBadFrame, h.Seq))
			}
			total += uint64(p.n)
			buf = append(buf, p)
		}
		br.Discard(len(b))
		left -= len(b)
	}
	if crc != h.CRC {
		return nil, reject("malformed", fmt.Errorf("%w: blocks frame %d: block table checksum %#x, frame says %#x", ErrBadFrame, h.Seq, crc, h.CRC))
	}
	if total != uint64(h.Length) {
		return nil, reject("length", fmt.Errorf("%w: blocks frame %d: blocks of %d bytes in a frame of %d", ErrBadFrame, h.Seq, total, h.Length))
	}
	return buf, nil
}

// tableErr says why a block table could not be read: a table cut short by
// the end of the connection is the peer's bad input, anything else (a
// timeout, a reset) an I/O failure.
func tableErr(h Header, err error) error {
	err = fmt.Errorf("blocks frame %d: block table: %w", h.Seq, err)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return reject("length", err)
	}
	return err
}

// handshake reads frame headers on a receiving connection and enforces the
// token: when one is configured, the first frame must be a hello carrying
// it. The TCP receiver and the shm server share it.
type handshake struct {
	token         string
	authed, first bool
}

func newHandshake(token string) *handshake {
	return &handshake{token: token, authed: token == "", first: true}
}

// next reads the next header. A clean end of the connection at a frame
// boundary is io.EOF.
func (g *handshake) next(br *bufio.Reader, hdr []byte) (Header, error) {
	if _, err := io.ReadFull(br, hdr); err != nil {
		if errors.Is(err, io.EOF) {
			return Header{}, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Header{}, reject("length", fmt.Errorf("truncated frame header: %w", err))
		}
		return Header{}, fmt.Errorf("read frame header: %w", err)
	}
	h, err := DecodeHeader(hdr)
	if err != nil {
		return Header{}, reject("malformed", err)
	}
	if g.first && h.Type != FrameHello && !g.authed {
		return Header{}, reject("auth", fmt.Errorf("data: first frame is %s, want hello with the token", h.Type))
	}
	g.first = false
	return h, nil
}

// hello reads a hello frame's payload and checks the token.
func (g *handshake) hello(br *bufio.Reader, h Header) error {
	msg := make([]byte, h.Length)
	if _, err := io.ReadFull(br, msg); err != nil {
		return reject("length", fmt.Errorf("hello frame: %w", err))
	}
	if !g.authed {
		if subtle.ConstantTimeCompare(msg, []byte(g.token)) != 1 {
			return reject("auth", errors.New("data: wrong token"))
		}
		g.authed = true
	}
	return nil
}
