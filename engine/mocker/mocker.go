// Package mocker is Triplane's default engine: a mock with real behaviour
// and no GPU. It keeps a paged KV block pool of real bytes with chained
// block hashes, prefix reuse and LRU eviction, schedules requests in batches
// within sequence and token limits (chunked prefill, recompute preemption
// when blocks run out), emits KV events with monotonic ids, and says how
// long each iteration would take with Dynamo's mocker timing model.
//
// It is a pure state machine: no goroutines, clocks or randomness; the
// generated tokens are a function of the request id and position. The
// worker actor and the simulator drive it the same way.
package mocker

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/fault"
)

// Config of the mock engine. Zero fields take the defaults noted.
type Config struct {
	BlockSize      int     // tokens per KV block; default 64
	NumBlocks      int     // blocks in the pool; default 4096
	BlockBytes     int     // bytes per block; default 2048 (a multiple of 8)
	MaxBatchTokens int     // prefill plus decode tokens per iteration; default 8192
	MaxSeqs        int     // running sequences; default 256
	MaxWaiting     int     // queued requests before Add refuses; default 1024
	SpeedUp        float64 // divides every modelled duration; default 1
	// Prefill ms = PrefillA*t^2 + PrefillB*t + PrefillC for t new tokens in
	// the batch (Dynamo mocker's fit).
	PrefillA, PrefillB, PrefillC float64
	// Decode ms = DecodeA*u^2 + DecodeB*u + DecodeC for KV occupancy u in
	// [0, 1]: decoding slows as the cache fills.
	DecodeA, DecodeB, DecodeC float64
	Vocab                     uint32 // token ids are below it; default 32000
	// Faults are the engine's fault points (FaultPoints), switched on by
	// the simulator; nil in production.
	Faults fault.Points
}

// The engine's fault points: legal but rare paths a simulated run can make
// happen (package fault).
const (
	// FaultSlowStep makes an iteration take ten times its modelled time (a
	// straggling GPU step).
	FaultSlowStep = "mocker.step.slow"
	// FaultDeferAdmit admits no waiting request this iteration, room or not.
	FaultDeferAdmit = "mocker.admit.defer"
	// FaultEvictUnused drops every cached block nobody holds before the
	// iteration (a burst of memory pressure), announcing each removal.
	FaultEvictUnused = "mocker.cache.evict-unused"
)

// FaultPoints lists the engine's fault points.
var FaultPoints = []string{FaultSlowStep, FaultDeferAdmit, FaultEvictUnused}

// Defaults fills zero fields.
func (c *Config) Defaults() {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.BlockSize, 64)
	def(&c.NumBlocks, 4096)
	def(&c.BlockBytes, 2048)
	def(&c.MaxBatchTokens, 8192)
	def(&c.MaxSeqs, 256)
	def(&c.MaxWaiting, 1024)
	if c.SpeedUp == 0 {
		c.SpeedUp = 1
	}
	if c.PrefillA == 0 && c.PrefillB == 0 && c.PrefillC == 0 {
		c.PrefillA, c.PrefillB, c.PrefillC = 4.209989e-7, 1.518344e-2, 16.50142
	}
	if c.DecodeA == 0 && c.DecodeB == 0 && c.DecodeC == 0 {
		c.DecodeA, c.DecodeB, c.DecodeC = -25.74, 54.01, 5.74
	}
	if c.Vocab == 0 {
		c.Vocab = 32000
	}
}

// Bounds of one engine's pool: blocks are numbered with int32, and the
// pool's bytes are real memory.
const (
	MaxBlocks    = 1 << 24
	MaxPoolBytes = 1 << 40
)

