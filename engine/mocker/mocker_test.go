package mocker_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/fault"
	"github.com/triplane-dev/triplane/workload"
)

func newEngine(t *testing.T, cfg mocker.Config) *mocker.Engine {
	t.Helper()
	e, err := mocker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func prompt(n int, base uint32) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = base + uint32(i)%1000
	}
	return out
}

// run steps until idle and returns every output by request, every event
// and the modelled time.
func run(t *testing.T, e *mocker.Engine) (map[string][]engine.Output, []engine.KVEvent, time.Duration) {
	t.Helper()
	outs := map[string][]engine.Output{}
	var events []engine.KVEvent
	var total time.Duration
	for i := 0; !e.Idle(); i++ {
		if i > 100000 {
			t.Fatal("engine never went idle")
		}
		st := e.Step()
		total += st.Duration
		for _, o := range st.Outputs {
			o.Tokens = slices.Clone(o.Tokens) // the engine reuses them on its next step
			outs[o.ID] = append(outs[o.ID], o)
		}
		events = append(events, st.Events...)
	}
	return outs, events, total
}

func tokens(os []engine.Output) (n int, last engine.Output) {
	for _, o := range os {
		n += len(o.Tokens)
		last = o
	}
	return n, last
}

func TestGeneratesAndFinishes(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 64})
	if err := e.Add(engine.Request{ID: "a", Tokens: prompt(40, 1), MaxTokens: 10}); err != nil {
		t.Fatal(err)
	}
	outs, _, _ := run(t, e)
	n, last := tokens(outs["a"])
	if n != 10 || !last.Finished || last.Reason != "length" {
		t.Fatalf("got %d tokens, last %+v", n, last)
	}
	if l := e.Load(); l.BlocksUsed != 0 || l.Active != 0 {
		t.Fatalf("blocks held after finishing: %+v", l)
	}
}

func TestPrefixReuseAndChainedHashes(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 64})
	shared := prompt(48, 1)
	_ = e.Add(engine.Request{ID: "a", Tokens: append(append([]uint32{}, shared...), prompt(20, 500)...), MaxTokens: 1})
	run(t, e)
	_ = e.Add(engine.Request{ID: "b", Tokens: append(append([]uint32{}, shared...), prompt(20, 700)...), MaxTokens: 1})
	outs, _, _ := run(t, e)
	if got := outs["b"][0].CachedTokens; got != 48 {
		t.Fatalf("b found %d cached tokens, want the 48 shared ones", got)
	}
	// The same block of tokens under a different parent is a different block.
	blk := prompt(16, 9)
	if mocker.BlockHash(1, blk) == mocker.BlockHash(2, blk) {
		t.Fatal("block hash ignores the parent")
	}
	if l := e.Load(); l.HitRate <= 0 {
		t.Fatalf("hit rate %v", l.HitRate)
	}
}

func TestEvictionIsLRUAndEventsMatchTheCache(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 12})
	view := map[uint64]bool{} // a consumer applying the events
	var lastID uint64
	apply := func(evs []engine.KVEvent) {
		for _, ev := range evs {
			if ev.ID != lastID+1 {
				t.Fatalf("event id %d after %d", ev.ID, lastID)
			}
			lastID = ev.ID
			switch ev.Kind {
			case engine.KVStored:
				view[ev.Hash] = true
			case engine.KVRemoved:
				delete(view, ev.Hash)
			case engine.KVCleared:
				clear(view)
			}
		}
	}
	for i := range 6 {
		_ = e.Add(engine.Request{ID: string(rune('a' + i)), Tokens: prompt(64, uint32(100*i)), MaxTokens: 2})
		_, evs, _ := run(t, e)
		apply(evs)
	}
	truth := e.Cached()
	if len(view) != len(truth) {
		t.Fatalf("consumer view has %d blocks, engine %d", len(view), len(truth))
	}
	for h := range truth {
		if !view[h] {
			t.Fatalf("block %x cached but never announced", h)
		}
		if !e.IsCached(h) {
			t.Fatalf("block %x in Cached but not IsCached", h)
		}
	}
	if e.CachedLen() != len(truth) || e.IsCached(12345) {
		t.Fatalf("CachedLen %d, Cached %d; IsCached of an unknown hash %v", e.CachedLen(), len(truth), e.IsCached(12345))
	}
	// The newest request's blocks survive; the oldest were evicted.
	_ = e.Add(engine.Request{ID: "again-f", Tokens: prompt(64, 500), MaxTokens: 1})
	outs, evs, _ := run(t, e)
	apply(evs)
	if outs["again-f"][0].CachedTokens != 48 {
		t.Errorf("the most recent prompt should still be cached, got %d tokens", outs["again-f"][0].CachedTokens)
	}
	_ = e.Add(engine.Request{ID: "again-a", Tokens: prompt(64, 0), MaxTokens: 1})
	outs, evs, _ = run(t, e)
	apply(evs)
	if outs["again-a"][0].CachedTokens != 0 {
		t.Errorf("the oldest prompt should have been evicted, found %d tokens", outs["again-a"][0].CachedTokens)
	}
	apply(e.Clear())
	if len(view) != len(e.Cached()) {
		t.Errorf("after clear: view %d, engine %d", len(view), len(e.Cached()))
	}
}

