package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"strings"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Snapshots is a local Pebble store of actor snapshots. A snapshot only
// shortens recovery; the journal always holds every event, so losing the
// store loses nothing.
//
// Keys are "snap/<kind>/<id>/<seq as 16 hex digits>", so the newest snapshot
// of an actor sorts last. Values are a CRC-32C of the encoded Snapshot
// followed by the encoding. The newest Keep snapshots of each actor are kept,
// so a corrupt newest one still leaves an older one to start from.
type Snapshots struct {
	db   *pebble.DB
	log  *slog.Logger
	Keep int
	// mu is held shared by every operation and exclusively by Close: a
	// late operation (an actor's final snapshot after a stop that timed
	// out) gets ErrClosed instead of touching a closed database, which
	// panics.
	mu       sync.RWMutex
	closed   bool
	readOnly bool // Close has nothing to flush
}

// ErrClosed: the store was closed.
var ErrClosed = errors.New("snapshots: store closed")

// rlock makes an operation wait for no Close, or fail after one; the
// caller unlocks s.mu (RUnlock) when done.
func (s *Snapshots) rlock() error {
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// OpenSnapshots opens (creating if needed) the store in dir.
func OpenSnapshots(dir string, log *slog.Logger) (*Snapshots, error) {
	return openSnapshots(dir, log, false)
}

// OpenSnapshotsReadOnly opens an existing store without writing anything
// to it (no new manifest or log, no compaction): for reading a stopped
// node's data, as `triplane replay` does. Writes fail.
func OpenSnapshotsReadOnly(dir string, log *slog.Logger) (*Snapshots, error) {
	return openSnapshots(dir, log, true)
}

func openSnapshots(dir string, log *slog.Logger, readOnly bool) (_ *Snapshots, err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	defer markCorrupt(&err)
	if readOnly && !holdsStore(dir) {
		// Pebble would take a LOCK file in a directory with no store.
		return nil, fmt.Errorf("%w: %s", ErrNoStore, dir)
	}
	plog := log.With("store", "snapshots")
	db, err := pebble.Open(dir, &pebble.Options{ReadOnly: readOnly, Logger: pebbleLogger{plog}, EventListener: &pebble.EventListener{
		// Pebble's default calls Fatalf, from background work too, where
		// nothing can recover it: the process would end. Logged instead;
		// the reads that meet the damage return it as an error.
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			plog.Error("snapshots: on-disk corruption", "info", info.String())
		},
	}})
	if err != nil {
		return nil, fmt.Errorf("snapshots: open %s: %w", dir, err)
	}
	return &Snapshots{db: db, log: log, Keep: 2, readOnly: readOnly}, nil
}

// Close flushes and closes the store.
func (s *Snapshots) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.readOnly {
		return s.db.Close()
	}
	if err := s.db.Flush(); err != nil {
		s.db.Close()
		return fmt.Errorf("snapshots: flush: %w", err)
	}
	return s.db.Close()
}

func actorPrefix(kind, id string) []byte { return []byte("snap/" + kind + "/" + id + "/") }

// ownKey reports whether key, found under actor prefix p, is one of that
// actor's snapshots: p then exactly the 16 hex digits of a sequence. An
// id may hold '/', so the keys of actor x/0 also lie under x's prefix.
func ownKey(p, key []byte) bool { return len(key) == len(p)+16 && isSeq(key[len(p):]) }

