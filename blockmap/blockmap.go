// Package blockmap maps KV block hashes to small values: the mock engine's
// prefix-cache index, and a worker's blocks in the KV event log and in the
// router's view of it. Blocks are stored and evicted there at event rate,
// and the runtime's map paid for that churn in tombstones, growth and
// rehashing (4-5% of a serving simulation each).
//
// A Map is an open-addressing table with linear probing, kept at most three
// quarters full, that deletes by shifting back the slots that probed past
// the deleted one (no tombstones) and holds no pointers for the collector
// (with a pointer-free value). Block hashes come from prompts, which users
// choose: each map mixes its hashes with a random seed of its own, so that
// nobody can choose prompts whose blocks pile up in one run of slots.
// Iteration order is unspecified, as a map's. Not safe for concurrent use.
package blockmap

import "math/rand/v2"

// Map is a map from block hash to V. The zero value is an empty map.
type Map[V any] struct {
	slots []slot[V] // len 0 or a power of two
	n     int
	seed  uint64
}

type slot[V any] struct {
	hash uint64
	used bool
	val  V
}

const minSlots = 16

// home is the slot where hash's probe starts.
func (m *Map[V]) home(hash uint64, mask uint64) uint64 {
	// MurmurHash3's finaliser, of the seeded hash: every bit of the
	// input moves about half the output bits.
	h := hash ^ m.seed
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h & mask
}

// Len is the number of hashes held.
func (m *Map[V]) Len() int { return m.n }

// find returns the slot holding hash, or the empty slot where it would go
// and false. The table must not be empty.
func (m *Map[V]) find(hash uint64) (uint64, bool) {
	mask := uint64(len(m.slots) - 1)
	i := m.home(hash, mask)
	for {
		s := &m.slots[i]
		if !s.used {
			return i, false
		}
		if s.hash == hash {
			return i, true
		}
		i = (i + 1) & mask
	}
}

// Get returns the value held for hash.
func (m *Map[V]) Get(hash uint64) (V, bool) {
	if m.n == 0 {
		var zero V
		return zero, false
	}
	i, ok := m.find(hash)
	return m.slots[i].val, ok
}

// Insert holds v for hash unless hash is held already; then it changes
// nothing and returns false.
func (m *Map[V]) Insert(hash uint64, v V) bool {
	m.reserve()
	i, ok := m.find(hash)
	if ok {
		return false
	}
	m.slots[i] = slot[V]{hash: hash, used: true, val: v}
	m.n++
	return true
}

// Set holds v for hash, replacing what was held.
func (m *Map[V]) Set(hash uint64, v V) {
	m.reserve()
	i, ok := m.find(hash)
	if !ok {
		m.n++
	}
	m.slots[i] = slot[V]{hash: hash, used: true, val: v}
}

// reserve makes room for one more hash.
func (m *Map[V]) reserve() {
	if 4*(m.n+1) <= 3*len(m.slots) {
		return
	}
	old := m.slots
	if old == nil && m.seed == 0 {
		m.seed = rand.Uint64()
	}
	m.slots = make([]slot[V], max(2*len(old), minSlots))
	mask := uint64(len(m.slots) - 1)
	for _, s := range old {
		if !s.used {
			continue
		}
		i := m.home(s.hash, mask)
		for m.slots[i].used {
			i = (i + 1) & mask
		}
		m.slots[i] = s
	}
}

// Delete forgets hash, if held.
func (m *Map[V]) Delete(hash uint64) {
	if m.n == 0 {
		return
	}
	i, ok := m.find(hash)
	if !ok {
		return
	}
	m.n--
	// Empty slot i, then move back each later slot of the run whose home
	// does not lie cyclically in (i, j], so lookups never meet a hole
	// before their hash.
	mask := uint64(len(m.slots) - 1)
	for {
		m.slots[i] = slot[V]{}
		j := i
		for {
			j = (j + 1) & mask
			if !m.slots[j].used {
				return
			}
			home := m.home(m.slots[j].hash, mask)
			if i <= j {
				if i < home && home <= j {
					continue
				}
			} else if i < home || home <= j {
				continue
			}
			m.slots[i] = m.slots[j]
			i = j
			break
		}
	}
}

// Clear forgets every hash, keeping the table.
func (m *Map[V]) Clear() {
	if m.n > 0 {
		clear(m.slots)
		m.n = 0
	}
}

// Each calls fn with every hash held and its value, in no particular
// order. fn must not change the map.
func (m *Map[V]) Each(fn func(hash uint64, v V)) {
	if m.n == 0 {
		return
	}
	for i := range m.slots {
		if s := &m.slots[i]; s.used {
			fn(s.hash, s.val)
		}
	}
}
