// Package router is the router actor's state machine: it takes a request
// with what the router observed about each candidate worker (overlap with
// the KV index, load) and decides where the request goes, journaling the
// decision with every candidate's cost. `triplane replay events router/<id>`
// then answers "why did this request go there".
//
// The KV index itself is the router shell's observation (package router,
// fed by the workers' KV events with gap repair); the decision is made here
// from the facts carried in the command, so the simulator and replay reach
// the same choice.
package router

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

// Kind of router actors.
const Kind = "router"

// MaxCandidates bounds the workers one request may be offered to, and
// MaxTrackedWorkers the per-worker counters a router keeps (further workers
// are counted under OtherWorkers).
const (
	MaxCandidates     = 4096
	MaxTrackedWorkers = 1024
	OtherWorkers      = "(other)"
)

// ErrInvalid rejects a malformed routing request.
var ErrInvalid = errors.New("router: invalid request")

// Machine is the router state machine.
type Machine struct{}

var _ actors.Machine = Machine{}

func (Machine) Kind() string          { return Kind }
func (Machine) SchemaVersion() uint32 { return 1 }
func (Machine) Initial(id string) proto.Message {
	return &triplanev1.RouterState{Id: id}
}

// Upgrade moves the per-worker counters of a snapshot taken before
// RouterState.workers into that list, the form replaying the journal
// gives.
func (Machine) Upgrade(state proto.Message) {
	s := state.(*triplanev1.RouterState)
	if len(s.PerWorker) == 0 {
		s.PerWorker = nil
		return
	}
	for _, w := range slices.Sorted(maps.Keys(s.PerWorker)) {
		workerCounter(s, w, true).Decisions += s.PerWorker[w]
	}
	s.PerWorker = nil
}

// workerCounter returns w's counter in s, added in its place in the order
// of workers if missing. Past MaxTrackedWorkers counters a new worker's
// decisions go to OtherWorkers' counter, unless all is set (an upgrade
// keeps every counter a snapshot held).
func workerCounter(s *triplanev1.RouterState, w string, all bool) *triplanev1.WorkerDecisions {
	at := func(w string) (int, bool) {
		return slices.BinarySearchFunc(s.Workers, w, func(c *triplanev1.WorkerDecisions, w string) int { return strings.Compare(c.Worker, w) })
	}
	i, ok := at(w)
	if !ok && !all && len(s.Workers) >= MaxTrackedWorkers {
		w = OtherWorkers
		i, ok = at(w)
	}
	if !ok {
		s.Workers = slices.Insert(s.Workers, i, &triplanev1.WorkerDecisions{Worker: w})
	}
	return s.Workers[i]
}

func (Machine) Decide(state proto.Message, cmd actors.Command) actors.Decision {
	s := state.(*triplanev1.RouterState)
	switch c := cmd.Msg.(type) {
	case *triplanev1.RouteRequest:
		return decide(s, c, cmd.Rand)
	}
	return actors.Decision{Err: fmt.Errorf("router: unknown command %T", cmd.Msg)}
}

func decide(s *triplanev1.RouterState, c *triplanev1.RouteRequest, rnd uint64) actors.Decision {
	if err := validate(c); err != nil {
		return actors.Decision{Err: err}
	}
	policy, err := router.ParsePolicy(c.Policy)
	if err != nil {
		return actors.Decision{Err: fmt.Errorf("%w: %w", ErrInvalid, err)}
	}
	var buf [16]router.Candidate // on the stack for the usual handful
	cands := buf[:0]
	if len(c.Candidates) > len(buf) {
		cands = make([]router.Candidate, 0, len(c.Candidates))
	}
	cands = cands[:len(c.Candidates)]
	for i, k := range c.Candidates {
		cands[i] = router.Candidate{ID: k.Worker, Active: int(k.Active), BlocksUsed: int(k.BlocksUsed),
			BlocksTotal: int(k.BlocksTotal), Overlap: int(k.Overlap), Waiting: int(k.Waiting),
			PendingPrefill: int(k.PendingPrefill)}
	}
	// 53 bits of the command's random draw give a uniform float in [0, 1).
	draw := float64(rnd>>11) / (1 << 53)
	d, err := router.Choose(policy, router.Params{OverlapWeight: c.OverlapWeight, Temperature: c.Temperature, WaitingPrefill: c.WaitingPrefill},
		router.Request{Blocks: int(c.Blocks), FirstHash: c.FirstHash}, cands, s.Decisions, draw)
	if err != nil {
		return actors.Decision{Err: err}
	}
	// The event, the decision's list of it, the reply and the scores of a
	// few candidates in one allocation: this runs once per request.
	out := &decided{}
	ev := &out.event
	ev.RequestId, ev.Policy, ev.Worker, ev.Overlap = c.RequestId, string(policy), d.Worker, uint32(d.Overlap)
	ev.Blocks, ev.Candidates, ev.Turn = c.Blocks, c.Candidates, s.Decisions
	scores, ptrs := out.scores[:0], out.ptrs[:0]
	if n := len(d.Candidates); n > len(out.scores) {
		scores, ptrs = make([]triplanev1.RouteScore, 0, n), make([]*triplanev1.RouteScore, 0, n)
	}
	scores, ev.Scores = scores[:len(d.Candidates)], ptrs[:len(d.Candidates)]
	for i, sc := range d.Candidates {
		s := &scores[i]
		s.Worker, s.Overlap, s.Cost = sc.ID, uint32(sc.Overlap), sc.Cost
		ev.Scores[i] = s
	}
	out.events[0] = ev
	out.reply.Worker, out.reply.Overlap = d.Worker, uint32(d.Overlap)
	return actors.Decision{Events: out.events[:], Reply: &out.reply}
}

