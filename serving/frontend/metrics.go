package frontend

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/promreg"
)

type metrics struct {
	requests, prefills *prometheus.CounterVec
	tokens, migrations prometheus.Counter
	inflight           prometheus.Gauge
	duration           prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_frontend_requests_total",
			Help: "HTTP generation requests by outcome."}, []string{"outcome"}),
		prefills: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_frontend_prefills_total",
			Help: "Disaggregated mode: prompts prefilled on a prefill worker (remote) or on the decode worker (local, when the uncached part was short or no prefill worker had room)."}, []string{"where"}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_frontend_tokens_total",
			Help: "Tokens relayed to clients."}),
		migrations: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_frontend_migrations_total",
			Help: "Requests resumed on another worker after theirs failed."}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_frontend_inflight_requests",
			Help: "Requests being served."}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "triplane_frontend_request_seconds",
			Help: "Time from request to last token.", Buckets: prometheus.ExponentialBuckets(0.005, 2, 14)}),
	}
	m.requests, m.prefills = promreg.Register(reg, m.requests), promreg.Register(reg, m.prefills)
	m.tokens, m.migrations = promreg.Register(reg, m.tokens), promreg.Register(reg, m.migrations)
	m.inflight, m.duration = promreg.Register(reg, m.inflight), promreg.Register(reg, m.duration)
	return m
}
