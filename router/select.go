package router

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
)

// Policy names how a worker is chosen.
type Policy string

// The policies.
const (
	PolicyKV          Policy = "kv"           // prefix overlap weighed against load
	PolicyRoundRobin  Policy = "round-robin"  // in turn
	PolicyRandom      Policy = "random"       // uniformly
	PolicyLeastLoaded Policy = "least-loaded" // fewest active requests, then fewest blocks used
	PolicyPrefixHash  Policy = "prefix-hash"  // the first block's hash picks the worker (rendezvous hashing)
)

// Policies lists the accepted policies.
var Policies = []Policy{PolicyKV, PolicyRoundRobin, PolicyRandom, PolicyLeastLoaded, PolicyPrefixHash}

// ParsePolicy validates a policy name.
func ParsePolicy(s string) (Policy, error) {
	for _, p := range Policies {
		if string(p) == s {
			return p, nil
		}
	}
	return "", fmt.Errorf("router: unknown policy %q (want one of %v)", s, Policies)
}

// Candidate is a worker that may take the request, with its latest load
// and how many of the request's leading blocks it holds.
type Candidate struct {
	ID     string
	Active int // requests running or waiting
	// Waiting is how many of the Active requests are queued, not yet
	// admitted: they hold no blocks yet, so BlocksUsed does not show them.
	Waiting     int
	BlocksUsed  int
	BlocksTotal int
	Overlap     int // leading blocks of the request the worker holds (Index.Overlap)
	// PendingPrefill is the blocks of prefill the router knows are ahead
	// of this request on the worker (requests it sent there that have not
	// produced their first token); charged like the request's own prefill.
	PendingPrefill int
}

// Request is what a policy needs to know about a request: how many blocks
// its prompt spans and the hash of the first (prefix-hash keys on it).
type Request struct {
	Blocks    int
	FirstHash uint64
}

// RequestOf describes a prompt by its chained block hashes.
func RequestOf(hashes []uint64) Request {
	r := Request{Blocks: len(hashes)}
	if len(hashes) > 0 {
		r.FirstHash = hashes[0]
	}
	return r
}

// WithOverlap returns cands with each worker's overlap with hashes filled
// in from the index.
func (ix *Index) WithOverlap(hashes []uint64, cands []Candidate) []Candidate {
	out := slices.Clone(cands)
	ix.SetOverlap(hashes, out)
	return out
}

// SetOverlap is WithOverlap in place: it fills in each candidate's overlap
// with hashes (a router building its candidates per request owns them, and
// copying them again was an allocation per request).
func (ix *Index) SetOverlap(hashes []uint64, cands []Candidate) {
	var buf [64]int32
	depth := ix.depths(hashes, buf[:0])
	for i := range cands {
		cands[i].Overlap = 0
		if w, ok := ix.ids[cands[i].ID]; ok {
			cands[i].Overlap = int(depth[w])
		}
	}
}

// Params tune the kv policy. A candidate's cost is
//
//	OverlapWeight*(prefillBlocks + WaitingPrefill*Waiting + PendingPrefill) + BlocksUsed
//
// prefillBlocks being the request's blocks the worker does not hold (the
// prefill the request needs there) and WaitingPrefill*Waiting an estimate
// of the prefill of the requests queued ahead of it, both weighed against
// the blocks in use. The cheapest worker wins; among equally cheap ones the
// one with the fewest active requests, then the first by id.
type Params struct {
	// OverlapWeight weighs blocks to prefill against blocks in use.
	// 0 means DefaultOverlapWeight.
	OverlapWeight float64
	// Temperature 0 picks the cheapest worker; above 0 samples with
	// probability proportional to exp(-normalized cost / Temperature).
	Temperature float64
	// WaitingPrefill is the blocks of prefill charged for each waiting
	// request (Candidate.Waiting). 0 means DefaultWaitingPrefill; a
	// negative value charges nothing.
	WaitingPrefill float64
}

// The kv policy's defaults, tuned on the Mooncake conversation trace
// (docs/benchmarks.md, "Routing"): with weights from 4 to 16 and the
// waiting charge, kv's hit ratio stays within 0.87-0.97x of an infinite
// cache's at one and four times the trace's load; charging each waiting
// request 6 blocks of prefill stops bursts of arrivals piling onto the
// worker that looked cheapest (queued requests hold no blocks yet), which
// brings kv's time to first token below round-robin's.
const (
	DefaultOverlapWeight  = 8
	DefaultWaitingPrefill = 6
)

