package actors

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/promreg"
)

// Metrics counts what the host does.
type Metrics struct {
	commands, rejected, events, persistFailures   prometheus.Counter
	restarts, recoveries, recoveredEvents         prometheus.Counter
	recoveryFailures, overloaded, batches         prometheus.Counter
	snapshots, snapshotsDropped, snapshotFailures prometheus.Counter
	snapshotsSkipped                              *prometheus.CounterVec
}

// NewMetrics creates the host's metrics and registers them with reg (nil:
// not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	c := func(name, help string) prometheus.Counter {
		return promreg.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "actor", Name: name, Help: help}))
	}
	skipped := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "actor", Name: "snapshots_skipped_total",
		Help: "Recoveries that replayed the journal though the store held a snapshot, by reason: unreadable (the store failed), undecodable (its state), past_journal_end (another journal's). Snapshots failing their checksum or of another schema are skipped by the store and logged."},
		[]string{"reason"})
	skipped = promreg.Register(reg, skipped)
	return &Metrics{
		snapshotsSkipped: skipped,
		commands:         c("commands_total", "Commands handled by actors."),
		rejected:         c("commands_rejected_total", "Commands rejected without persisting anything."),
		events:           c("events_persisted_total", "Events persisted to the journal."),
		persistFailures:  c("persist_failures_total", "Persists that failed with an unknown outcome (the actor restarted)."),
		restarts:         c("restarts_total", "Actor restarts by the supervisor."),
		recoveries:       c("recoveries_total", "Actor recoveries (snapshot plus journal tail)."),
		recoveredEvents:  c("recovered_events_total", "Journal events applied during recoveries."),
		recoveryFailures: c("recovery_failures_total", "Recoveries that failed (the actor restarts after a backoff)."),
		overloaded:       c("commands_overloaded_total", "Commands refused because the actor's stash was full."),
		batches:          c("batches_persisted_total", "Journal appends; each holds the events of one or more commands (group commit)."),
		snapshots:        c("snapshots_written_total", "Snapshots written to Pebble."),
		snapshotsDropped: c("snapshots_dropped_total", "Periodic snapshots dropped because the writer was behind."),
		snapshotFailures: c("snapshot_failures_total", "Snapshot writes that failed."),
	}
}

// SnapshotsSkipped is the count of recoveries that skipped a snapshot for
// reason (see Recovered.SnapshotSkipped).
func (m *Metrics) SnapshotsSkipped(reason string) prometheus.Counter {
	return m.snapshotsSkipped.WithLabelValues(reason)
}
