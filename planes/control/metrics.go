package control

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/promreg"
)

// Metrics of the control plane. A nil registerer keeps them unregistered.
type Metrics struct {
	LeaseLost      prometheus.Counter
	LeaseGranted   prometheus.Counter
	GrantFailures  prometheus.Counter
	Registrations  prometheus.Counter
	WatchResumes   prometheus.Counter
	WatchResyncs   prometheus.Counter
	DecodeErrors   prometheus.Counter
	EventsDropped  prometheus.Counter
	Elected        prometheus.Counter
	FencedWrites   prometheus.Counter
	PlacementMoves prometheus.Counter
}

// NewMetrics creates the metrics and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "control", Name: name, Help: help})
	}
	m := &Metrics{
		LeaseLost:      c("lease_lost_total", "Times the node's lease expired or was revoked while running; the node re-registered on a new lease."),
		LeaseGranted:   c("lease_granted_total", "Leases granted to this node (1 + re-registrations)."),
		GrantFailures:  c("lease_grant_failures_total", "Failed attempts to grant a lease and register (retried with backoff)."),
		Registrations:  c("registrations_total", "Registration keys written."),
		WatchResumes:   c("watch_resumes_total", "Watches resumed from their last revision after the stream broke."),
		WatchResyncs:   c("watch_resyncs_total", "Full resyncs after etcd compacted past a watch's revision."),
		DecodeErrors:   c("decode_errors_total", "Values under a watched prefix that did not decode or were invalid; they are ignored."),
		EventsDropped:  c("subscriber_events_dropped_total", "Discovery events dropped because a subscriber's buffer was full."),
		Elected:        c("placement_elected_total", "Times this node became a placement leader."),
		FencedWrites:   c("placement_fenced_writes_total", "Placement writes refused because this node was no longer leader."),
		PlacementMoves: c("placement_writes_total", "Placement assignments written or deleted by this node as leader."),
	}
	for _, c := range []*prometheus.Counter{&m.LeaseLost, &m.LeaseGranted, &m.GrantFailures, &m.Registrations, &m.WatchResumes,
		&m.WatchResyncs, &m.DecodeErrors, &m.EventsDropped, &m.Elected, &m.FencedWrites, &m.PlacementMoves} {
		*c = promreg.Register(reg, *c)
	}
	return m
}
