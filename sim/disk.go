package sim

import (
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/planes/data"
)

// Disk is the simulated snapshot store (Pebble's role): a write is only
// durable once synced, a sync happens after a seeded delay, and a machine
// crash loses what was not synced — or leaves a torn record whose checksum
// fails. Recovery must then fall back to an older snapshot or the journal.
type Disk struct {
	w       *World
	durable map[actors.Address][]diskRecord
	pending map[actors.Address][]diskRecord
	// SyncDelay bounds the wait before a write is synced; default 0..20 ms.
	SyncDelay time.Duration
	// Counters.
	Writes, Lost, Torn uint64
}

type diskRecord struct {
	seq   uint64
	pos   journal.Position
	state []byte
	crc   uint32
}

// NewDisk creates an empty simulated disk in w.
func NewDisk(w *World) *Disk {
	return &Disk{w: w, durable: map[actors.Address][]diskRecord{}, pending: map[actors.Address][]diskRecord{},
		SyncDelay: 20 * time.Millisecond}
}

// Write stores a snapshot of an actor at pos; it becomes durable when the
// next sync runs.
func (d *Disk) Write(a actors.Address, pos journal.Position, state proto.Message) {
	b, err := proto.Marshal(state)
	if err != nil {
		panic(err) // states are protobuf: cannot fail
	}
	rec := diskRecord{seq: pos.Seq, pos: pos, state: b, crc: data.Checksum(b)}
	d.Writes++
	d.pending[a] = append(d.pending[a], rec)
	d.w.After(time.Duration(d.w.Rand().Int64N(int64(d.SyncDelay)+1)), func() { d.sync(a, rec) })
}

func (d *Disk) sync(a actors.Address, rec diskRecord) {
	p := d.pending[a]
	for i := range p {
		if p[i].seq == rec.seq && p[i].crc == rec.crc {
			d.pending[a] = append(p[:i:i], p[i+1:]...)
			d.durable[a] = append(d.durable[a], rec)
			if n := len(d.durable[a]); n > 2 {
				d.durable[a] = d.durable[a][n-2:] // keep the newest two, as Pebble snapshots do
			}
			return
		}
	}
}

// Crash is a machine crash for an actor's data: unsynced writes are lost,
// and the last one may be left torn.
func (d *Disk) Crash(a actors.Address) {
	p := d.pending[a]
	if len(p) == 0 {
		return
	}
	d.Lost += uint64(len(p))
	delete(d.pending, a)
	if d.w.Chance(0.3) {
		torn := p[len(p)-1]
		torn.state = append([]byte(nil), torn.state[:len(torn.state)/2]...)
		d.durable[a] = append(d.durable[a], torn)
		d.Torn++
	}
}

// Newest returns the newest durable snapshot of a that is whole, decoded
// into state, as the real host's recovery (actors.Recover over
// journal.Snapshots) picks it: torn records are skipped for older ones; but
// when the newest whole one lies past the journal's highest sequence or
// does not decode, there is no snapshot and the journal is replayed whole.
func (d *Disk) Newest(a actors.Address, highest uint64, state proto.Message) (journal.Position, bool) {
	recs := d.durable[a]
	for i := len(recs) - 1; i >= 0; i-- {
		r := recs[i]
		if data.Checksum(r.state) != r.crc {
			continue // torn: Snapshots.Load tries an older one
		}
		if r.seq > highest || proto.Unmarshal(r.state, state) != nil {
			return journal.Position{}, false
		}
		return r.pos, true
	}
	return journal.Position{}, false
}
