package router

import (
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

// Command is the router actor's command for a request whose prompt has the
// given block hashes, over the candidates a routing shell observed (the
// frontend's and the simulator's shells build it the same way).
func Command(requestID string, policy router.Policy, p router.Params, hashes []uint64, cands []router.Candidate) *triplanev1.RouteRequest {
	// The request and up to 8 candidates in one allocation (more get
	// their own): this runs once per request.
	cmd := &command{}
	req := &cmd.req
	backing, list := cmd.cands[:0], cmd.list[:0]
	if len(cands) > len(cmd.cands) {
		backing, list = make([]triplanev1.RouterCandidate, 0, len(cands)), make([]*triplanev1.RouterCandidate, 0, len(cands))
	}
	backing, list = backing[:len(cands)], list[:len(cands)]
	req.RequestId, req.Policy = requestID, string(policy)
	req.OverlapWeight, req.Temperature, req.WaitingPrefill = p.OverlapWeight, p.Temperature, p.WaitingPrefill
	req.Blocks, req.Candidates = uint32(len(hashes)), list
	if len(hashes) > 0 {
		req.FirstHash = hashes[0]
	}
	for i, c := range cands {
		rc := &backing[i]
		rc.Worker, rc.Active, rc.BlocksUsed, rc.BlocksTotal = c.ID, uint32(c.Active), uint64(c.BlocksUsed), uint64(c.BlocksTotal)
		rc.Overlap, rc.Waiting, rc.PendingPrefill = uint32(c.Overlap), uint32(c.Waiting), uint64(c.PendingPrefill)
		req.Candidates[i] = rc
	}
	return req
}

// command is a routing command with room for a few candidates.
type command struct {
	req   triplanev1.RouteRequest
	list  [8]*triplanev1.RouterCandidate
	cands [8]triplanev1.RouterCandidate
}
