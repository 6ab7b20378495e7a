package mocker

// blockTable maps the hashes of cached blocks to the blocks: the pool's
// prefix cache index. Blocks are looked up for every admitted prompt and
// registered and evicted as sequences run, and the runtime's map paid for
// that churn in tombstones and probing (4% of a serving simulation). An
// open-addressing table with linear probing, kept at most three quarters
// full, deleting by shifting back the slots that probed past the deleted
// one (no tombstones), with no pointers for the collector. It grows with
// what it holds (a pool of millions of blocks does not pay for its table
// up front).
type blockTable struct {
	slots []tableSlot // len 0 or a power of two
	n     int
}

type tableSlot struct {
	hash  uint64
	block int32
	used  bool
}

const minTableSlots = 16

// spread mixes a block hash into a table position (hashes from tests or
// imports need not be uniform).
func spread(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}

func (t *blockTable) len() int { return t.n }

// find returns the slot holding hash, or the empty slot where it would go
// and false. The table must not be empty.
func (t *blockTable) find(hash uint64) (uint64, bool) {
	mask := uint64(len(t.slots) - 1)
	i := spread(hash) & mask
	for {
		s := &t.slots[i]
		if !s.used {
			return i, false
		}
		if s.hash == hash {
			return i, true
		}
		i = (i + 1) & mask
	}
}

// get returns the block cached under hash.
func (t *blockTable) get(hash uint64) (int32, bool) {
	if t.n == 0 {
		return 0, false
	}
	i, ok := t.find(hash)
	return t.slots[i].block, ok
}

// insert caches b under hash unless the hash is cached already (then it
// changes nothing and returns false).
func (t *blockTable) insert(hash uint64, b int32) bool {
	if 4*(t.n+1) > 3*len(t.slots) {
		t.grow()
	}
	i, ok := t.find(hash)
	if ok {
		return false
	}
	t.slots[i] = tableSlot{hash: hash, block: b, used: true}
	t.n++
	return true
}

func (t *blockTable) grow() {
	old := t.slots
	t.slots = make([]tableSlot, max(2*len(old), minTableSlots))
	mask := uint64(len(t.slots) - 1)
	for _, s := range old {
		if !s.used {
			continue
		}
		i := spread(s.hash) & mask
		for t.slots[i].used {
			i = (i + 1) & mask
		}
		t.slots[i] = s
	}
}

// del forgets hash, if cached.
func (t *blockTable) del(hash uint64) {
	if t.n == 0 {
		return
	}
	i, ok := t.find(hash)
	if !ok {
		return
	}
	t.n--
	// Empty slot i, then move back each later slot of the run whose home
	// does not lie cyclically in (i, j], so lookups never meet a hole
	// before their hash.
	mask := uint64(len(t.slots) - 1)
	for {
		t.slots[i] = tableSlot{}
		j := i
		for {
			j = (j + 1) & mask
			if !t.slots[j].used {
				return
			}
			home := spread(t.slots[j].hash) & mask
			if i <= j {
				if i < home && home <= j {
					continue
				}
			} else if i < home || home <= j {
				continue
			}
			t.slots[i] = t.slots[j]
			i = j
			break
		}
	}
}

// each calls fn with every cached hash and its block, in no particular
// order.
func (t *blockTable) each(fn func(hash uint64, b int32)) {
	if t.n == 0 {
		return
	}
	for i := range t.slots {
		if s := &t.slots[i]; s.used {
			fn(s.hash, s.block)
		}
	}
}