// Scored is one candidate's overlap and cost in a decision.
type Scored struct {
	ID      string
	Overlap int
	Cost    float64
}

// Decision is a routing choice with its reasons.
type Decision struct {
	Worker     string
	Overlap    int
	Candidates []Scored
}

// ErrNoWorkers is returned by Choose when there is no candidate.
var ErrNoWorkers = errors.New("router: no workers to choose from")

// Choose picks a worker for a request among candidates whose overlaps are
// already known (Index.WithOverlap): the router actor journals those facts
// and decides from them alone, so replay reaches the same choice. turn is a
// counter for round-robin; draw is a uniform random value in [0, 1) from the
// command, so a decision is reproducible.
func Choose(policy Policy, p Params, req Request, cands []Candidate, turn uint64, draw float64) (Decision, error) {
	if len(cands) == 0 {
		return Decision{}, ErrNoWorkers
	}
	byID := func(a, b Candidate) int { return cmp.Compare(a.ID, b.ID) }
	if !slices.IsSortedFunc(cands, byID) {
		cands = slices.Clone(cands)
		slices.SortFunc(cands, byID)
	}
	if p.OverlapWeight == 0 {
		p.OverlapWeight = DefaultOverlapWeight
	}
	switch {
	case p.WaitingPrefill == 0:
		p.WaitingPrefill = DefaultWaitingPrefill
	case p.WaitingPrefill < 0 || math.IsNaN(p.WaitingPrefill):
		p.WaitingPrefill = 0
	}
	scored := make([]Scored, len(cands))
	for i, c := range cands {
		ov := min(max(c.Overlap, 0), req.Blocks)
		prefill := float64(req.Blocks - ov)
		queued := p.WaitingPrefill*float64(max(c.Waiting, 0)) + float64(max(c.PendingPrefill, 0))
		scored[i] = Scored{ID: c.ID, Overlap: ov, Cost: p.OverlapWeight*(prefill+queued) + float64(c.BlocksUsed)}
	}
	pick := 0
	switch policy {
	case PolicyKV, "":
		pick = pickByCost(scored, cands, p.Temperature, draw)
	case PolicyRoundRobin:
		pick = int(turn % uint64(len(cands)))
	case PolicyRandom:
		pick = min(int(draw*float64(len(cands))), len(cands)-1)
	case PolicyLeastLoaded:
		for i, c := range cands {
			b := cands[pick]
			if c.Active < b.Active || (c.Active == b.Active && c.BlocksUsed < b.BlocksUsed) {
				pick = i
			}
		}
	case PolicyPrefixHash:
		key := req.FirstHash
		best := uint64(0)
		for i, c := range cands {
			if s := rendezvous(key, c.ID); i == 0 || s > best {
				pick, best = i, s
			}
		}
	default:
		return Decision{}, fmt.Errorf("router: unknown policy %q", policy)
	}
	return Decision{Worker: cands[pick].ID, Overlap: scored[pick].Overlap, Candidates: scored}, nil
}

func pickByCost(s []Scored, cands []Candidate, temperature, draw float64) int {
	best := 0
	for i := range s {
		if s[i].Cost < s[best].Cost || (s[i].Cost == s[best].Cost && cands[i].Active < cands[best].Active) {
			best = i
		}
	}
	if temperature <= 0 {
		return best
	}
	lo, hi := s[best].Cost, s[best].Cost
	for _, x := range s {
		hi = max(hi, x.Cost)
	}
	span := hi - lo
	if span == 0 {
		return min(int(draw*float64(len(s))), len(s)-1)
	}
	weights := make([]float64, len(s))
	var sum float64
	for i, x := range s {
		weights[i] = math.Exp(-((x.Cost - lo) / span) / temperature)
		sum += weights[i]
	}
	target := draw * sum
	for i, w := range weights {
		if target < w {
			return i
		}
		target -= w
	}
	return len(s) - 1
}

// rendezvous scores a worker for a key (highest random weight hashing), so
// removing a worker moves only its keys.
func rendezvous(key uint64, worker string) uint64 {
	h := key ^ 0x9e3779b97f4a7c15
	for i := 0; i < len(worker); i++ {
		h ^= uint64(worker[i])
		h *= 0x100000001b3
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}
