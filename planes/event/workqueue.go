package event

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
)

// Headers on a dead letter.
const (
	HeaderDLQSubject    = "Triplane-Dlq-Subject"
	HeaderDLQSeq        = "Triplane-Dlq-Stream-Seq"
	HeaderDLQDeliveries = "Triplane-Dlq-Deliveries"
	HeaderDLQReason     = "Triplane-Dlq-Reason"
)

// ErrReject, returned (wrapped) by a work-queue handler, sends the job to
// the dead-letter subject at once without retrying it.
var ErrReject = errors.New("event: job rejected")

// RetryError, returned by a work-queue handler, redelivers the job after
// Delay (a nak with delay).
type RetryError struct {
	Delay time.Duration
	Err   error
}

func (e *RetryError) Error() string { return fmt.Sprintf("retry in %s: %v", e.Delay, e.Err) }
func (e *RetryError) Unwrap() error { return e.Err }

// Retry asks for the job to be redelivered after delay.
func Retry(delay time.Duration, err error) error { return &RetryError{Delay: delay, Err: err} }

// Reject sends the job to the dead-letter subject without retrying.
func Reject(err error) error { return fmt.Errorf("%w: %w", ErrReject, err) }

// QueueConfig configures a durable work queue.
type QueueConfig struct {
	Namespace, Component, Name string
	// MaxDeliver is how many times a job is handed to a handler before it
	// goes to the dead-letter subject; default 5.
	MaxDeliver int
	// AckWait is how long a delivered job may go unanswered before the
	// server redelivers it; default 30 s.
	AckWait time.Duration
	// RetryDelay is the redelivery delay after a handler error that is not
	// a RetryError; default 1 s.
	RetryDelay time.Duration
	// MaxAckPending bounds the jobs handed out and not yet answered;
	// default 1000.
	MaxAckPending int
	// MaxJobs bounds the queue; a full queue refuses new jobs. Default 1e6.
	MaxJobs int64
	// MaxDeadLetters bounds the dead-letter stream (oldest dropped first);
	// default 100000.
	MaxDeadLetters int64
	Replicas       int
}

// WorkQueue is a durable queue of jobs of type T on JetStream: work-queue
// retention (a job is removed once acknowledged), one durable pull consumer
// shared by every worker, so each job goes to one worker at a time.
//
// Deliveries are counted from the message metadata: the server's own
// MaxDeliver is left unlimited and the queue moves a job to the
// dead-letter subject itself when its last allowed delivery fails, or when
// it arrives past the limit (a worker died holding its last delivery), so no
// job is silently stranded in the stream.
type WorkQueue[T proto.Message] struct {
	b       *Bus
	js      jetstream.JetStream
	cfg     QueueConfig
	subject string
	dlq     string
	stream  string
	dstream string
	cons    jetstream.Consumer
}