func isSeq(b []byte) bool {
	if len(b) != 16 {
		return false
	}
	for _, c := range b {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func snapKey(kind, id string, seq uint64) []byte {
	return fmt.Appendf(actorPrefix(kind, id), "%016x", seq)
}

// upper returns the smallest key greater than every key with prefix p.
func upper(p []byte) []byte {
	u := append([]byte(nil), p...)
	u[len(u)-1]++
	return u
}

// Save stores a snapshot durably and prunes older ones beyond Keep.
func (s *Snapshots) Save(snap *triplanev1.Snapshot) (err error) {
	defer markCorrupt(&err)
	if err := s.rlock(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	if err := CheckName(snap.Kind, snap.ActorId); err != nil {
		return err
	}
	data, err := proto.Marshal(snap)
	if err != nil {
		return fmt.Errorf("snapshots: encode %s/%s: %w", snap.Kind, snap.ActorId, err)
	}
	val := seal(data)
	b := s.db.NewBatch()
	defer b.Close()
	if err := b.Set(snapKey(snap.Kind, snap.ActorId, snap.Seq), val, nil); err != nil {
		return err
	}
	// Prune: keep the newest Keep (counting this one).
	keys, err := s.keys(snap.Kind, snap.ActorId)
	if err != nil {
		return err
	}
	keep := max(s.Keep, 1)
	var older [][]byte
	for _, k := range keys {
		if string(k) < string(snapKey(snap.Kind, snap.ActorId, snap.Seq)) {
			older = append(older, k)
		}
	}
	if n := len(older) - (keep - 1); n > 0 {
		for _, k := range older[:n] {
			if err := b.Delete(k, nil); err != nil {
				return err
			}
		}
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("snapshots: write %s/%s at %d: %w", snap.Kind, snap.ActorId, snap.Seq, err)
	}
	return nil
}

func (s *Snapshots) keys(kind, id string) ([][]byte, error) {
	p := actorPrefix(kind, id)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: upper(p)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out [][]byte
	for ok := it.First(); ok; ok = it.Next() {
		if ownKey(p, it.Key()) {
			out = append(out, append([]byte(nil), it.Key()...))
		}
	}
	return out, it.Error()
}

// ErrNoSnapshot: the actor has no usable snapshot.
var ErrNoSnapshot = errors.New("snapshots: none usable")

// Load returns the newest snapshot of the actor that decodes, passes its
// checksum and has the wanted schema version. Unusable snapshots are logged
// and skipped. It returns ErrNoSnapshot when none is usable.
func (s *Snapshots) Load(kind, id string, schemaVersion uint32) (*triplanev1.Snapshot, error) {
	return s.newestWhere(kind, id, func(key []byte, snap *triplanev1.Snapshot, err error) bool {
		switch {
		case err != nil:
			s.log.Warn("snapshot unusable, trying an older one or the journal", "key", string(key), "err", err)
		case snap.SchemaVersion != schemaVersion:
			s.log.Warn("snapshot has another schema version, trying an older one or the journal",
				"key", string(key), "have", snap.SchemaVersion, "want", schemaVersion)
		case snap.Kind != kind || snap.ActorId != id:
			s.log.Warn("snapshot belongs to another actor", "key", string(key), "actor", snap.Kind+"/"+snap.ActorId)
		default:
			return true
		}
		return false
	})
}

// NewestRecord returns the newest snapshot record of the actor, valid or
// not (the error says why not), as Newest gives it; ErrNoSnapshot when
// the actor has none.
func (s *Snapshots) NewestRecord(kind, id string) (*triplanev1.Snapshot, error) {
	var bad error
	snap, err := s.newestWhere(kind, id, func(_ []byte, _ *triplanev1.Snapshot, err error) bool {
		bad = err
		return true
	})
	if bad != nil {
		return nil, bad
	}
	return snap, err
}

// newestWhere walks the actor's snapshot records from the newest and
// returns the first that take accepts (given it decoded or why not), or
// ErrNoSnapshot.
func (s *Snapshots) newestWhere(kind, id string, take func(key []byte, snap *triplanev1.Snapshot, err error) bool) (_ *triplanev1.Snapshot, err error) {
	defer markCorrupt(&err)
	if err := s.rlock(); err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()
	p := actorPrefix(kind, id)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: upper(p)})
	if err != nil {
		return nil, fmt.Errorf("snapshots: %w", err)
	}
	defer it.Close()
	for ok := it.Last(); ok; ok = it.Prev() {
		if !ownKey(p, it.Key()) {
			continue
		}
		val, err := it.ValueAndErr()
		if err != nil {
			return nil, fmt.Errorf("snapshots: read %s: %w", it.Key(), err)
		}
		snap, err := decodeSnapshot(val)
		if take(it.Key(), snap, err) {
			return snap, nil
		}
	}
	if err := it.Error(); err != nil {
		return nil, fmt.Errorf("snapshots: %w", err)
	}
	return nil, ErrNoSnapshot
}

// seal is how every value is stored: the CRC-32C of data (big endian),
// then data.
func seal(data []byte) []byte {
	return append(binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(data)), crc32.Checksum(data, crcTable)), data...)
}

// unseal returns the data of a sealed value, or what is wrong with it.
func unseal(val []byte) ([]byte, error) {
	if len(val) < 4 {
		return nil, fmt.Errorf("value of %d bytes is too short", len(val))
	}
	if got, want := crc32.Checksum(val[4:], crcTable), binary.BigEndian.Uint32(val); got != want {
		return nil, fmt.Errorf("checksum mismatch (got %08x, want %08x)", got, want)
	}
	return val[4:], nil
}

func decodeSnapshot(val []byte) (*triplanev1.Snapshot, error) {
	data, err := unseal(val)
	if err != nil {
		return nil, err
	}
	snap := &triplanev1.Snapshot{}
	if err := proto.Unmarshal(data, snap); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	return snap, nil
}