// decided holds what a decision returns, with room for the scores of a
// few candidates.
type decided struct {
	event  triplanev1.RouteDecided
	events [1]proto.Message
	reply  triplanev1.RouteReply
	scores [8]triplanev1.RouteScore
	ptrs   [8]*triplanev1.RouteScore
}

func validate(c *triplanev1.RouteRequest) error {
	if c.RequestId == "" {
		return fmt.Errorf("%w: empty request id", ErrInvalid)
	}
	if len(c.Candidates) == 0 {
		return router.ErrNoWorkers
	}
	if len(c.Candidates) > MaxCandidates {
		return fmt.Errorf("%w: %d candidates, at most %d", ErrInvalid, len(c.Candidates), MaxCandidates)
	}
	if math.IsNaN(c.OverlapWeight) || math.IsInf(c.OverlapWeight, 0) || c.OverlapWeight < 0 ||
		math.IsNaN(c.Temperature) || math.IsInf(c.Temperature, 0) || c.Temperature < 0 {
		return fmt.Errorf("%w: overlap weight %v and temperature %v must be finite and not negative",
			ErrInvalid, c.OverlapWeight, c.Temperature)
	}
	if math.IsNaN(c.WaitingPrefill) || math.IsInf(c.WaitingPrefill, 0) {
		return fmt.Errorf("%w: waiting prefill %v must be finite", ErrInvalid, c.WaitingPrefill)
	}
	// Candidates in strictly increasing order of worker (as shells list
	// them, and as Choose wants them) hold no worker twice: one pass.
	sorted := true
	for i, k := range c.Candidates {
		if k.Worker == "" {
			return fmt.Errorf("%w: candidate without a worker id", ErrInvalid)
		}
		if i > 0 && c.Candidates[i-1].Worker >= k.Worker {
			sorted = false
			break
		}
	}
	if sorted {
		return nil
	}
	// Else a handful of candidates (the usual case) are checked pairwise
	// rather than with a map allocated per command.
	var seen map[string]bool
	if len(c.Candidates) > 16 {
		seen = make(map[string]bool, len(c.Candidates))
	}
	for i, k := range c.Candidates {
		if k.Worker == "" {
			return fmt.Errorf("%w: candidate without a worker id", ErrInvalid)
		}
		twice := seen[k.Worker]
		if seen == nil {
			for _, o := range c.Candidates[:i] {
				twice = twice || o.Worker == k.Worker
			}
		} else {
			seen[k.Worker] = true
		}
		if twice {
			return fmt.Errorf("%w: worker %q offered twice", ErrInvalid, k.Worker)
		}
	}
	return nil
}

func (Machine) Apply(state proto.Message, event proto.Message) error {
	s := state.(*triplanev1.RouterState)
	switch e := event.(type) {
	case *triplanev1.RouteDecided:
		s.Decisions++
		s.Blocks += uint64(e.Blocks)
		s.OverlapBlocks += uint64(e.Overlap)
		if s.PerWorker != nil { // a snapshot not upgraded
			Machine{}.Upgrade(s)
		}
		workerCounter(s, e.Worker, false).Decisions++
	default:
		return fmt.Errorf("router: unknown event %T", event)
	}
	return nil
}