func TestTimingModel(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 256, MaxBatchTokens: 4096})
	_ = e.Add(engine.Request{ID: "a", Tokens: prompt(1000, 1), MaxTokens: 1})
	st := e.Step()
	ms := 4.209989e-7*1e6 + 1.518344e-2*1000 + 16.50142
	want := time.Duration(ms * float64(time.Millisecond))
	if st.PrefillTokens != 1000 || st.Duration != want {
		t.Fatalf("prefill of 1000 tokens: %d tokens in %v, want %v", st.PrefillTokens, st.Duration, want)
	}
	fast := newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 256, MaxBatchTokens: 4096, SpeedUp: 100})
	_ = fast.Add(engine.Request{ID: "a", Tokens: prompt(1000, 1), MaxTokens: 1})
	if d, w := fast.Step().Duration, time.Duration(ms/100*float64(time.Millisecond)); d != w {
		t.Fatalf("speed-up 100: %v, want %v", d, w)
	}
}

func TestBatchLimitsAndChunkedPrefill(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 256, MaxSeqs: 2, MaxBatchTokens: 100, MaxWaiting: 3})
	for i := range 3 {
		if err := e.Add(engine.Request{ID: string(rune('a' + i)), Tokens: prompt(250, uint32(i*300)), MaxTokens: 3}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Add(engine.Request{ID: "d", Tokens: prompt(5, 1), MaxTokens: 1}); !errors.Is(err, engine.ErrQueueFull) {
		t.Fatalf("fourth request: %v, want ErrQueueFull", err)
	}
	st := e.Step()
	if st.PrefillTokens != 100 || e.Load().Active != 2 || e.Load().Waiting != 1 {
		t.Fatalf("first step: %d prefill tokens, load %+v", st.PrefillTokens, e.Load())
	}
	outs, _, _ := run(t, e)
	for _, id := range []string{"a", "b", "c"} {
		if n, last := tokens(outs[id]); n != 3 || !last.Finished {
			t.Errorf("%s: %d tokens, finished %v", id, n, last.Finished)
		}
	}
}

func TestPreemptionWhenBlocksRunOut(t *testing.T) {
	// Two requests that cannot both hold their full length at once.
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 10})
	_ = e.Add(engine.Request{ID: "a", Tokens: prompt(60, 1), MaxTokens: 60})
	_ = e.Add(engine.Request{ID: "b", Tokens: prompt(60, 400), MaxTokens: 60})
	outs, _, _ := run(t, e)
	for _, id := range []string{"a", "b"} {
		if n, last := tokens(outs[id]); n != 60 || !last.Finished || last.Reason != "length" {
			t.Errorf("%s: %d tokens, last %+v", id, n, last)
		}
	}
	// Tokens are a function of id and position: a recomputed request
	// continues the same text.
	alone := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 64})
	_ = alone.Add(engine.Request{ID: "a", Tokens: prompt(60, 1), MaxTokens: 60})
	ref, _, _ := run(t, alone)
	var got, want []uint32
	for _, o := range outs["a"] {
		got = append(got, o.Tokens...)
	}
	for _, o := range ref["a"] {
		want = append(want, o.Tokens...)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("token %d differs after preemption", i)
		}
	}
}