// OpenWorkQueue creates or opens the queue's stream, its dead-letter stream
// and its durable consumer.
func OpenWorkQueue[T proto.Message](ctx context.Context, b *Bus, cfg QueueConfig) (*WorkQueue[T], error) {
	if cfg.MaxDeliver <= 0 {
		cfg.MaxDeliver = 5
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.RetryDelay <= 0 {
		cfg.RetryDelay = time.Second
	}
	if cfg.MaxAckPending <= 0 {
		cfg.MaxAckPending = 1000
	}
	if cfg.MaxJobs <= 0 {
		cfg.MaxJobs = 1_000_000
	}
	if cfg.MaxDeadLetters <= 0 {
		cfg.MaxDeadLetters = 100_000
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	subject, err := b.Subject(cfg.Namespace, cfg.Component, "queue", cfg.Name)
	if err != nil {
		return nil, err
	}
	dlq := b.MustSubject(cfg.Namespace, cfg.Component, "dlq", cfg.Name)
	name := strings.ToUpper(b.cfg.Prefix + "_Q_" + cfg.Namespace + "_" + cfg.Component + "_" + cfg.Name)
	js, err := jetstream.New(b.nc)
	if err != nil {
		return nil, fmt.Errorf("event: jetstream: %w", err)
	}
	q := &WorkQueue[T]{b: b, js: js, cfg: cfg, subject: subject, dlq: dlq, stream: name, dstream: name + "_DLQ"}
	// Stream names are upper-cased and joined with '_': another queue
	// (ns a_b/component c and ns a/component b_c, Jobs and jobs, jobs_dlq
	// and the dead letters of jobs) may map to the same name, and
	// updating that stream would take its subjects from it.
	for sname, want := range map[string]string{name: subject, q.dstream: dlq} {
		if st, err := js.Stream(ctx, sname); err == nil {
			if subs := st.CachedInfo().Config.Subjects; len(subs) != 1 || subs[0] != want {
				return nil, fmt.Errorf("event: work queue %s/%s/%s: stream %s already holds subjects %v, not %s (another queue's name maps to the same stream)",
					cfg.Namespace, cfg.Component, cfg.Name, sname, subs, want)
			}
		} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
			return nil, fmt.Errorf("event: work queue stream %s: %w", sname, err)
		}
	}
	st, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: name, Subjects: []string{subject}, Retention: jetstream.WorkQueuePolicy,
		MaxMsgs: cfg.MaxJobs, Discard: jetstream.DiscardNew, Replicas: cfg.Replicas,
		MaxMsgSize: int32(b.nc.MaxPayload()),
	})
	if err != nil {
		return nil, fmt.Errorf("event: work queue stream %s: %w", name, err)
	}
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: q.dstream, Subjects: []string{dlq}, Retention: jetstream.LimitsPolicy,
		MaxMsgs: cfg.MaxDeadLetters, Discard: jetstream.DiscardOld, Replicas: cfg.Replicas,
		// Long enough that a job whose Term was lost, redelivered after
		// AckWait and dead-lettered again, is recognised (deadLetter's
		// message id).
		Duplicates: max(2*time.Minute, 4*cfg.AckWait),
	}); err != nil {
		return nil, fmt.Errorf("event: dead-letter stream %s: %w", q.dstream, err)
	}
	q.cons, err = st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: "workers", AckPolicy: jetstream.AckExplicitPolicy, AckWait: cfg.AckWait,
		MaxDeliver: -1, MaxAckPending: cfg.MaxAckPending, FilterSubject: subject,
	})
	if err != nil {
		return nil, fmt.Errorf("event: work queue consumer on %s: %w", name, err)
	}
	return q, nil
}

// Subject is where jobs are published.
func (q *WorkQueue[T]) Subject() string { return q.subject }

// DeadLetterSubject is where exhausted and rejected jobs go.
func (q *WorkQueue[T]) DeadLetterSubject() string { return q.dlq }

func (q *WorkQueue[T]) encode(v T) ([]byte, error) {
	data, err := proto.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("event: encode job for %s: %w", q.subject, err)
	}
	if err := q.b.checkSize(q.subject, len(data)); err != nil {
		return nil, err
	}
	return data, nil
}

// Enqueue stores a job and returns its stream sequence once the server has
// it.
func (q *WorkQueue[T]) Enqueue(ctx context.Context, v T) (uint64, error) {
	data, err := q.encode(v)
	if err != nil {
		return 0, err
	}
	ack, err := q.js.Publish(ctx, q.subject, data)
	if err != nil {
		return 0, fmt.Errorf("event: enqueue on %s: %w", q.subject, err)
	}
	return ack.Sequence, nil
}

// EnqueueAsync stores a job without waiting; wait on the returned future or
// on EnqueueComplete.
func (q *WorkQueue[T]) EnqueueAsync(v T) (jetstream.PubAckFuture, error) {
	data, err := q.encode(v)
	if err != nil {
		return nil, err
	}
	f, err := q.js.PublishAsync(q.subject, data)
	if err != nil {
		return nil, fmt.Errorf("event: enqueue on %s: %w", q.subject, err)
	}
	return f, nil
}

// EnqueueComplete is closed when every EnqueueAsync so far is acknowledged.
func (q *WorkQueue[T]) EnqueueComplete() <-chan struct{} { return q.js.PublishAsyncComplete() }

