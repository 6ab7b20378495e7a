package router

import (
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/router"
)

// Command is the router actor's command for a request whose prompt has the
// given block hashes, over the candidates a routing shell observed (the
// frontend's and the simulator's shells build it the same way).
func Command(requestID string, policy router.Policy, p router.Params, hashes []uint64, cands []router.Candidate) *triplanev1.RouteRequest {
	req := &triplanev1.RouteRequest{RequestId: requestID, Policy: string(policy),
		OverlapWeight: p.OverlapWeight, Temperature: p.Temperature, WaitingPrefill: p.WaitingPrefill,
		Blocks: uint32(len(hashes)), Candidates: make([]*triplanev1.RouterCandidate, len(cands))}
	if len(hashes) > 0 {
		req.FirstHash = hashes[0]
	}
	// One allocation for all candidates: this runs once per request.
	backing := make([]triplanev1.RouterCandidate, len(cands))
	for i, c := range cands {
		rc := &backing[i]
		rc.Worker, rc.Active, rc.BlocksUsed, rc.BlocksTotal = c.ID, uint32(c.Active), uint64(c.BlocksUsed), uint64(c.BlocksTotal)
		rc.Overlap, rc.Waiting, rc.PendingPrefill = uint32(c.Overlap), uint32(c.Waiting), uint64(c.PendingPrefill)
		req.Candidates[i] = rc
	}
	return req
}
