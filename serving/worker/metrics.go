package worker

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests                                                             *prometheus.CounterVec
	tokens, steps, publishErrors                                         prometheus.Counter
	imported, exported, remotePrefills, unexpectedBlocks, droppedCancels prometheus.Counter
	prefillFallbacks                                                     *prometheus.CounterVec
	active, waiting, blocksUsed                                          prometheus.Gauge
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
			Help: "Engine iterations whose KV events could not all be published (routers repair the gap from the ring).", ConstLabels: l}),
		imported: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_kv_blocks_imported_total",
			Help: "KV blocks received from prefill workers, verified and cached.", ConstLabels: l}),
		exported: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_kv_blocks_exported_total",
			Help: "KV blocks sent to decode workers.", ConstLabels: l}),
		remotePrefills: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_remote_prefills_total",
			Help: "Requests whose prompt was prefilled by a prefill worker.", ConstLabels: l}),
		unexpectedBlocks: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_kv_blocks_unexpected_total",
			Help: "Blocks a peer wrote where no transfer was expected.", ConstLabels: l}),
		droppedCancels: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_cancels_dropped_total",
			Help: "Cancels of requests whose client went away that found the engine's mailbox full.", ConstLabels: l}),
		prefillFallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_worker_prefill_fallbacks_total",
			Help: "Remote prefills that failed, by stage; the request was prefilled locally.", ConstLabels: l}, []string{"stage"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_active_requests",
			Help: "Requests running.", ConstLabels: l}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_waiting_requests",
			Help: "Requests queued.", ConstLabels: l}),
		blocksUsed: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_kv_blocks_used",
			Help: "KV blocks held by running requests and incoming imports (cached blocks no request holds are free to evict and not counted).", ConstLabels: l}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.tokens, m.steps, m.publishErrors, m.active, m.waiting, m.blocksUsed,
			m.imported, m.exported, m.remotePrefills, m.unexpectedBlocks, m.droppedCancels, m.prefillFallbacks)
	}
	return m
}