func TestBadRequestsAndConfig(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 8})
	for _, r := range []engine.Request{
		{ID: "", Tokens: prompt(4, 1), MaxTokens: 1},
		{ID: "x", MaxTokens: 1},
		{ID: "x", Tokens: prompt(4, 1)},
		{ID: "x", Tokens: prompt(200, 1), MaxTokens: 1},
		{ID: "x", Tokens: []uint32{99999}, MaxTokens: 1},
	} {
		if err := e.Add(r); !errors.Is(err, engine.ErrBadRequest) {
			t.Errorf("%+v: %v, want ErrBadRequest", r, err)
		}
	}
	_ = e.Add(engine.Request{ID: "dup", Tokens: prompt(4, 1), MaxTokens: 1})
	if err := e.Add(engine.Request{ID: "dup", Tokens: prompt(4, 1), MaxTokens: 1}); !errors.Is(err, engine.ErrBadRequest) {
		t.Errorf("duplicate id: %v", err)
	}
	for _, c := range []mocker.Config{{BlockBytes: 12}, {NumBlocks: 1}, {SpeedUp: -1},
		{NumBlocks: 1 << 62}, {NumBlocks: mocker.MaxBlocks + 1}, {NumBlocks: 1 << 20, BlockBytes: 1 << 21}} {
		if _, err := mocker.New(c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	// The largest pool count allowed is fine to validate (not to build here).
	c := mocker.Config{NumBlocks: mocker.MaxBlocks}
	c.Defaults()
	if err := c.Validate(); err != nil {
		t.Errorf("%d blocks refused: %v", mocker.MaxBlocks, err)
	}
}

func TestCancelFreesBlocks(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 16, NumBlocks: 64})
	_ = e.Add(engine.Request{ID: "a", Tokens: prompt(100, 1), MaxTokens: 100})
	e.Step()
	if !e.Cancel("a") || e.Cancel("a") {
		t.Fatal("cancel should succeed once")
	}
	if l := e.Load(); l.BlocksUsed != 0 || !e.Idle() {
		t.Fatalf("after cancel: %+v", l)
	}
}

// The real trace: prompts share prefixes, so the cache hits.
func TestTraceHitsTheCache(t *testing.T) {
	f, err := os.Open("../../../shared/workloads/mooncake_conversation_trace.jsonl")
	if err != nil {
		t.Skipf("trace not present: %v", err)
	}
	defer f.Close()
	recs, err := workload.Read(f, 800)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 300_000, BlockBytes: 8, MaxWaiting: 2000})
	// Requests arrive at their trace times on the engine's modelled clock.
	var now time.Duration
	for i, r := range recs {
		for at := time.Duration(r.Timestamp) * time.Millisecond; now < at && !e.Idle(); {
			now += e.Step().Duration
		}
		now = max(now, time.Duration(r.Timestamp)*time.Millisecond)
		if err := e.Add(engine.Request{ID: string(rune(0x1000 + i)), Tokens: r.Tokens(32000), MaxTokens: min(r.OutputLength, 4)}); err != nil {
			t.Fatal(err)
		}
	}
	run(t, e)
	if hr := e.Load().HitRate; hr < 0.12 { // the trace itself allows 0.19 over these requests
		t.Fatalf("hit rate on the conversation trace %.2f, expected substantial reuse", hr)
	}
	t.Logf("hit rate over %d requests: %.2f", len(recs), e.Load().HitRate)
}

