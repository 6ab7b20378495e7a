package worker

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests                     *prometheus.CounterVec
	tokens, steps, publishErrors prometheus.Counter
	active, waiting, blocksUsed  prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, id string) *metrics {
	l := prometheus.Labels{"worker": id}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_worker_requests_total",
			Help: "Requests a worker ended, by outcome.", ConstLabels: l}, []string{"outcome"}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_tokens_total",
			Help: "Tokens generated.", ConstLabels: l}),
		steps: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_engine_steps_total",
			Help: "Engine iterations run.", ConstLabels: l}),
		publishErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_kv_publish_errors_total",
			Help: "KV events that could not be published (routers repair the gap from the ring).", ConstLabels: l}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_active_requests",
			Help: "Requests running.", ConstLabels: l}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_waiting_requests",
			Help: "Requests queued.", ConstLabels: l}),
		blocksUsed: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_kv_blocks_used",
			Help: "KV blocks held by requests or cached.", ConstLabels: l}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.tokens, m.steps, m.publishErrors, m.active, m.waiting, m.blocksUsed)
	}
	return m
}