// Validate reports a configuration that cannot work.
func (c *Config) Validate() error {
	switch {
	case c.BlockSize < 1 || c.NumBlocks < 2 || c.BlockBytes < 8 || c.BlockBytes%8 != 0:
		return fmt.Errorf("mocker: block size %d tokens, %d blocks of %d bytes: want >= 1, >= 2, a multiple of 8",
			c.BlockSize, c.NumBlocks, c.BlockBytes)
	case c.NumBlocks > MaxBlocks || c.BlockBytes > MaxPoolBytes/c.NumBlocks:
		// Checked before anything is allocated: a pool this size would
		// end the process (a length out of range, or out of memory).
		return fmt.Errorf("mocker: %d blocks of %d bytes: at most %d blocks and %d GiB in all",
			c.NumBlocks, c.BlockBytes, MaxBlocks, MaxPoolBytes>>30)
	case c.MaxBatchTokens < 1 || c.MaxSeqs < 1 || c.MaxWaiting < 1:
		return fmt.Errorf("mocker: batch tokens %d, sequences %d, waiting %d: all must be positive", c.MaxBatchTokens, c.MaxSeqs, c.MaxWaiting)
	case c.SpeedUp <= 0 || math.IsInf(c.SpeedUp, 0) || math.IsNaN(c.SpeedUp):
		return fmt.Errorf("mocker: speed-up %v must be a positive number", c.SpeedUp)
	}
	return nil
}

// Engine is the mock engine.
type Engine struct {
	cfg     Config
	pool    *pool
	waiting []*seq
	running []*seq
	byID    map[string]*seq
	// outs are the outputs of the step being run (inStep); each seq finds
	// its own by outStep/outIdx.
	outs []engine.Output
	// toks backs every output's Tokens in one step (a sequence generates
	// at most one token per step), so a step allocates nothing per token.
	toks    []uint32
	stepNo  uint64
	inStep  bool
	scratch []*seq
	// took and hashes are admit's scratch lists of a prefix's cached
	// blocks.
	took    []int32
	hashes  []uint64
	imports map[string]*importing

	// promptTokens and cachedTokens make the hit rate (Load): each
	// request's prompt and the part of it found cached, counted once, at
	// its first admission; blocks imported for a request and not yet
	// taken by any count as not found (they were computed elsewhere, for
	// it: a decode worker importing every prompt would otherwise report a
	// perfect hit rate without reusing anything).
	promptTokens, cachedTokens uint64
}

var _ engine.Engine = (*Engine)(nil)

type seq struct {
	id        string
	idHash    uint64   // of id, for tokenAt
	tokens    []uint32 // prompt, then generated
	prompt    int      // prompt length (grows on preemption: generated tokens are recomputed)
	maxTokens int
	generated int
	computed  int // tokens whose KV is computed
	blocks    []int32
	hashes    []uint64 // hashes of the full blocks, as far as registered
	cached    int      // prompt tokens found cached at its first admission (imported ones included)
	reported  bool     // cached count reported
	counted   bool     // prompt counted in the hit rate (at its first admission)
	isRunning bool
	outStep   uint64 // step whose output outIdx is
	outIdx    int
}

// New creates a mock engine.
func New(cfg Config) (*Engine, error) { return NewWithMemory(cfg, nil) }

// NewWithMemory creates a mock engine whose KV blocks live in mem
// (NumBlocks*BlockBytes bytes), for example a data-plane region that peers
// write transferred blocks into. nil allocates.
func NewWithMemory(cfg Config, mem []byte) (*Engine, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if mem != nil && len(mem) != cfg.NumBlocks*cfg.BlockBytes {
		return nil, fmt.Errorf("mocker: memory of %d bytes for %d blocks of %d bytes", len(mem), cfg.NumBlocks, cfg.BlockBytes)
	}
	p := newPool(cfg.NumBlocks, cfg.BlockBytes)
	if mem != nil {
		clear(mem)
		p.data = mem
	}
	return &Engine{cfg: cfg, pool: p, byID: map[string]*seq{}, imports: map[string]*importing{}}, nil
}

// Config returns the effective configuration.
func (e *Engine) Config() Config { return e.cfg }