// A prefix computed by one engine (prefill) lands in blocks another engine
// reserved (decode); committed blocks are cached and verified, a corrupted
// one never is.
func TestImportPrefix(t *testing.T) {
	cfg := mocker.Config{BlockSize: 4, NumBlocks: 32, BlockBytes: 64}
	pre := newEngine(t, cfg)
	mem := make([]byte, 32*64)
	dec, err := mocker.NewWithMemory(cfg, mem)
	if err != nil {
		t.Fatal(err)
	}
	toks := prompt(18, 7) // 4 full blocks
	if err := pre.Add(engine.Request{ID: "p", Tokens: toks, MaxTokens: 1}); err != nil {
		t.Fatal(err)
	}
	run(t, pre)
	hashes := mocker.BlockHashes(toks, 4)
	copyIn := func(r mocker.Reservation) {
		for i, b := range r.Blocks {
			src, ok := pre.BlockBytes(hashes[r.Cached+i])
			if !ok {
				t.Fatal("prefill engine lost a block")
			}
			copy(mem[b*64:(b+1)*64], src)
		}
	}
	// A corrupted second block: the first is cached, the rest are not.
	r, err := dec.ReserveImport("x", hashes)
	if err != nil || r.Cached != 0 || len(r.Blocks) != 4 {
		t.Fatalf("reserve %+v %v", r, err)
	}
	copyIn(r)
	mem[r.Blocks[1]*64+5] ^= 1
	if n, err := dec.CommitImport("x"); n != 1 || err == nil {
		t.Fatalf("corrupted import committed %d, %v", n, err)
	}
	if c := dec.Cached(); len(c) != 1 {
		t.Fatalf("cached after a corrupt import: %d blocks", len(c))
	}
	// Again: the first block is already cached and skipped.
	r, err = dec.ReserveImport("y", hashes)
	if err != nil || r.Cached != 1 || len(r.Blocks) != 3 {
		t.Fatalf("reserve again %+v %v", r, err)
	}
	copyIn(r)
	if n, err := dec.CommitImport("y"); n != 3 || err != nil {
		t.Fatalf("commit %d %v", n, err)
	}
	if err := dec.Add(engine.Request{ID: "d", Tokens: toks, MaxTokens: 2}); err != nil {
		t.Fatal(err)
	}
	outs, _, _ := run(t, dec)
	if got := outs["d"][0].CachedTokens; got != 16 {
		t.Fatalf("decode found %d prompt tokens cached, want 16", got)
	}
	if _, err := dec.CommitImport("y"); err == nil {
		t.Fatal("a reservation committed twice")
	}
	dec.AbortImport("nothing") // no-op
	if _, err := mocker.NewWithMemory(cfg, make([]byte, 10)); err == nil {
		t.Fatal("wrong memory size accepted")
	}
}

// Clear (and the evict-unused fault point) announce what they drop: with a
// running sequence still holding blocks, the cache is not empty, so each
// dropped block gets a removal; a follower of the events stays equal to
// the cache either way.
func TestClearAnnouncesDroppedBlocksWhileOthersAreHeld(t *testing.T) {
	for _, hold := range []bool{true, false} {
		e := newEngine(t, mocker.Config{BlockSize: 4, NumBlocks: 64})
		follower := map[uint64]bool{}
		follow := func(evs []engine.KVEvent) {
			for _, ev := range evs {
				switch ev.Kind {
				case engine.KVStored:
					follower[ev.Hash] = true
				case engine.KVRemoved:
					delete(follower, ev.Hash)
				case engine.KVCleared:
					clear(follower)
				}
			}
		}
		_ = e.Add(engine.Request{ID: "done", Tokens: prompt(20, 1), MaxTokens: 2})
		_, evs, _ := run(t, e)
		follow(evs)
		if hold {
			_ = e.Add(engine.Request{ID: "held", Tokens: prompt(20, 500), MaxTokens: 50})
			for range 3 {
				follow(e.Step().Events)
			}
		}
		follow(e.Clear())
		want := map[uint64]bool{}
		for h := range e.Cached() {
			want[h] = true
		}
		if hold && len(want) == 0 {
			t.Fatal("the held sequence's blocks should stay cached")
		}
		if !maps.Equal(follower, want) {
			t.Fatalf("hold %v: the events describe %d blocks, the cache holds %d", hold, len(follower), len(want))
		}
	}
}

// Block hashes cross processes (frontends, routers and workers must agree,
// across versions): these values are the chained xxhash64 of the parent and
// the tokens, little-endian, as first released.
func TestBlockHashGoldenValues(t *testing.T) {
	toks := make([]uint32, 200)
	for i := range toks {
		toks[i] = uint32(i*7919 + 1)
	}
	for _, c := range []struct {
		parent uint64
		tokens []uint32
		want   uint64
	}{
		{0, toks[:16], 0xfbca92996ca24296},
		{0xdeadbeef, toks[:1], 0xcf86df6018526330},
		{42, toks, 0xac9f8d75654f7846}, // longer than one write chunk
	} {
		if got := mocker.BlockHash(c.parent, c.tokens); got != c.want {
			t.Errorf("BlockHash(%#x, %d tokens) = %#x, want %#x", c.parent, len(c.tokens), got, c.want)
		}
	}
}

