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
	"github.com/triplane-dev/triplane/promreg"
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
		return promreg.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{Namespace: "triplane", Subsystem: "transfer", Name: name, Help: help}))
	}
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "triplane", Subsystem: "transfer", Name: "throughput_bytes_per_second",
		Help: "Throughput of each completed session (bytes over its wall time, retries included).", Buckets: prometheus.ExponentialBuckets(1e6, 4, 10)})
	h = promreg.Register(reg, h)
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
	// Dial connects to the receiving peer of sessions whose Spec has no
	// Dial of its own; it is called again for every attempt, so it may
	// look the peer up afresh (it may have moved).
	Dial func(ctx context.Context) (data.Transport, error)
	// Pacing of every session (Pacing documents the defaults).
	Pacing
	Logger  *slog.Logger
	Metrics *Metrics
}

// Supervisor drives transfer sessions.
type Supervisor struct {
	cfg Config

	mu      sync.Mutex
	running map[string]context.CancelCauseFunc
}

// NewSupervisor returns a supervisor.
func NewSupervisor(cfg Config) (*Supervisor, error) {
	if cfg.Host == nil {
		return nil, errors.New("transfer: supervisor needs an actor host")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &Supervisor{cfg: cfg, running: map[string]context.CancelCauseFunc{}}, nil
}

// ErrAlreadyRunning: Run was asked for a session this supervisor is
// already driving; the running one goes on.
var ErrAlreadyRunning = errors.New("already running here")

// Spec is one transfer: block i moves Blocks[i].Src into Blocks[i].Dst.
// Every block has BlockSize bytes.
type Spec struct {
	ID          string
	Blocks      []data.Op
	BlockSize   int
	MaxAttempts uint32
	Peer        string
	// Dial connects to this session's receiver, once per attempt; nil
	// uses the supervisor's Config.Dial. One supervisor then serves
	// sessions to many peers.
	Dial func(ctx context.Context) (data.Transport, error)
}

func addr(id string) actors.Address { return actors.Address{Kind: Kind, ID: id} }

// Run drives session spec.ID to its end and returns its final state. A
// session that already made progress (this supervisor or a previous one
// crashed) resumes after its last acknowledged block. It returns an error
// wrapping ErrGaveUp when the attempts ran out, ErrCancelled when it was
// cancelled (by Cancel or by ctx).
//
// What to do when is the Driver's; Run does it, with the goroutine,
// timers, connection and actor host the Driver leaves out.
func (s *Supervisor) Run(ctx context.Context, spec Spec) (*triplanev1.TransferState, error) {
	dial := spec.Dial
	if dial == nil {
		dial = s.cfg.Dial
	}
	if dial == nil {
		return nil, fmt.Errorf("transfer %s: no dial function in the spec or the supervisor", spec.ID)
	}
	d, err := NewDriver(spec, s.cfg.Pacing)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.mu.Lock()
	if _, dup := s.running[spec.ID]; dup {
		s.mu.Unlock()
		return nil, fmt.Errorf("transfer %s: %w", spec.ID, ErrAlreadyRunning)
	}
	s.running[spec.ID] = cancel
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.running, spec.ID)
		s.mu.Unlock()
	}()

	var tr data.Transport
	defer func() {
		if tr != nil {
			tr.Close()
		}
	}()
	var start time.Time // when the session answered its start: throughput counts from there
	for a := d.Action(); ; {
		if a.Hangup && tr != nil {
			tr.Close()
			tr = nil
		}
		if a.AckedBytes > 0 {
			s.cfg.Metrics.bytes.Add(float64(a.AckedBytes))
		}
		var o Outcome
		switch a.Op {
		case OpAsk:
			o.Reply, o.Err = s.request(ctx, spec.ID, a.Msg)
			if _, ok := a.Msg.(*triplanev1.TransferStart); ok && o.Err == nil {
				start = time.Now() // a start asked again after a failure counts from its success
			}
		case OpDial:
			var t data.Transport
			if t, o.Err = dial(ctx); o.Err == nil {
				tr = t
			}
		case OpWrite:
			o.Err = tr.Write(ctx, a.Blocks)
		case OpWait:
			if a.Again != nil {
				s.cfg.Logger.Warn("transfer command failed transiently, asking again", "transfer", spec.ID, "backoff", a.Wait, "err", a.Again)
			} else {
				s.cfg.Metrics.retries.Inc()
				s.cfg.Logger.Warn("transfer attempt failed, retrying", "transfer", spec.ID, "attempt", a.State.Attempts, "of", a.State.MaxAttempts,
					"resume_at_block", a.State.Acked, "backoff", a.Wait, "err", a.State.Error)
			}
			t := time.NewTimer(a.Wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				o.Stop = context.Cause(ctx)
			}
		case OpDone:
			switch a.Ended {
			case EndCompleted:
				s.cfg.Metrics.completed.Inc()
				if el := time.Since(start).Seconds(); el > 0 && a.Moved > 0 {
					s.cfg.Metrics.throughput.Observe(float64(a.Moved) / el)
				}
			case EndGaveUp:
				s.cfg.Metrics.failures.Inc()
			case EndCancelled:
				s.cfg.Metrics.cancelled.Inc()
			}
			return a.State, a.Err
		}
		// A wait whose timer fired first goes on: only the select says a
		// wait was cut short.
		if a.Op != OpWait && ctx.Err() != nil {
			o.Stop = context.Cause(ctx)
		}
		o.Jitter = rand.Uint64()
		a = d.Next(o)
	}
}

// request sends a command to session id. A cancellation is journaled with
// a fresh context: the run's is done by then.
func (s *Supervisor) request(ctx context.Context, id string, msg proto.Message) (proto.Message, error) {
	if _, ok := msg.(*triplanev1.TransferCancel); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
	}
	return s.cfg.Host.Request(ctx, addr(id), msg)
}

// ask sends a command to session id and returns the state it replies.
func (s *Supervisor) ask(ctx context.Context, id string, msg proto.Message) (*triplanev1.TransferState, error) {
	r, err := s.cfg.Host.Request(ctx, addr(id), msg)
	return stateOf(id, msg, r, err)
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
