package data

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/triplane-dev/triplane/promreg"
)

// Metrics counts what the data plane moves and refuses.
type Metrics struct {
	bytesSent, bytesLanded   *prometheus.CounterVec
	framesSent, framesLanded *prometheus.CounterVec
	rejected                 *prometheus.CounterVec
	connErrors               *prometheus.CounterVec
}

// NewMetrics creates the data plane's metrics and registers them with reg
// (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	v := func(name, help string, labels ...string) *prometheus.CounterVec {
		return promreg.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "data", Name: name, Help: help}, labels))
	}
	return &Metrics{
		bytesSent:    v("bytes_sent_total", "Block bytes sent and acknowledged by the receiver.", "transport"),
		bytesLanded:  v("bytes_landed_total", "Block bytes received, verified and landed in a region.", "transport"),
		framesSent:   v("frames_sent_total", "Block frames acknowledged by the receiver.", "transport"),
		framesLanded: v("frames_landed_total", "Block frames landed in a region.", "transport"),
		rejected:     v("connections_rejected_total", "Connections closed by the receiver because of bad input (malformed frame, wrong length, descriptor outside regions, checksum mismatch, failed authentication) or at its connection limit.", "transport", "reason"),
		connErrors:   v("connection_errors_total", "Sender connections that failed (peer gone, reset, timeout, refused).", "transport"),
	}
}

// RejectedCount returns how many connections transport closed for reason
// (for tests and the admin page).
func (m *Metrics) RejectedCount(transport, reason string) float64 {
	return counterValue(m.rejected.WithLabelValues(transport, reason))
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}