// Add queues a request.
func (e *Engine) Add(r engine.Request) error {
	switch {
	case r.ID == "":
		return fmt.Errorf("%w: empty id", engine.ErrBadRequest)
	case len(r.Tokens) == 0:
		return fmt.Errorf("%w: %s has an empty prompt", engine.ErrBadRequest, r.ID)
	case r.MaxTokens < 1:
		return fmt.Errorf("%w: %s asks for %d tokens", engine.ErrBadRequest, r.ID, r.MaxTokens)
	case e.byID[r.ID] != nil:
		return fmt.Errorf("%w: %s is already running", engine.ErrBadRequest, r.ID)
	case len(e.waiting) >= e.cfg.MaxWaiting:
		return fmt.Errorf("%w: %d requests waiting", engine.ErrQueueFull, len(e.waiting))
	}
	need := (len(r.Tokens) + r.MaxTokens + e.cfg.BlockSize - 1) / e.cfg.BlockSize
	if need > e.cfg.NumBlocks {
		return fmt.Errorf("%w: %s needs %d blocks, the pool has %d", engine.ErrTooLarge, r.ID, need, e.cfg.NumBlocks)
	}
	for _, t := range r.Tokens {
		if t >= e.cfg.Vocab {
			return fmt.Errorf("%w: %s has token %d outside the vocabulary of %d", engine.ErrBadRequest, r.ID, t, e.cfg.Vocab)
		}
	}
	// Room for the tokens it will generate (up to a bound: MaxTokens may
	// be large and the request short-lived), so decoding rarely regrows.
	tokens := append(make([]uint32, 0, len(r.Tokens)+min(r.MaxTokens, 1024)), r.Tokens...)
	s := &seq{id: r.ID, idHash: xxhash.Sum64String(r.ID), tokens: tokens, prompt: len(r.Tokens), maxTokens: r.MaxTokens}
	e.waiting = append(e.waiting, s)
	e.byID[r.ID] = s
	return nil
}

// importing is a reservation of blocks that a peer fills with a
// transferred prefix.
type importing struct {
	hashes []uint64 // the blocks to import, in prefix order
	parent uint64   // parent of hashes[0]
	blocks []int32  // where each lands
	held   []int32  // leading blocks already cached, referenced meanwhile
}

// Reservation says where a transferred prefix must land.
type Reservation struct {
	// Cached is the number of leading blocks already in the cache: they
	// need no transfer.
	Cached int
	// Blocks are the pool indexes (block i starts at i*BlockBytes) for the
	// hashes after the cached ones, in order.
	Blocks []int
}

// ErrImport reports a reservation that cannot be made or committed.
var ErrImport = errors.New("mocker: import")

// ReserveImport allocates blocks for a prefix (its chained block hashes)
// that a peer will transfer: the leading blocks already cached are kept
// and skipped, the rest get fresh blocks. It fails when the pool cannot
// hold them now; nothing is then reserved.
func (e *Engine) ReserveImport(id string, hashes []uint64) (Reservation, error) {
	if id == "" || e.imports[id] != nil {
		return Reservation{}, fmt.Errorf("%w: reservation id %q empty or in use", ErrImport, id)
	}
	im := &importing{}
	for _, h := range hashes {
		b, ok := e.pool.lookup(h)
		if !ok {
			break
		}
		im.held = append(im.held, b)
	}
	cached := len(im.held)
	if cached > 0 {
		im.parent = hashes[cached-1]
	}
	im.hashes = hashes[cached:]
	// Check room first: allocating block by block would evict cached
	// blocks before finding out the reservation cannot fit.
	if room := len(e.pool.free) + e.pool.lruCount; room < len(im.hashes) {
		e.drop(im)
		return Reservation{}, fmt.Errorf("%w: %d blocks wanted, %d free or evictable", ErrImport, len(im.hashes), room)
	}
	for range im.hashes {
		b, ok := e.pool.alloc()
		if !ok {
			e.drop(im)
			return Reservation{}, fmt.Errorf("%w: %d blocks wanted, the pool is full", ErrImport, len(im.hashes))
		}
		im.blocks = append(im.blocks, b)
	}
	e.imports[id] = im
	r := Reservation{Cached: cached}
	for _, b := range im.blocks {
		r.Blocks = append(r.Blocks, int(b))
	}
	return r, nil
}

func (e *Engine) drop(im *importing) {
	for _, b := range im.held {
		e.pool.release(b)
	}
	for _, b := range im.blocks {
		e.pool.release(b)
	}
}

