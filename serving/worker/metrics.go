package worker

import (
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests                                                             *prometheus.CounterVec
	tokens, steps, publishErrors                                         prometheus.Counter
	imported, exported, remotePrefills, unexpectedBlocks, droppedCancels prometheus.Counter
	prefillCancelsSent, prefillsCancelled                                prometheus.Counter
	prefillFallbacks                                                     *prometheus.CounterVec
	active, waiting, blocksUsed                                          prometheus.Gauge

	// reg and registered are what register put on a registry, so that
	// unregister takes off exactly those: the registry matches collectors
	// by their descriptions, not identity, and would otherwise remove the
	// series of another worker with the same id.
	reg        prometheus.Registerer
	registered []prometheus.Collector
	once       sync.Once
}

func newMetrics(id string) *metrics {
	l := prometheus.Labels{"worker": id}
	return &metrics{
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
			Help: "Cancels of requests whose client went away that were dropped because as many cancels as the mailbox holds were already waiting for the engine goroutine (the engine finished those requests for nobody).", ConstLabels: l}),
		prefillCancelsSent: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_prefill_cancels_sent_total",
			Help: "Remote prefills given up because the client left, each with a cancel sent to the prefill worker.", ConstLabels: l}),
		prefillsCancelled: prometheus.NewCounter(prometheus.CounterOpts{Name: "triplane_worker_prefills_cancelled_total",
			Help: "Prefills this worker stopped, or refused when the cancel came first, because their decode worker gave them up.", ConstLabels: l}),
		prefillFallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "triplane_worker_prefill_fallbacks_total",
			Help: "Remote prefills that failed, by stage; the request was prefilled locally.", ConstLabels: l}, []string{"stage"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_active_requests",
			Help: "Requests running.", ConstLabels: l}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_waiting_requests",
			Help: "Requests queued.", ConstLabels: l}),
		blocksUsed: prometheus.NewGauge(prometheus.GaugeOpts{Name: "triplane_worker_kv_blocks_used",
			Help: "KV blocks held by running requests and incoming imports (cached blocks no request holds are free to evict and not counted).", ConstLabels: l}),
	}
}

// register puts the worker's collectors on reg (nil: they stay private).
// Every series carries the worker's id as a constant label, so workers
// with different ids share a registry, and a worker started again in the
// same process (after the previous one with its id closed, which
// unregisters) registers afresh: its counters restart at zero, which
// Prometheus reads as a counter reset, as after a process restart. A
// second live worker with the same id on the same registry is refused
// rather than sharing the first one's series: two engines' gauges would
// overwrite each other and their counters would add up under one name.
func (m *metrics) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	m.reg = reg
	for _, c := range []prometheus.Collector{m.requests, m.tokens, m.steps, m.publishErrors, m.active, m.waiting, m.blocksUsed,
		m.imported, m.exported, m.remotePrefills, m.unexpectedBlocks, m.droppedCancels, m.prefillFallbacks,
		m.prefillCancelsSent, m.prefillsCancelled} {
		if err := reg.Register(c); err != nil {
			m.unregister()
			return fmt.Errorf("metrics (is a worker with this id already running in this process?): %w", err)
		}
		m.registered = append(m.registered, c)
	}
	return nil
}

// unregister takes the worker's collectors off its registry, once: a
// second call (Close twice) must not remove a successor's series, which
// the registry cannot tell from these.
func (m *metrics) unregister() {
	m.once.Do(func() {
		for _, c := range m.registered {
			m.reg.Unregister(c)
		}
		m.registered = nil
	})
}