// Job is one delivery of a queued job.
type Job[T proto.Message] struct {
	Value T
	// Deliveries counts this delivery: 1 the first time.
	Deliveries uint64
	// Seq is the job's stream sequence.
	Seq uint64
	msg jetstream.Msg
}

// InProgress tells the server the job is still being worked on, resetting
// its ack wait.
func (j *Job[T]) InProgress() error { return j.msg.InProgress() }

// Consume hands jobs to h until ctx ends. h's result decides each job's
// fate: nil acknowledges it (it leaves the queue); a RetryError naks it with
// its delay; an ErrReject error, an undecodable job, or any failure of its
// last allowed delivery moves it to the dead-letter subject; any other error
// naks it with RetryDelay. h runs one job at a time; call Consume from
// several goroutines (or processes) for more workers. A job whose handler
// returns after ctx ended (the worker stopping) goes back to the queue at
// once, not to the dead letters: stopping is not the job's failure (the
// delivery still counts, as a crashed worker's would).
func (q *WorkQueue[T]) Consume(ctx context.Context, h func(context.Context, *Job[T]) error) error {
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		// What is there, up to a batch, at once; else wait for one.
		msgs, err := fetched(q.cons.FetchNoWait(consumeBatch))
		if err == nil && len(msgs) == 0 {
			msgs, err = fetched(q.cons.Fetch(1, jetstream.FetchContext(ctx)))
		}
		q.handleBatch(ctx, msgs, h)
		if err == nil || errors.Is(err, nats.ErrTimeout) || ctx.Err() != nil {
			backoff = 50 * time.Millisecond
			continue
		}
		q.b.log.Debug("work queue fetch", "subject", q.subject, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	return nil
}

// consumeBatch bounds the jobs one Consume holds at once: each fetch costs
// a round trip, and each job held is a delivery spent if the worker stops.
const consumeBatch = 64

func fetched(b jetstream.MessageBatch, err error) ([]jetstream.Msg, error) {
	if err != nil {
		return nil, err
	}
	var msgs []jetstream.Msg
	for m := range b.Messages() {
		msgs = append(msgs, m)
	}
	return msgs, b.Error()
}

// handleBatch hands msgs to h one at a time. A job's ack wait runs from its
// delivery, also while it waits behind slower ones: those are told the
// jobs are in progress every third of the ack wait (jobs left waiting in a
// client buffer expired there, were delivered again, handled twice, and
// used up their deliveries without a handler seeing them).
func (q *WorkQueue[T]) handleBatch(ctx context.Context, msgs []jetstream.Msg, h func(context.Context, *Job[T]) error) {
	if len(msgs) == 0 {
		return
	}
	var next atomic.Int64 // the job in hand; the ones after it wait
	stop := make(chan struct{})
	var wg sync.WaitGroup
	if len(msgs) > 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(q.cfg.AckWait / 3)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					for i := int(next.Load()) + 1; i < len(msgs); i++ {
						_ = msgs[i].InProgress()
					}
				}
			}
		}()
	}
	for i, m := range msgs {
		next.Store(int64(i))
		q.handle(ctx, m, h)
	}
	close(stop)
	wg.Wait()
}

func (q *WorkQueue[T]) handle(ctx context.Context, m jetstream.Msg, h func(context.Context, *Job[T]) error) {
	md, err := m.Metadata()
	if err != nil {
		q.b.log.Warn("work queue message without metadata", "subject", q.subject, "err", err)
		_ = m.Term()
		return
	}
	q.b.metrics.Received.Inc()
	max := uint64(q.cfg.MaxDeliver)
	if md.NumDelivered > max {
		q.deadLetter(ctx, m, md, "delivered more than the allowed times (a worker stopped without answering)")
		return
	}
	v, err := Decode[T](m.Data())
	if err != nil {
		q.b.metrics.Malformed.WithLabelValues(q.subject).Inc()
		q.deadLetter(ctx, m, md, err.Error())
		return
	}
	if ctx.Err() != nil {
		_ = m.Nak() // stopping: another worker takes it
		return
	}
	err = h(ctx, &Job[T]{Value: v, Deliveries: md.NumDelivered, Seq: md.Sequence.Stream, msg: m})
	var retry *RetryError
	switch {
	case err != nil && ctx.Err() != nil && !errors.Is(err, ErrReject):
		_ = m.Nak() // stopping: another worker takes it
	case err == nil:
		if err := m.Ack(); err != nil {
			q.b.log.Warn("work queue ack", "subject", q.subject, "seq", md.Sequence.Stream, "err", err)
		}
	case errors.Is(err, ErrReject):
		q.deadLetter(ctx, m, md, err.Error())
	case md.NumDelivered >= max:
		q.deadLetter(ctx, m, md, fmt.Sprintf("failed %d deliveries, last: %v", md.NumDelivered, err))
	case errors.As(err, &retry):
		_ = m.NakWithDelay(retry.Delay)
	default:
		_ = m.NakWithDelay(q.cfg.RetryDelay)
	}
}