// Every length hashes the parent's and tokens' little-endian bytes, whether
// they fit BlockHash's buffer (one call) or not (streamed).
func TestBlockHashEveryLength(t *testing.T) {
	toks := make([]uint32, 300)
	for i := range toks {
		toks[i] = uint32(i*7919 + 1)
	}
	for n := range len(toks) + 1 {
		b := binary.LittleEndian.AppendUint64(nil, 99)
		for _, tk := range toks[:n] {
			b = binary.LittleEndian.AppendUint32(b, tk)
		}
		if got, want := mocker.BlockHash(99, toks[:n]), xxhash.Sum64(b); got != want {
			t.Fatalf("BlockHash of %d tokens = %#x, want %#x", n, got, want)
		}
	}
}

// A step's outputs share one token buffer: each output's slice is full, so
// appending to one copies instead of overwriting its neighbour's token.
func TestStepTokensDoNotAlias(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 4, NumBlocks: 64})
	for i := range 3 {
		_ = e.Add(engine.Request{ID: string(rune('a' + i)), Tokens: prompt(6, uint32(100*i+1)), MaxTokens: 5})
	}
	e.Step() // prefill: first tokens
	st := e.Step()
	if len(st.Outputs) != 3 {
		t.Fatalf("%d outputs", len(st.Outputs))
	}
	second := st.Outputs[1].Tokens[0]
	grown := append(st.Outputs[0].Tokens, 7)
	grown[0] = 9
	if st.Outputs[1].Tokens[0] != second || len(st.Outputs[0].Tokens) != 1 || cap(st.Outputs[0].Tokens) != 1 {
		t.Fatal("an output's tokens alias another's")
	}
}

// BlockHash of a 16-token block (the simulator's) and a 64-token one (the
// default), against xxhash of the same bytes already laid out: the ratio is
// what laying them out costs.
func BenchmarkBlockHash(b *testing.B) {
	for _, n := range []int{16, 64} {
		b.Run(fmt.Sprintf("tokens=%d", n), func(b *testing.B) {
			toks := make([]uint32, n)
			for i := range toks {
				toks[i] = uint32(i*7919 + 1)
			}
			raw := binary.LittleEndian.AppendUint64(nil, 7)
			for _, tk := range toks {
				raw = binary.LittleEndian.AppendUint32(raw, tk)
			}
			var sink uint64
			start := time.Now()
			for range b.N {
				sink += xxhash.Sum64(raw)
			}
			base := time.Since(start)
			b.ResetTimer()
			for range b.N {
				sink += mocker.BlockHash(7, toks)
			}
			b.StopTimer()
			if sink == 1 {
				b.Log(sink)
			}
			b.ReportMetric(float64(b.Elapsed())/float64(base), "x-of-xxhash")
		})
	}
}

// quietDriver drives an engine through timed arrivals as a simulator
// does: each Step at its time, the next one after its duration (at least a
// microsecond). With skip, rows of quiet iterations run as one StepQuiet
// at the end of the row, or when an arrival cuts the row short (the
// iterations that started before it run first). It records what an
// observer sees: each request's tokens, when it finished, and the KV
// events with their times.
type quietDriver struct {
	e        *mocker.Engine
	skip     bool
	tokens   map[string][]uint32
	finished map[string]time.Duration
	events   []string
	quiet    int           // quiet iterations pending, the first at from
	from     time.Duration //
	each     time.Duration
	skipped  int
}

type arrival struct {
	at  time.Duration
	req engine.Request
}

func (d *quietDriver) absorb(at time.Duration, st engine.Step) {
	for _, o := range st.Outputs {
		d.tokens[o.ID] = append(d.tokens[o.ID], o.Tokens...)
		if o.Finished {
			d.finished[o.ID] = at
		}
	}
	for _, ev := range st.Events {
		d.events = append(d.events, fmt.Sprintf("%v %v %x %x", at, ev.Kind, ev.Hash, ev.Parent))
	}
}

// catchUp runs the pending quiet iterations that started before now.
func (d *quietDriver) catchUp(now time.Duration) {
	if d.quiet == 0 || now <= d.from {
		return
	}
	m := min(d.quiet, int((now-d.from-1)/d.each)+1)
	d.absorb(d.from, d.e.StepQuiet(m))
	d.quiet, d.from, d.skipped = d.quiet-m, d.from+time.Duration(m)*d.each, d.skipped+m
}