// CommitImport checks every transferred block's bytes against its hash
// and adds the good ones to the prefix cache (announced as stored). A block
// whose bytes are wrong is never cached; it and the blocks after it (their
// prefix is broken) are freed, and the error says which. It returns how
// many blocks were added.
func (e *Engine) CommitImport(id string) (int, error) { return e.CommitImportFrom(id, nil) }

// CommitImportFrom is CommitImport for blocks that landed elsewhere (a
// staging area peers write to): src(i) is the i-th reserved block's bytes,
// copied into the engine's block before it is checked.
func (e *Engine) CommitImportFrom(id string, src func(i int) []byte) (int, error) {
	im := e.imports[id]
	if im == nil {
		return 0, fmt.Errorf("%w: no reservation %q", ErrImport, id)
	}
	delete(e.imports, id)
	defer e.drop(im)
	parent := im.parent
	for i, b := range im.blocks {
		if src != nil {
			copy(e.pool.Block(b), src(i))
		}
		if !e.pool.adopt(b, im.hashes[i], parent) {
			return i, fmt.Errorf("%w: block %d of %q (hash %016x) does not hold its contents", ErrImport, i, id, im.hashes[i])
		}
		parent = im.hashes[i]
	}
	return len(im.blocks), nil
}

// TakeEvents returns the KV events raised outside Step (by CommitImport)
// and forgets them.
func (e *Engine) TakeEvents() []engine.KVEvent { return e.pool.takeEvents() }

// AbortImport frees a reservation.
func (e *Engine) AbortImport(id string) {
	if im := e.imports[id]; im != nil {
		delete(e.imports, id)
		e.drop(im)
	}
}

// Cancel stops a request and frees its blocks.
func (e *Engine) Cancel(id string) bool {
	s := e.byID[id]
	if s == nil {
		return false
	}
	e.finish(s, "cancelled", nil)
	return true
}

// Idle reports whether there is nothing to do.
func (e *Engine) Idle() bool { return len(e.waiting) == 0 && len(e.running) == 0 }

// Load reports the engine's load.
func (e *Engine) Load() engine.Load {
	l := engine.Load{Active: len(e.running), Waiting: len(e.waiting), BlocksUsed: e.pool.used, BlocksTotal: e.cfg.NumBlocks}
	if e.promptTokens > 0 {
		l.HitRate = float64(e.cachedTokens) / float64(e.promptTokens)
	}
	return l
}

// Cached returns the hashes (with parents) of every block in the prefix
// cache: the truth a router's index should converge to.
func (e *Engine) Cached() map[uint64]uint64 { return e.pool.Cached() }

// IsCached reports whether the block with the given hash is in the prefix
// cache, and CachedLen how many blocks are: Cached without the copy.
func (e *Engine) IsCached(hash uint64) bool {
	_, ok := e.pool.cached.Get(hash)
	return ok
}

// CachedLen is the number of blocks in the prefix cache.
func (e *Engine) CachedLen() int { return e.pool.cached.Len() }

// BlockBytes returns the contents of the cached block with the given hash.
func (e *Engine) BlockBytes(hash uint64) ([]byte, bool) {
	b, ok := e.pool.cached.Get(hash)
	if !ok {
		return nil, false
	}
	return e.pool.Block(b), true
}