// Newest calls fn with the newest raw snapshot record of every actor, valid
// or not (err says why not), for `triplane replay --verify`. fn must not
// call the store: it runs under the store's shared lock, and a Close
// waiting for it would block a second one.
func (s *Snapshots) Newest(fn func(kind, id string, snap *triplanev1.Snapshot, err error) error) (err error) {
	defer markCorrupt(&err)
	if err := s.rlock(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	p := []byte("snap/")
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: upper(p)})
	if err != nil {
		return fmt.Errorf("snapshots: %w", err)
	}
	defer it.Close()
	var prevActor string
	var prevVal []byte
	flush := func() error {
		if prevActor == "" {
			return nil
		}
		kind, id, _ := strings.Cut(prevActor, "/")
		snap, err := decodeSnapshot(prevVal)
		return fn(kind, id, snap, err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		k := string(it.Key())
		rest := strings.TrimPrefix(k, "snap/")
		i := strings.LastIndexByte(rest, '/')
		if i < 0 || !isSeq([]byte(rest[i+1:])) || !strings.Contains(rest[:i], "/") {
			continue
		}
		actor := rest[:i]
		if actor != prevActor {
			if err := flush(); err != nil {
				return err
			}
		}
		prevActor = actor
		v, err := it.ValueAndErr()
		if err != nil {
			return err
		}
		prevVal = append(prevVal[:0], v...)
	}
	if err := it.Error(); err != nil {
		return err
	}
	return flush()
}

// Corrupt overwrites the newest snapshot of an actor with bytes that fail
// their checksum. Tests and fault drills use it; nothing else should.
func (s *Snapshots) Corrupt(kind, id string) error {
	if err := s.rlock(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	keys, err := s.keys(kind, id)
	if err != nil || len(keys) == 0 {
		return fmt.Errorf("snapshots: nothing to corrupt for %s/%s: %v", kind, id, err)
	}
	return s.db.Set(keys[len(keys)-1], []byte("\x00\x00\x00\x00garbage"), pebble.Sync)
}

type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) { p.l.Debug(fmt.Sprintf(format, args...)) }
func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
}
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error("fatal: " + fmt.Sprintf(format, args...))
	panic(fmt.Sprintf(format, args...))
}

// ErrNoStore: a read-only open found no snapshot store in the directory.
var ErrNoStore = errors.New("snapshots: no snapshot store in")

// holdsStore reports whether dir has a Pebble store's manifest marker.
func holdsStore(dir string) bool {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "marker.manifest.") {
			return true
		}
	}
	return false
}

// ErrCorrupt: the snapshot store's files are damaged (Pebble found a
// corruption where the operation read).
var ErrCorrupt = errors.New("snapshots: the store is corrupt")

// markCorrupt makes a Pebble corruption error an ErrCorrupt, so callers
// can tell damage from other failures.
func markCorrupt(err *error) {
	if *err != nil && pebble.IsCorruptionError(*err) {
		*err = fmt.Errorf("%w: %w", ErrCorrupt, *err)
	}
}

// ErrNoState is returned by LoadState when nothing is stored under a name.
var ErrNoState = errors.New("snapshots: no state stored under that name")

// SaveState stores msg under name, outside the actor snapshots: the state
// of a shell that is not an event-sourced actor (a router's KV index view),
// checksummed like a snapshot and replaced on each save.
func (s *Snapshots) SaveState(name string, msg proto.Message) (err error) {
	defer markCorrupt(&err)
	if err := s.rlock(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	if err := CheckName("state", name); err != nil {
		return err
	}
	data, err := proto.Marshal(msg)
	if err != nil {
		return fmt.Errorf("snapshots: encode state %s: %w", name, err)
	}
	if err := s.db.Set([]byte("state/"+name), seal(data), pebble.Sync); err != nil {
		return fmt.Errorf("snapshots: write state %s: %w", name, err)
	}
	return nil
}

// LoadState reads the state stored under name into msg. A corrupt record
// is an error naming it; nothing stored is ErrNoState.
func (s *Snapshots) LoadState(name string, msg proto.Message) (err error) {
	defer markCorrupt(&err)
	if err := s.rlock(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	val, closer, err := s.db.Get([]byte("state/" + name))
	if errors.Is(err, pebble.ErrNotFound) {
		return ErrNoState
	}
	if err != nil {
		return fmt.Errorf("snapshots: read state %s: %w", name, err)
	}
	defer closer.Close()
	data, err := unseal(val)
	if err != nil {
		return fmt.Errorf("snapshots: state %s is corrupt: %w", name, err)
	}
	if err := proto.Unmarshal(data, msg); err != nil {
		return fmt.Errorf("snapshots: state %s: %w", name, err)
	}
	return nil
}