func (d *quietDriver) run(t *testing.T, arrivals []arrival) {
	t.Helper()
	stepAt, scheduled := time.Duration(0), false
	for steps := 0; len(arrivals) > 0 || scheduled; steps++ {
		if steps > 1_000_000 {
			t.Fatal("never went idle")
		}
		// An arrival at the time of an iteration comes first.
		if len(arrivals) > 0 && (!scheduled || arrivals[0].at <= stepAt) {
			a := arrivals[0]
			arrivals = arrivals[1:]
			d.catchUp(a.at)
			if err := d.e.Add(a.req); err != nil {
				t.Fatal(err)
			}
			switch {
			case !scheduled:
				stepAt, scheduled = a.at, true
			case d.quiet > 0:
				stepAt, d.quiet = d.from, 0 // the row ends: the next iteration admits
			}
			continue
		}
		d.catchUp(stepAt)
		st := d.e.Step()
		d.absorb(stepAt, st)
		if scheduled = !d.e.Idle(); scheduled {
			stepAt += max(st.Duration, time.Microsecond)
			if d.skip {
				q, each := d.e.Quiet()
				d.quiet, d.from, d.each = q, stepAt, max(each, time.Microsecond)
				stepAt += time.Duration(q) * d.each
			}
		}
	}
}

// Running rows of quiet iterations at once changes nothing an observer
// sees: every request gets the same tokens and finishes at the same time,
// and the KV events are the same at the same times, through admissions,
// preemptions and evictions (a small pool) and arrivals in the middle of
// a row.
func TestStepQuietMatchesSteps(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 7))
		var arrivals []arrival
		at := time.Duration(0)
		for i := range 60 {
			at += time.Duration(rng.ExpFloat64() * float64(8*time.Millisecond))
			p := prompt(4+rng.IntN(60), uint32(1+rng.IntN(3)*1000))
			arrivals = append(arrivals, arrival{at, engine.Request{ID: fmt.Sprintf("r%d", i), Tokens: p, MaxTokens: 1 + rng.IntN(80)}})
		}
		cfg := mocker.Config{BlockSize: 8, NumBlocks: 48, MaxBatchTokens: 64, MaxSeqs: 8}
		plain := &quietDriver{e: newEngine(t, cfg), tokens: map[string][]uint32{}, finished: map[string]time.Duration{}}
		skip := &quietDriver{e: newEngine(t, cfg), skip: true, tokens: map[string][]uint32{}, finished: map[string]time.Duration{}}
		plain.run(t, arrivals)
		skip.run(t, arrivals)
		switch {
		case skip.skipped == 0:
			t.Fatalf("seed %d: no quiet iteration", seed)
		case !maps.EqualFunc(plain.tokens, skip.tokens, slices.Equal):
			t.Fatalf("seed %d: tokens differ", seed)
		case !maps.Equal(plain.finished, skip.finished):
			t.Fatalf("seed %d: finish times differ:\n%v\n%v", seed, plain.finished, skip.finished)
		case !slices.Equal(plain.events, skip.events):
			t.Fatalf("seed %d: KV events differ", seed)
		case len(plain.finished) != 60:
			t.Fatalf("seed %d: %d of 60 finished", seed, len(plain.finished))
		}
		if seed == 0 {
			t.Logf("seed 0: %d of the iterations quiet, %d events", skip.skipped, len(skip.events))
		}
	}
}