// Step runs one iteration: admit waiting requests, then one batch of
// decode tokens for running sequences and prefill chunks with the rest of
// the token budget.
func (e *Engine) Step() engine.Step {
	e.stepNo++
	e.outs, e.toks, e.inStep = e.outs[:0], e.toks[:0], true
	defer func() { e.inStep = false }()
	if fault.Fire(e.cfg.Faults, FaultEvictUnused) {
		e.evictUnused()
	}
	if !fault.Fire(e.cfg.Faults, FaultDeferAdmit) {
		e.admit()
	}
	budget := e.cfg.MaxBatchTokens
	var st engine.Step
	// Decode first: every sequence past its prompt generates one token.
	e.scratch = append(e.scratch[:0], e.running...)
	for _, s := range e.scratch {
		if !s.isRunning || s.computed < s.prompt || budget == 0 {
			continue
		}
		if !e.ensureBlocks(s, len(s.tokens)+1) {
			continue
		}
		budget--
		st.DecodeSeqs++
		e.generate(s)
	}
	// Then prefill, over the same list: the decode loop only removed
	// sequences from the running set (finished or preempted, no longer
	// isRunning), and the rest keep their order there, so this visits what
	// a fresh copy of the running set would.
	for _, s := range e.scratch {
		if !s.isRunning || s.computed >= s.prompt || budget == 0 {
			continue
		}
		n := min(budget, s.prompt-s.computed)
		if !e.ensureBlocks(s, s.computed+n) {
			continue
		}
		budget -= n
		st.PrefillTokens += n
		s.computed += n
		e.registerFull(s)
		if s.computed == s.prompt {
			e.generate(s) // the last prefill chunk yields the first token
		}
	}
	st.Duration = e.duration(st.PrefillTokens, st.DecodeSeqs)
	if st.Duration > 0 && fault.Fire(e.cfg.Faults, FaultSlowStep) {
		st.Duration *= 10
	}
	clear(e.scratch)
	st.Outputs = e.outs // in batch order, deterministic
	st.Events = e.pool.takeEvents()
	return st
}

// Quiet says how many of the engine's next iterations are quiet, and how
// long each takes. An iteration is quiet when nothing waits for admission
// and every running sequence only decodes its next token: none is in
// prefill, needs a new block, fills one (no KV event) or finishes; and the
// engine has no fault points. Such an iteration changes nothing but the
// sequences' tokens, and the next ones stay the same length (the pool does
// not change), so a driver that does not need each token at its own time
// runs a row of them at once with StepQuiet: the simulator spends one
// event, not one per iteration, on a batch that only decodes.
func (e *Engine) Quiet() (n int, each time.Duration) {
	// KV events raised between steps (an import's evictions) go out with
	// the next Step, which StepQuiet is not.
	if e.cfg.Faults != nil || len(e.waiting) > 0 || len(e.running) == 0 || len(e.running) > e.cfg.MaxBatchTokens ||
		len(e.pool.events) > 0 {
		return 0, 0
	}
	bs := e.cfg.BlockSize
	n = math.MaxInt
	for _, s := range e.running {
		if s.computed < s.prompt || !s.reported {
			return 0, 0
		}
		// The j-th iteration from now appends token l+j: its block must be
		// allocated already, and it must not be the last token. Nothing
		// is registered meanwhile: a decoding sequence holds ceil(l/bs)
		// blocks at most, its full ones registered, so every token of the
		// row falls in its last block, which fills (its last token's KV
		// computed) only at the iteration after the row.
		n = min(n, len(s.blocks)*bs-len(s.tokens), s.maxTokens-s.generated-1)
	}
	if n <= 0 {
		return 0, 0
	}
	return n, e.duration(0, len(e.running))
}

// StepQuiet runs n quiet iterations (at most what Quiet says now) as one
// step: each running sequence's output carries its n tokens, Duration is
// the n iterations' total and DecodeSeqs the sequences each decoded. The
// outputs are those of n Steps, merged; no KV events happen in them. A
// driver runs a row before anything else touches the engine (Add, Cancel,
// an import): those change what the row's iterations would have been.
func (e *Engine) StepQuiet(n int) engine.Step {
	if q, _ := e.Quiet(); n <= 0 || n > q {
		// A driver's mistake: stepping on would break the engine's own
		// accounting, so nothing happens.
		return engine.Step{}
	}
	e.stepNo += uint64(n)
	e.outs, e.toks = e.outs[:0], e.toks[:0]
	for _, s := range e.running {
		for range n {
			tok := tokenAt(s.idHash, len(s.tokens), e.cfg.Vocab)
			s.tokens = append(s.tokens, tok)
			e.toks = append(e.toks, tok)
		}
		s.generated += n
		s.computed = len(s.tokens) - 1
		e.outs = append(e.outs, engine.Output{ID: s.id})
	}
	// The tokens are placed once toks stopped growing (it may have moved).
	for i := range e.outs {
		e.outs[i].Tokens = e.toks[i*n : (i+1)*n : (i+1)*n]
	}
	return engine.Step{Duration: time.Duration(n) * e.duration(0, len(e.running)), Outputs: e.outs, DecodeSeqs: len(e.running)}
}

