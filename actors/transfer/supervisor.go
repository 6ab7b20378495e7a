package transfer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/actors"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
)

// Errors the requester sees.
var (
	// ErrGaveUp: the session's last allowed attempt failed.
	ErrGaveUp = errors.New("transfer: gave up")
	// ErrCancelled: the session was cancelled.
	ErrCancelled = errors.New("transfer: cancelled")
)

// Metrics of transfer sessions.
type Metrics struct {
	bytes, retries, failures, completed, cancelled prometheus.Counter
	throughput                                     prometheus.Histogram
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	c := func(name, help string) prometheus.Counter {
		x := prometheus.NewCounter(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "transfer", Name: name, Help: help})
		if reg != nil {
			reg.MustRegister(x)
		}
		return x
	}
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "triplane", Subsystem: "transfer", Name: "throughput_bytes_per_second",
		Help: "Throughput of each completed session (bytes over its wall time, retries included).", Buckets: prometheus.ExponentialBuckets(1e6, 4, 10)})
	if reg != nil {
		reg.MustRegister(h)
	}
	return &Metrics{
		bytes:      c("bytes_total", "Block bytes acknowledged by receivers."),
		retries:    c("retries_total", "Failed attempts that were retried."),
		failures:   c("failures_total", "Sessions that gave up."),
		completed:  c("completed_total", "Sessions that completed."),
		cancelled:  c("cancelled_total", "Sessions cancelled."),
		throughput: h,
	}
}

// Config configures a Supervisor.
type Config struct {
	Host *actors.Host
	// Dial connects to the receiving peer; it is called again for every
	// attempt, so it may look the peer up afresh (it may have moved).
	Dial func(ctx context.Context) (data.Transport, error)
	// RangeBlocks is the number of blocks written and acknowledged
	// together (default 16): the granularity of resumption.
	RangeBlocks int
	// Backoff between attempts doubles from BackoffMin (default 50 ms) up
	// to BackoffMax (default 5 s), with jitter.
	BackoffMin, BackoffMax time.Duration
	Logger                 *slog.Logger
	Metrics                *Metrics
}

// Supervisor drives transfer sessions.
type Supervisor struct {
	cfg Config

	mu      sync.Mutex
	running map[string]context.CancelCauseFunc
}

// NewSupervisor returns a supervisor.
func NewSupervisor(cfg Config) (*Supervisor, error) {
	if cfg.Host == nil || cfg.Dial == nil {
		return nil, errors.New("transfer: supervisor needs a host and a dial function")
	}
	if cfg.RangeBlocks <= 0 {
		cfg.RangeBlocks = 16
	}
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = 50 * time.Millisecond
	}
	if cfg.BackoffMax < cfg.BackoffMin {
		cfg.BackoffMax = max(5*time.Second, cfg.BackoffMin)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &Supervisor{cfg: cfg, running: map[string]context.CancelCauseFunc{}}, nil
}

// Spec is one transfer: block i moves Blocks[i].Src into Blocks[i].Dst.
// Every block has BlockSize bytes.
type Spec struct {
	ID          string
	Blocks      []data.Op
	BlockSize   int
	MaxAttempts uint32
	Peer        string
}

func addr(id string) actors.Address { return actors.Address{Kind: Kind, ID: id} }