// Quiet is 0 whenever an iteration would do more than decode, and
// StepQuiet refuses more than Quiet allows.
func TestQuietBounds(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 4, NumBlocks: 64})
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("idle engine: %d quiet iterations", n)
	}
	_ = e.Add(engine.Request{ID: "a", Tokens: prompt(6, 1), MaxTokens: 20})
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("a request waiting: %d quiet iterations", n)
	}
	e.Step() // prefill: 6 tokens and the first generated: 7 tokens, 2 blocks, 1 registered
	// Token 8 fits block 2, and block 2 is registered only once token 8's
	// KV is computed, an iteration later: one quiet iteration.
	if n, _ := e.Quiet(); n != 1 {
		t.Fatalf("after the prefill: %d quiet, want 1", n)
	}
	e.Step()
	// Token 9 needs block 3: not quiet.
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("next iteration allocates a block: %d quiet", n)
	}
	e.Step() // 9 tokens, 3 blocks, block 2 registered
	// Tokens 10-12 fit block 3, which fills only with token 12's KV.
	n, each := e.Quiet()
	if n != 3 || each <= 0 {
		t.Fatalf("quiet %d, %v; want 3 and a duration", n, each)
	}
	if st := e.StepQuiet(4); len(st.Outputs) != 0 {
		t.Fatal("StepQuiet ran past Quiet")
	}
	st := e.StepQuiet(3)
	if len(st.Outputs) != 1 || len(st.Outputs[0].Tokens) != 3 || st.Duration != 3*each || len(st.Events) != 0 {
		t.Fatalf("StepQuiet(3) = %+v", st)
	}
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("after the row: %d quiet", n)
	}

	add := func(e *mocker.Engine, id string, toks []uint32, max int) {
		t.Helper()
		if err := e.Add(engine.Request{ID: id, Tokens: toks, MaxTokens: max}); err != nil {
			t.Fatal(err)
		}
	}
	// The last token finishes a request: the row stops before it.
	e = newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 64})
	add(e, "b", prompt(6, 1), 5)
	e.Step() // token 1 of 5
	if n, _ := e.Quiet(); n != 3 {
		t.Fatalf("tokens 2-4 of 5 are quiet, the 5th finishes: Quiet %d", n)
	}
	// Events raised between steps go out with the next Step.
	if _, err := e.ReserveImport("im", []uint64{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	e.AbortImport("im")
	e.Clear() // hands back its own events: none stays pending
	if n, _ := e.Quiet(); n != 3 {
		t.Fatalf("nothing pending: Quiet %d", n)
	}

	// More running sequences than the batch's tokens: some wait a turn.
	e = newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 64, MaxBatchTokens: 20})
	for i := range 3 {
		add(e, fmt.Sprint(i), prompt(6, 1), 30)
	}
	e.Step()
	if n, _ := e.Quiet(); n == 0 {
		t.Fatal("3 decoding sequences within a 20-token batch: not quiet")
	}
	e = newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 64, MaxBatchTokens: 2})
	for i := range 3 {
		add(e, fmt.Sprint(i), prompt(1, 1), 30)
	}
	for range 3 {
		e.Step()
	}
	if l := e.Load(); l.Active != 3 || l.Waiting != 0 {
		t.Fatalf("precondition: 3 running, none waiting: %+v", l)
	}
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("3 sequences, 2 tokens a batch: Quiet %d", n)
	}

	// Fault points could fire in any iteration: never quiet (the same
	// engine without them is).
	for _, faults := range []fault.Points{nil, never{}} {
		e = newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 64, Faults: faults})
		add(e, "c", prompt(6, 1), 30)
		e.Step()
		if n, _ := e.Quiet(); (n == 0) != (faults != nil) {
			t.Fatalf("fault points %v: Quiet %d", faults, n)
		}
	}
}

// never is fault points that never fire (but are there).
type never struct{}

func (never) Fire(string) bool { return false }

// Pending KV events (an import's evictions, raised between steps) end a
// row: StepQuiet would not hand them out, Step does.
func TestQuietWaitsForPendingEvents(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 4, NumBlocks: 6})
	if err := e.Add(engine.Request{ID: "old", Tokens: prompt(8, 500), MaxTokens: 1}); err != nil {
		t.Fatal(err)
	}
	e.Step() // old runs and finishes: its two full blocks stay cached, unused
	if err := e.Add(engine.Request{ID: "a", Tokens: prompt(6, 1), MaxTokens: 10}); err != nil {
		t.Fatal(err)
	}
	e.Step()
	e.Step()
	e.Step() // a: 9 tokens in 3 blocks, 3 tokens quiet
	if n, _ := e.Quiet(); n == 0 {
		t.Fatal("precondition: a row ahead")
	}
	// The import takes the last free block and evicts old's cached ones.
	if _, err := e.ReserveImport("im", []uint64{11, 12, 13}); err != nil {
		t.Fatal(err)
	}
	if n, _ := e.Quiet(); n != 0 {
		t.Fatalf("evictions pending: Quiet %d", n)
	}
	if st := e.Step(); len(st.Events) == 0 {
		t.Fatal("the next Step did not hand out the evictions")
	}
}