// out is s's output of this step. The pointer is valid until the next
// call that adds an output: use it at once.
func (e *Engine) out(s *seq) *engine.Output {
	if s.outStep != e.stepNo {
		s.outStep, s.outIdx = e.stepNo, len(e.outs)
		e.outs = append(e.outs, engine.Output{ID: s.id})
	}
	return &e.outs[s.outIdx]
}

// generate appends the next token of s.
func (e *Engine) generate(s *seq) {
	tok := tokenAt(s.idHash, len(s.tokens), e.cfg.Vocab)
	s.tokens = append(s.tokens, tok)
	s.generated++
	s.computed = len(s.tokens) - 1 // the new token's KV is computed on the next step
	o := e.out(s)
	if len(o.Tokens) == 0 {
		e.toks = append(e.toks, tok)
		n := len(e.toks)
		o.Tokens = e.toks[n-1 : n : n] // full: a second token would copy, not overwrite a neighbour's
	} else {
		o.Tokens = append(o.Tokens, tok)
	}
	if !s.reported {
		o.CachedTokens, s.reported = s.cached, true
	}
	e.registerFull(s)
	if s.generated >= s.maxTokens {
		e.finish(s, "length", nil)
	}
}

// TokenAt is the mock engine's generated token at a position: a function
// of the request id and position, so a resumed request continues the same
// text.
func TokenAt(id string, pos int, vocab uint32) uint32 {
	return tokenAt(xxhash.Sum64String(id), pos, vocab)
}

// tokenAt mixes the id's hash (computed once per request) with the
// position: this runs once per generated token.
func tokenAt(idHash uint64, pos int, vocab uint32) uint32 {
	x := idHash ^ uint64(pos)*0x9e3779b97f4a7c15
	// splitmix64's finalizer: every bit of the position moves the result.
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return uint32(x % uint64(vocab))
}

// admit moves waiting requests into the running set while sequence and
// block limits allow, taking cached prefix blocks.
func (e *Engine) admit() {
	for len(e.waiting) > 0 && len(e.running) < e.cfg.MaxSeqs {
		s := e.waiting[0]
		bs := e.cfg.BlockSize
		// Prefix reuse: full prompt blocks already cached. The block holding
		// the last prompt token is always computed, so a prompt never starts
		// fully cached (there must be one token to prefill).
		full := (s.prompt - 1) / bs
		var parent uint64
		took, hashes := e.took[:0], e.hashes[:0] // reused: a request may wait here many steps
		for i := range full {
			h := BlockHash(parent, s.tokens[i*bs:(i+1)*bs])
			b, ok := e.pool.lookup(h)
			if !ok {
				break
			}
			took, hashes, parent = append(took, b), append(hashes, h), h
		}
		e.took, e.hashes = took, hashes
		// Admit only when the rest of the prompt fits now.
		need := (s.prompt+bs-1)/bs - len(took)
		if need > len(e.pool.free)+e.pool.lruCount {
			for _, b := range took {
				e.pool.release(b)
			}
			return
		}
		// The sequence's own block and hash lists, with room for the blocks
		// it will fill (up to a bound), so that it rarely regrows them.
		room := min((len(s.tokens)+s.maxTokens-s.generated+bs-1)/bs, (s.prompt+bs-1)/bs+64)
		s.blocks = append(make([]int32, 0, max(room, len(took))), took...)
		s.hashes = append(make([]uint64, 0, max(room, len(hashes))), hashes...)
		s.computed = len(took) * bs
		// Imported blocks are fresh until a sequence takes them: a miss
		// for that one, hits for the ones after.
		hit := 0
		for _, b := range took {
			if m := &e.pool.meta[b]; m.imported {
				m.imported = false
			} else {
				hit++
			}
		}
		if !s.counted {
			// Once: a sequence preempted (before or after its first token)
			// comes back with a longer "prompt" and finds its own blocks
			// cached; neither is a request's prompt or a hit.
			s.counted, s.cached = true, s.computed
			e.promptTokens += uint64(s.prompt)
			e.cachedTokens += uint64(hit * bs)
		}
		e.waiting = e.waiting[1:]
		e.running = append(e.running, s)
		s.isRunning = true
	}
}

