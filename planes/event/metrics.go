package event

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/promreg"
)

// Metrics are the event plane's counters.
type Metrics struct {
	Published     prometheus.Counter
	Received      prometheus.Counter
	Malformed     *prometheus.CounterVec // by subscription subject
	TooLarge      prometheus.Counter
	SlowConsumers prometheus.Counter
	Dropped       prometheus.Counter
	RequestErrors *prometheus.CounterVec // by kind: no_responders, timeout, canceled, disconnected, remote, malformed
	DeadLettered  prometheus.Counter
	Busy          prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Published: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_published_total",
			Help: "Messages published through the event plane."}),
		Received: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_received_total",
			Help: "Messages received by event plane subscriptions."}),
		Malformed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_event_malformed_total",
			Help: "Payloads dropped because they did not decode, by subscription subject."}, []string{"subject"}),
		TooLarge: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_too_large_total",
			Help: "Payloads refused before sending because they exceed the server's max payload."}),
		SlowConsumers: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_slow_consumer_total",
			Help: "Times a subscription fell behind its pending limits."}),
		Dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_dropped_total",
			Help: "Messages dropped by NATS because a subscription fell behind its pending limits."}),
		RequestErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_event_request_errors_total",
			Help: "Failed requests, by kind."}, []string{"kind"}),
		DeadLettered: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_dead_lettered_total",
			Help: "Work-queue jobs moved to a dead-letter subject."}),
		Busy: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_event_responder_busy_total",
			Help: "Requests a concurrency-limited responder refused at once because it was at its limit."}),
	}
	if reg == nil {
		return m, nil
	}
	// A second bus in the process (a node with two connections, say)
	// shares the first one's series.
	var err error
	m.Published, err = promreg.TryRegister(reg, m.Published)
	if err == nil {
		m.Received, err = promreg.TryRegister(reg, m.Received)
	}
	if err == nil {
		m.Malformed, err = promreg.TryRegister(reg, m.Malformed)
	}
	if err == nil {
		m.TooLarge, err = promreg.TryRegister(reg, m.TooLarge)
	}
	if err == nil {
		m.SlowConsumers, err = promreg.TryRegister(reg, m.SlowConsumers)
	}
	if err == nil {
		m.Dropped, err = promreg.TryRegister(reg, m.Dropped)
	}
	if err == nil {
		m.RequestErrors, err = promreg.TryRegister(reg, m.RequestErrors)
	}
	if err == nil {
		m.DeadLettered, err = promreg.TryRegister(reg, m.DeadLettered)
	}
	if err == nil {
		m.Busy, err = promreg.TryRegister(reg, m.Busy)
	}
	if err != nil {
		return nil, fmt.Errorf("event: register metrics: %w", err)
	}
	return m, nil
}