// A merged step's outputs do not share memory: appending to one copies
// rather than overwriting the next one's tokens.
func TestStepQuietTokensDoNotAlias(t *testing.T) {
	e := newEngine(t, mocker.Config{BlockSize: 64, NumBlocks: 64})
	for i := range 3 {
		_ = e.Add(engine.Request{ID: fmt.Sprint(i), Tokens: prompt(6, uint32(100*i+1)), MaxTokens: 30})
	}
	e.Step()
	n, _ := e.Quiet()
	st := e.StepQuiet(n)
	if len(st.Outputs) != 3 || n < 2 {
		t.Fatalf("%d outputs, %d tokens each", len(st.Outputs), n)
	}
	next := slices.Clone(st.Outputs[1].Tokens)
	_ = append(st.Outputs[0].Tokens, 99999)
	if !slices.Equal(st.Outputs[1].Tokens, next) {
		t.Fatal("appending to one output's tokens overwrote the next one's")
	}
}

// The hit rate counts each request's prompt once, at its first admission:
// a sequence preempted during its prefill (before its first token) and
// admitted again found its own blocks cached and was counted a second
// time, prompt and "hits" both. Blocks imported for a request are not
// hits for it (they were computed elsewhere for it), only for later
// requests that reuse them.
func TestHitRateCountsEachPromptOnce(t *testing.T) {
	// b is admitted beside a, prefills one block, and is preempted when a
	// needs a block to decode; then it runs alone.
	e := newEngine(t, mocker.Config{BlockSize: 4, NumBlocks: 5, MaxBatchTokens: 8})
	_ = e.Add(engine.Request{ID: "a", Tokens: prompt(12, 1), MaxTokens: 4})
	_ = e.Add(engine.Request{ID: "b", Tokens: prompt(12, 500), MaxTokens: 2})
	// The scenario needs b preempted: both running, then one waiting again.
	outs := map[string][]engine.Output{}
	both, preempted := false, false
	for i := 0; !e.Idle(); i++ {
		if i > 1000 {
			t.Fatal("engine never went idle")
		}
		for _, o := range e.Step().Outputs {
			o.Tokens = slices.Clone(o.Tokens)
			outs[o.ID] = append(outs[o.ID], o)
		}
		l := e.Load()
		both = both || l.Active == 2
		preempted = preempted || (both && l.Waiting == 1)
	}
	if !preempted {
		t.Fatal("precondition: b was never preempted")
	}
	for _, id := range []string{"a", "b"} {
		if n, last := tokens(outs[id]); n == 0 || !last.Finished || last.Reason != "length" {
			t.Fatalf("%s: %d tokens, last %+v", id, n, last)
		}
		if c := outs[id][0].CachedTokens; c != 0 {
			t.Errorf("%s reported %d cached prompt tokens; nothing was cached when it arrived", id, c)
		}
	}
	if hr := e.Load().HitRate; hr != 0 {
		t.Fatalf("hit rate %v after two prompts that shared nothing, one preempted during its prefill", hr)
	}
	// Now a real hit: b's prompt again (b ran last; its blocks are cached).
	_ = e.Add(engine.Request{ID: "b2", Tokens: prompt(12, 500), MaxTokens: 1})
	run(t, e)
	if hr, want := e.Load().HitRate, 8.0/36; hr != want { // two of b's three blocks (the last is always computed)
		t.Fatalf("hit rate %v, want %v", hr, want)
	}

	// Imported blocks: not hits for the request they were imported for.
	cfg := mocker.Config{BlockSize: 4, NumBlocks: 32}
	pre, dec := newEngine(t, cfg), newEngine(t, cfg)
	toks := prompt(17, 7) // 4 full blocks
	_ = pre.Add(engine.Request{ID: "p", Tokens: toks, MaxTokens: 1})
	run(t, pre)
	hashes := mocker.BlockHashes(toks, 4)
	r, err := dec.ReserveImport("im", hashes)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := dec.CommitImportFrom("im", func(i int) []byte {
		b, _ := pre.BlockBytes(hashes[r.Cached+i])
		return b
	}); n != 4 || err != nil {
		t.Fatalf("commit %d %v", n, err)
	}
	_ = dec.Add(engine.Request{ID: "d", Tokens: toks, MaxTokens: 1})
	run(t, dec)
	if hr := dec.Load().HitRate; hr != 0 {
		t.Fatalf("hit rate %v: the imported prefix counted as found in the cache", hr)
	}
	// A second request with the same prompt reuses them: 16 of 17 hit.
	_ = dec.Add(engine.Request{ID: "d2", Tokens: toks, MaxTokens: 1})
	run(t, dec)
	if hr, want := dec.Load().HitRate, 16.0/34; hr != want {
		t.Fatalf("hit rate %v, want %v", hr, want)
	}
}