// deadLetter copies the job to the dead-letter subject, then terminates it.
// When the copy fails the job is naked instead, so it is never lost.
func (q *WorkQueue[T]) deadLetter(ctx context.Context, m jetstream.Msg, md *jetstream.MsgMetadata, reason string) {
	d := nats.NewMsg(q.dlq)
	d.Data = m.Data()
	d.Header.Set(HeaderDLQSubject, m.Subject())
	d.Header.Set(HeaderDLQSeq, strconv.FormatUint(md.Sequence.Stream, 10))
	d.Header.Set(HeaderDLQDeliveries, strconv.FormatUint(md.NumDelivered, 10))
	d.Header.Set(HeaderDLQReason, strings.Join(strings.Fields(reason), " "))
	// If the Term below is lost, the job comes back and is dead-lettered
	// again: the id (the job's place in its stream, and when it was
	// stored, so a recreated stream's jobs differ) lets the dead-letter
	// stream keep one copy.
	d.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("%s/%d/%d", md.Stream, md.Sequence.Stream, md.Timestamp.UnixNano()))
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	ack, err := q.js.PublishMsg(pctx, d)
	if err != nil {
		q.b.log.Warn("cannot dead-letter job; will retry", "subject", q.subject, "seq", md.Sequence.Stream, "err", err)
		_ = m.NakWithDelay(q.cfg.RetryDelay)
		return
	}
	if !ack.Duplicate {
		q.b.metrics.DeadLettered.Inc()
	}
	if err := m.TermWithReason(reason); err != nil {
		q.b.log.Warn("work queue term", "subject", q.subject, "seq", md.Sequence.Stream, "err", err)
	}
}

// DeadLetter is a job on the dead-letter subject.
type DeadLetter[T proto.Message] struct {
	Value      T // zero when the job did not decode
	Raw        []byte
	Seq        uint64 // its sequence in the work queue's stream
	Deliveries uint64
	Reason     string
}

// DeadLetters reads up to n dead letters, oldest first, without removing
// them.
func (q *WorkQueue[T]) DeadLetters(ctx context.Context, n int) ([]DeadLetter[T], error) {
	c, err := q.js.OrderedConsumer(ctx, q.dstream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, fmt.Errorf("event: read dead letters of %s: %w", q.subject, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("event: read dead letters of %s: %w", q.subject, err)
	}
	n = min(n, int(info.NumPending))
	var out []DeadLetter[T]
	for len(out) < n {
		batch, err := c.Fetch(n-len(out), jetstream.FetchContext(ctx))
		if err != nil {
			return out, fmt.Errorf("event: read dead letters of %s: %w", q.subject, err)
		}
		for m := range batch.Messages() {
			d := DeadLetter[T]{Raw: m.Data(), Reason: m.Headers().Get(HeaderDLQReason)}
			d.Seq, _ = strconv.ParseUint(m.Headers().Get(HeaderDLQSeq), 10, 64)
			d.Deliveries, _ = strconv.ParseUint(m.Headers().Get(HeaderDLQDeliveries), 10, 64)
			if v, err := Decode[T](m.Data()); err == nil {
				d.Value = v
			}
			out = append(out, d)
		}
		if err := batch.Error(); err != nil {
			return out, fmt.Errorf("event: read dead letters of %s: %w", q.subject, err)
		}
	}
	return out, nil
}