// Run drives session spec.ID to its end and returns its final state. A
// session that already made progress (this supervisor or a previous one
// crashed) resumes after its last acknowledged block. It returns an error
// wrapping ErrGaveUp when the attempts ran out, ErrCancelled when it was
// cancelled (by Cancel or by ctx).
func (s *Supervisor) Run(ctx context.Context, spec Spec) (*triplanev1.TransferState, error) {
	for i, op := range spec.Blocks {
		if len(op.Src) != spec.BlockSize || op.Dst.Length != uint64(spec.BlockSize) {
			return nil, fmt.Errorf("transfer %s: block %d is %d bytes into %s, want %d", spec.ID, i, len(op.Src), op.Dst, spec.BlockSize)
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.mu.Lock()
	if _, dup := s.running[spec.ID]; dup {
		s.mu.Unlock()
		return nil, fmt.Errorf("transfer %s: already running here", spec.ID)
	}
	s.running[spec.ID] = cancel
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.running, spec.ID)
		s.mu.Unlock()
	}()

	st, err := s.ask(ctx, spec.ID, &triplanev1.TransferStart{Blocks: uint64(len(spec.Blocks)), BlockSize: uint64(spec.BlockSize),
		MaxAttempts: spec.MaxAttempts, Peer: spec.Peer})
	if err != nil {
		return nil, err
	}
	start := time.Now()
	startAcked := st.Acked
	var tr data.Transport
	defer func() {
		if tr != nil {
			tr.Close()
		}
	}()
	backoff := s.cfg.BackoffMin
	for running(st) {
		err := s.attempt(ctx, spec, &tr, &st)
		if err == nil {
			continue // st moved on; the loop ends when it completed
		}
		if tr != nil {
			tr.Close()
			tr = nil
		}
		if ctx.Err() != nil {
			return s.cancelled(spec.ID, context.Cause(ctx))
		}
		next, ferr := s.ask(ctx, spec.ID, &triplanev1.TransferAttemptFailed{Error: err.Error()})
		if errors.Is(ferr, ErrNotRunning) {
			// Cancelled elsewhere meanwhile: report how it ended.
			next, ferr = s.State(ctx, spec.ID)
		}
		if ferr != nil {
			if ctx.Err() != nil {
				return s.cancelled(spec.ID, context.Cause(ctx))
			}
			return nil, ferr
		}
		st = next
		if !running(st) {
			break
		}
		s.cfg.Metrics.retries.Inc()
		wait := backoff/2 + rand.N(backoff/2+1)
		s.cfg.Logger.Warn("transfer attempt failed, retrying", "transfer", spec.ID, "attempt", st.Attempts, "of", st.MaxAttempts,
			"resume_at_block", st.Acked, "backoff", wait, "err", st.Error)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return s.cancelled(spec.ID, context.Cause(ctx))
		}
		backoff = min(backoff*2, s.cfg.BackoffMax)
	}
	switch st.Status {
	case triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED:
		s.cfg.Metrics.completed.Inc()
		if el := time.Since(start).Seconds(); el > 0 && st.Acked > startAcked {
			s.cfg.Metrics.throughput.Observe(float64((st.Acked-startAcked)*st.BlockSize) / el)
		}
		return st, nil
	case triplanev1.TransferStatus_TRANSFER_STATUS_FAILED:
		s.cfg.Metrics.failures.Inc()
		return st, fmt.Errorf("%w: transfer %s after %d attempts, %d of %d blocks acknowledged: %s", ErrGaveUp, spec.ID, st.Attempts, st.Acked, st.Blocks, st.Error)
	case triplanev1.TransferStatus_TRANSFER_STATUS_CANCELLED:
		return st, fmt.Errorf("%w: transfer %s: %s", ErrCancelled, spec.ID, st.Error)
	}
	return st, fmt.Errorf("transfer %s: unexpected status %s", spec.ID, st.Status)
}

// attempt writes the blocks after the last acknowledged one, a range at a
// time, journaling each range once the receiver verified it.
func (s *Supervisor) attempt(ctx context.Context, spec Spec, tr *data.Transport, st **triplanev1.TransferState) error {
	if *tr == nil {
		t, err := s.cfg.Dial(ctx)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		*tr = t
	}
	for running(*st) {
		from := (*st).Acked
		to := min(from+uint64(s.cfg.RangeBlocks), (*st).Blocks)
		if err := (*tr).Write(ctx, spec.Blocks[from:to]); err != nil {
			return err
		}
		next, err := s.ask(ctx, spec.ID, &triplanev1.TransferAck{From: from, To: to})
		if err != nil {
			return fmt.Errorf("journal ack: %w", err)
		}
		s.cfg.Metrics.bytes.Add(float64((to - from) * uint64(spec.BlockSize)))
		*st = next
	}
	return nil
}

// ask sends a command to session id and returns the state it replies.
func (s *Supervisor) ask(ctx context.Context, id string, msg proto.Message) (*triplanev1.TransferState, error) {
	r, err := s.cfg.Host.Request(ctx, addr(id), msg)
	if err != nil {
		return nil, fmt.Errorf("transfer %s: %T: %w", id, msg, err)
	}
	st, ok := r.(*triplanev1.TransferState)
	if !ok {
		return nil, fmt.Errorf("transfer %s: %T replied %T", id, msg, r)
	}
	return st, nil
}

// cancelled journals the cancellation (with a fresh context: the run's is
// done) and returns ErrCancelled.
func (s *Supervisor) cancelled(id string, cause error) (*triplanev1.TransferState, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reason := "requester went away"
	if cause != nil {
		reason = cause.Error()
	}
	st, err := s.ask(ctx, id, &triplanev1.TransferCancel{Reason: reason})
	if err != nil {
		return nil, fmt.Errorf("%w: transfer %s (journaling the cancellation failed: %v)", ErrCancelled, id, err)
	}
	s.cfg.Metrics.cancelled.Inc()
	return st, fmt.Errorf("%w: transfer %s: %s", ErrCancelled, id, reason)
}

// Cancel cancels session id if this supervisor runs it, else journals the
// cancellation directly.
func (s *Supervisor) Cancel(ctx context.Context, id, reason string) error {
	s.mu.Lock()
	cancel, ok := s.running[id]
	s.mu.Unlock()
	if ok {
		cancel(errors.New(reason))
		return nil
	}
	_, err := s.ask(ctx, id, &triplanev1.TransferCancel{Reason: reason})
	return err
}

// State returns session id's state.
func (s *Supervisor) State(ctx context.Context, id string) (*triplanev1.TransferState, error) {
	return s.ask(ctx, id, &triplanev1.TransferGet{})
}