// ensureBlocks allocates blocks so s can hold tokens tokens, preempting the
// most recently admitted other sequence when the pool is exhausted.
func (e *Engine) ensureBlocks(s *seq, tokens int) bool {
	for len(s.blocks)*e.cfg.BlockSize < tokens {
		b, ok := e.pool.alloc()
		if !ok {
			victim := e.running[len(e.running)-1]
			e.preempt(victim)
			if victim == s {
				return false
			}
			continue
		}
		s.blocks = append(s.blocks, b)
	}
	return true
}

// preempt frees a running sequence's blocks and queues it again at the
// front; its generated tokens become prompt and are recomputed.
func (e *Engine) preempt(s *seq) {
	e.removeRunning(s)
	for _, b := range s.blocks {
		e.pool.release(b)
	}
	s.blocks, s.hashes, s.computed = nil, nil, 0
	s.prompt = len(s.tokens)
	e.waiting = append([]*seq{s}, e.waiting...)
}

// registerFull registers every newly full, computed block of s.
func (e *Engine) registerFull(s *seq) {
	bs := e.cfg.BlockSize
	for len(s.hashes) < s.computed/bs && len(s.hashes) < len(s.blocks) {
		i := len(s.hashes)
		var parent uint64
		if i > 0 {
			parent = s.hashes[i-1]
		}
		h := BlockHash(parent, s.tokens[i*bs:(i+1)*bs])
		e.pool.register(s.blocks[i], h, parent)
		s.hashes = append(s.hashes, h)
	}
}

func (e *Engine) finish(s *seq, reason string, err error) {
	delete(e.byID, s.id)
	e.removeRunning(s)
	for i, w := range e.waiting {
		if w == s {
			e.waiting = append(e.waiting[:i], e.waiting[i+1:]...)
			break
		}
	}
	for _, b := range s.blocks {
		e.pool.release(b)
	}
	s.blocks = nil
	// Outside a step (Cancel) the caller learns the outcome directly.
	if e.inStep {
		o := e.out(s)
		o.Finished, o.Reason, o.Err = true, reason, err
	}
}

func (e *Engine) removeRunning(s *seq) {
	s.isRunning = false
	for i, r := range e.running {
		if r == s {
			e.running = append(e.running[:i], e.running[i+1:]...)
			return
		}
	}
}

// Clear drops every unreferenced cached block (an operator's reset).
func (e *Engine) Clear() []engine.KVEvent {
	e.evictUnused()
	return e.pool.takeEvents()
}

// evictUnused drops every cached block nobody holds and announces it: one
// "cleared" when the cache is left empty, else a removal per block (blocks
// held by running sequences stay cached, so "cleared" would be a lie; the
// simulator's evict-unused fault point found that Clear announced nothing
// in that case).
func (e *Engine) evictUnused() {
	var dropped []uint64
	for e.pool.lruHead >= 0 {
		b := e.pool.lruHead
		e.pool.lruRemove(b)
		m := &e.pool.meta[b]
		e.pool.cached.Delete(m.hash)
		dropped = append(dropped, m.hash)
		m.registered, m.imported, m.hash, m.parent = false, false, 0, 0
		e.pool.free = append(e.pool.free, b)
	}
	if e.pool.cached.Len() == 0 {
		e.pool.emit(engine.KVCleared, 0, 0)
		return
	}
	for _, h := range dropped {
		e.pool.emit(engine.KVRemoved, h, 0)
	}
}

// duration is the modelled time of a batch.
func (e *Engine) duration(prefill, decodes int) time.Duration {
	c := e.cfg
	var ms float64
	if prefill > 0 {
		t := float64(prefill)
		ms += c.PrefillA*t*t + c.PrefillB*t + c.PrefillC
	}
	if decodes > 0 {
		u := float64(e.pool.used) / float64(c.NumBlocks)
		ms += max(c.DecodeA*u*u+c.DecodeB*u+c.DecodeC, 0)
	}
	return time.Duration(ms / c.SpeedUp * float64(time.Millisecond))
}
