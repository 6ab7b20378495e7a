// Package journal stores actor events in JetStream and actor snapshots in
// Pebble.
//
// # Subject scheme
//
// One stream (default TRIPLANE_JOURNAL) holds every actor's events. Each
// actor has its own subject, <prefix>.journal.<kind>.<id> (default prefix
// "triplane"); kind and id are single NATS tokens (no '.', '*', '>' or
// whitespace). One message holds one EventBatch: all the events one command
// produced, so a command's events are written together or not at all.
//
// # Single writer
//
// Every append names the stream sequence of the last message it knows on the
// actor's subject (Nats-Expected-Last-Subject-Sequence); when another writer
// got there first the server refuses it and Append returns ErrConflict.
//
// # Idempotent retries
//
// A batch is identified by its content: the actor, its first sequence, the
// command id and the command time are all inside it. A retried append of a
// batch that was in fact written meets a conflict (its expected sequence is
// now stale); Append then compares the subject's last message with the
// batch and, when they are identical, returns the original position instead
// of an error. Server-side Nats-Msg-Id de-duplication is available
// (Config.MsgIDs) but off by default: the server checks the expected
// sequence first, so for these appends it only costs throughput.
//
// # Durability
//
// JetStream acknowledges an append once the server has it in its store. How
// soon the store reaches the disk is a server setting: `triplane up` runs the
// embedded server with --jetstream-sync=always by default (fsync before every
// acknowledgement); see docs/benchmarks.md for the cost.
package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// Errors callers branch on.
var (
	// ErrConflict: another writer appended to the actor since the expected
	// position. The caller must re-read the journal before writing again.
	ErrConflict = errors.New("journal: concurrent writer (expected last sequence did not match)")
	// ErrTooLarge: the batch exceeds the server's max payload.
	ErrTooLarge = errors.New("journal: event batch larger than the server's max payload")
	// ErrBadName: an actor kind or id that is not a single subject token.
	ErrBadName = errors.New("journal: bad actor kind or id")
)

// Config configures the journal stream.
type Config struct {
	// Prefix starts every subject; default "triplane".
	Prefix string
	// Stream is the JetStream stream name; default "TRIPLANE_JOURNAL".
	Stream string
	// Replicas of the stream in a clustered JetStream; default 1.
	Replicas int
	// Duplicates is the window in which retried appends are de-duplicated;
	// default 2 minutes.
	Duplicates time.Duration
	// Timeout bounds each append and read request; default 10 s.
	Timeout time.Duration
	// MsgIDs adds a Nats-Msg-Id header to every append. Off by default:
	// appends are conditional on the expected last sequence, which the
	// server checks before message ids, so a retry is recognised by
	// comparing the subject's last message with the batch instead, and the
	// server's de-duplication table costs about 15-20% of its append
	// throughput (docs/benchmarks.md). Turn it on for streams also written
	// by tools that rely on server-side de-duplication.
	MsgIDs bool
}

func (c *Config) defaults() {
	if c.Prefix == "" {
		c.Prefix = "triplane"
	}
	if c.Stream == "" {
		c.Stream = "TRIPLANE_JOURNAL"
	}
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.Duplicates == 0 {
		c.Duplicates = 2 * time.Minute
	}
	if c.Timeout == 0 {
		c.Timeout = 10 * time.Second
	}
}

// Journal is the JetStream-backed event journal.
type Journal struct {
	cfg    Config
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
}

// Position is where an actor's journal stands.
type Position struct {
	// Seq is the actor's highest event sequence (0: no events yet).
	Seq uint64
	// Stream is the stream sequence of the actor's last journal message
	// (0: none); appends are conditional on it.
	Stream uint64
}

// Open creates or updates the journal stream and returns the journal.
func Open(ctx context.Context, nc *nats.Conn, cfg Config) (*Journal, error) {
	cfg, js, err := setUp(nc, cfg)
	if err != nil {
		return nil, err
	}
	sc := jetstream.StreamConfig{
		Name:        cfg.Stream,
		Description: "Triplane actor journal: one subject per actor, one message per command's events",
		Subjects:    []string{cfg.Prefix + ".journal.>"},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Replicas:    cfg.Replicas,
		Duplicates:  cfg.Duplicates,
		Discard:     jetstream.DiscardNew, // never drop old events to make room
		AllowDirect: true,
		DenyDelete:  false, // DeleteTo purges a subject's prefix
	}
	s, err := js.CreateOrUpdateStream(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("journal: create stream %s: %w", cfg.Stream, err)
	}
	return &Journal{cfg: cfg, nc: nc, js: js, stream: s}, nil
}

// ErrNotJournal: Attach found a stream that does not hold the journal's
// subjects (another stream, or another prefix).
var ErrNotJournal = errors.New("journal: the stream is not this journal's")

// setUp checks cfg (with its defaults) and makes the JetStream context.
func setUp(nc *nats.Conn, cfg Config) (Config, jetstream.JetStream, error) {
	cfg.defaults()
	if err := checkToken("prefix", cfg.Prefix, true); err != nil {
		return cfg, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return cfg, nil, fmt.Errorf("journal: %w", err)
	}
	return cfg, js, nil
}

// Attach opens an existing journal stream as it is: unlike Open it neither
// creates nor updates the stream (whose subjects, limits and description
// an operator may have changed), for readers such as replay. cfg names
// the stream and prefix; its Replicas and Duplicates are taken from the
// stream.
func Attach(ctx context.Context, nc *nats.Conn, cfg Config) (*Journal, error) {
	cfg, js, err := setUp(nc, cfg)
	if err != nil {
		return nil, err
	}
	s, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return nil, fmt.Errorf("journal: look up stream %s: %w", cfg.Stream, err)
	}
	sc := s.CachedInfo().Config
	if want := cfg.Prefix + ".journal.>"; !slices.Contains(sc.Subjects, want) {
		return nil, fmt.Errorf("%w: stream %s holds subjects %v, not %s", ErrNotJournal, cfg.Stream, sc.Subjects, want)
	}
	cfg.Replicas, cfg.Duplicates = sc.Replicas, sc.Duplicates
	return &Journal{cfg: cfg, nc: nc, js: js, stream: s}, nil
}

// Check reports whether the journal stream answers, for readiness probes.
func (j *Journal) Check(ctx context.Context) error {
	if _, err := j.stream.Info(ctx); err != nil {
		return fmt.Errorf("journal stream %s: %w", j.cfg.Stream, err)
	}
	return nil
}

// Config returns the journal's effective configuration.
func (j *Journal) Config() Config { return j.cfg }

// MaxPayload is the largest message the server accepts.
func (j *Journal) MaxPayload() int64 { return j.nc.MaxPayload() }

// Subject is the subject of an actor's events.
func (j *Journal) Subject(kind, id string) string {
	return j.cfg.Prefix + ".journal." + kind + "." + id
}

// SplitSubject returns the kind and id of an actor subject.
func (j *Journal) SplitSubject(subject string) (kind, id string, ok bool) {
	rest, ok := strings.CutPrefix(subject, j.cfg.Prefix+".journal.")
	if !ok {
		return "", "", false
	}
	kind, id, ok = strings.Cut(rest, ".")
	return kind, id, ok && id != "" && !strings.Contains(id, ".")
}

// CheckName validates an actor kind and id.
func CheckName(kind, id string) error {
	if err := checkToken("kind", kind, false); err != nil {
		return err
	}
	if strings.ContainsRune(kind, '/') {
		// The snapshot store's keys are kind/id/seq: a kind is read as the
		// part up to the first '/'. (Ids may hold '/'.)
		return fmt.Errorf("%w: kind %q contains '/'", ErrBadName, kind)
	}
	return checkToken("id", id, false)
}

func checkToken(what, s string, dots bool) error {
	if s == "" {
		return fmt.Errorf("%w: empty %s", ErrBadName, what)
	}
	if len(s) > 200 {
		return fmt.Errorf("%w: %s %q is longer than 200 bytes", ErrBadName, what, s[:40]+"...")
	}
	for _, r := range s {
		if r == '*' || r == '>' || r <= ' ' || r == 0x7f || (!dots && r == '.') {
			return fmt.Errorf("%w: %s %q contains %q", ErrBadName, what, s, r)
		}
	}
	return nil
}

// Append writes events atomically after the expected position and returns
// the new position. The events get sequences expect.Seq+1, expect.Seq+2, ...
// A batch the server already has (a retry) returns its original position.
func (j *Journal) Append(ctx context.Context, kind, id string, expect Position, b *triplanev1.EventBatch) (Position, error) {
	if len(b.Events) == 0 {
		return expect, CheckName(kind, id)
	}
	p, err := j.AppendAsync(kind, id, expect, b)
	if err != nil {
		return Position{}, err
	}
	return p.Wait(ctx)
}

// Pending is an append on its way to the server.
type Pending struct {
	j        *Journal
	kind, id string
	subject  string
	data     []byte
	expect   Position
	highest  uint64
	events   int
	fut      jetstream.PubAckFuture

	// The acknowledgement can be read from fut only once; the first Wait
	// resolves it and every Wait returns the same outcome.
	once sync.Once
	done chan struct{}
	pos  Position
	err  error
}

// AppendAsync starts an append and returns at once; Wait gives its outcome.
// Errors found before sending (bad names, a batch too large) return here.
// Many actors' appends in flight at once share the connection's writes.
func (j *Journal) AppendAsync(kind, id string, expect Position, b *triplanev1.EventBatch) (*Pending, error) {
	if err := CheckName(kind, id); err != nil {
		return nil, err
	}
	if len(b.Events) == 0 {
		return nil, fmt.Errorf("journal: %s/%s: empty batch", kind, id)
	}
	b.Kind, b.ActorId = kind, id
	for i, e := range b.Events {
		e.Seq = expect.Seq + uint64(i) + 1
		if e.Payload == nil {
			return nil, fmt.Errorf("journal: %s/%s event %d has no payload", kind, id, e.Seq)
		}
	}
	b.HighestSeq = expect.Seq + uint64(len(b.Events))
	return j.start(kind, id, expect, b, "")
}

// Overhead is the room kept below the server's max payload for headers.
const Overhead = 256

// Limit is the largest encoded batch the journal sends.
func (j *Journal) Limit() int64 { return j.MaxPayload() - Overhead }

func (j *Journal) start(kind, id string, expect Position, b *triplanev1.EventBatch, msgID string) (*Pending, error) {
	// EventBatch has no map fields, so plain marshalling is deterministic.
	data, err := proto.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("journal: encode %s/%s batch: %w", kind, id, err)
	}
	if limit := j.Limit(); int64(len(data)) > limit {
		return nil, fmt.Errorf("%w: %s/%s batch of %d events is %d bytes, the limit is %d bytes",
			ErrTooLarge, kind, id, len(b.Events), len(data), limit)
	}
	subject := j.Subject(kind, id)
	opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(expect.Stream), jetstream.WithStallWait(j.cfg.Timeout)}
	if j.cfg.MsgIDs {
		// The id names the actor, the first sequence and the content: a
		// retry of this very batch has the same id, another writer's batch
		// for the same sequence does not.
		if msgID == "" {
			h := fnv.New64a()
			h.Write(data)
			msgID = kind + "." + id + "." + strconv.FormatUint(expect.Seq+1, 10) + "." + strconv.FormatUint(h.Sum64(), 16)
		}
		opts = append(opts, jetstream.WithMsgID(msgID))
	}
	fut, err := j.js.PublishMsgAsync(&nats.Msg{Subject: subject, Data: data}, opts...)
	if err != nil {
		return nil, fmt.Errorf("journal: append to %s/%s: %w", kind, id, err)
	}
	return &Pending{j: j, kind: kind, id: id, subject: subject, data: data, expect: expect,
		highest: b.HighestSeq, events: len(b.Events), fut: fut}, nil
}

// Wait waits for the append's acknowledgement, the context or the journal's
// timeout, whichever comes first, and returns the actor's new position.
// ErrConflict means another writer appended first; any other error leaves
// the outcome unknown.
func (p *Pending) Wait(ctx context.Context) (Position, error) {
	p.once.Do(func() {
		p.done = make(chan struct{})
		go func() {
			p.pos, p.err = p.resolve()
			close(p.done)
		}()
	})
	select {
	case <-p.done:
		return p.pos, p.err
	case <-ctx.Done():
		return Position{}, fmt.Errorf("journal: append to %s/%s: %w", p.kind, p.id, ctx.Err())
	}
}

// resolve waits for the acknowledgement, bounded by the journal's timeout.
func (p *Pending) resolve() (Position, error) {
	j := p.j
	timer := time.NewTimer(j.cfg.Timeout)
	defer timer.Stop()
	var err error
	select {
	case ack := <-p.fut.Ok():
		return Position{Seq: p.highest, Stream: ack.Sequence}, nil
	case err = <-p.fut.Err():
	case <-timer.C:
		return Position{}, fmt.Errorf("journal: append to %s/%s: no acknowledgement within %s: %w",
			p.kind, p.id, j.cfg.Timeout, context.DeadlineExceeded)
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
		// A retry of a batch that was written lands here (the server checks
		// the expected sequence before message ids): it is ours when the
		// subject's last message is byte for byte this batch, which names
		// its command, sequences and time.
		lctx, cancel := context.WithTimeout(context.Background(), j.cfg.Timeout)
		defer cancel()
		if last, lerr := j.stream.GetLastMsgForSubject(lctx, p.subject); lerr == nil && bytes.Equal(last.Data, p.data) {
			return Position{Seq: p.highest, Stream: last.Sequence}, nil
		}
		return Position{}, fmt.Errorf("%w: %s/%s at stream sequence %d: %s", ErrConflict, p.kind, p.id, p.expect.Stream, apiErr.Description)
	}
	return Position{}, fmt.Errorf("journal: append to %s/%s: %w", p.kind, p.id, err)
}

// Highest returns the actor's position; an unknown actor is at zero.
func (j *Journal) Highest(ctx context.Context, kind, id string) (Position, error) {
	b, streamSeq, err := j.last(ctx, kind, id)
	if err != nil || b == nil {
		return Position{}, err
	}
	return Position{Seq: b.HighestSeq, Stream: streamSeq}, nil
}

// last returns the actor's last batch, or nil when it has none.
func (j *Journal) last(ctx context.Context, kind, id string) (*triplanev1.EventBatch, uint64, error) {
	if err := CheckName(kind, id); err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Timeout)
	defer cancel()
	m, err := j.stream.GetLastMsgForSubject(ctx, j.Subject(kind, id))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("journal: last message of %s/%s: %w", kind, id, err)
	}
	b, err := decodeBatch(m.Data, kind, id)
	if err != nil {
		return nil, 0, &DecodeError{Subject: m.Subject, StreamSeq: m.Sequence, Err: j.stray(err, m.Sequence)}
	}
	return b, m.Sequence, nil
}

// stray adds to a message's decode error what an operator can do: the
// actor stays stopped (rather than recover past it) until it is gone.
func (j *Journal) stray(err error, streamSeq uint64) error {
	return fmt.Errorf("%w (not a batch this journal wrote for the actor; once checked, `triplane journal remove-stray %d --journal-stream %s` removes it)",
		err, streamSeq, j.cfg.Stream)
}

// ErrNotStray: RemoveStray was asked to delete a batch this journal wrote.
var ErrNotStray = errors.New("journal: the message is a batch this journal wrote")

// RemoveStray deletes the stream's message at streamSeq when it is not a
// batch this journal wrote for the actor its subject names: the message
// that makes the actor's reads fail with a DecodeError (an empty or
// foreign publish). It refuses to delete a batch of events or a deletion
// marker (ErrNotStray). It says what the message was.
func (j *Journal) RemoveStray(ctx context.Context, streamSeq uint64) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Timeout)
	defer cancel()
	m, err := j.stream.GetMsg(ctx, streamSeq)
	if err != nil {
		return "", fmt.Errorf("journal: message %d of stream %s: %w", streamSeq, j.cfg.Stream, err)
	}
	why := "its subject names no actor of this journal"
	if kind, id, ok := j.SplitSubject(m.Subject); ok && CheckName(kind, id) == nil {
		b, err := decodeBatch(m.Data, kind, id)
		if err == nil {
			what := fmt.Sprintf("events %d..%d", b.HighestSeq-uint64(len(b.Events))+1, b.HighestSeq)
			if len(b.Events) == 0 {
				what = fmt.Sprintf("the deletion marker up to %d", b.DeletedTo)
			}
			return "", fmt.Errorf("%w: message %d on %s holds %s/%s's %s; not removed", ErrNotStray, streamSeq, m.Subject, kind, id, what)
		}
		why = err.Error()
	}
	if err := j.stream.DeleteMsg(ctx, streamSeq); err != nil {
		return "", fmt.Errorf("journal: remove message %d of stream %s: %w", streamSeq, j.cfg.Stream, err)
	}
	return fmt.Sprintf("message %d on %s (%d bytes): %s", streamSeq, m.Subject, len(m.Data), why), nil
}

// decodeBatch decodes a journal message of the actor kind/id and checks
// that it is one this journal wrote: the actor's own, its events numbered
// consecutively up to its highest sequence, or a deletion marker. Anything
// else on the subject (an empty or stray publish, another actor's batch)
// would otherwise read as the actor's end: an empty message parses as
// highest sequence 0, recovery would start the actor afresh, and its next
// append would succeed over its history.
func decodeBatch(data []byte, kind, id string) (*triplanev1.EventBatch, error) {
	b := &triplanev1.EventBatch{}
	if err := proto.Unmarshal(data, b); err != nil {
		return nil, err
	}
	switch {
	case b.Kind != kind || b.ActorId != id:
		return nil, fmt.Errorf("not a batch of %s/%s (it names %q/%q)", kind, id, b.Kind, b.ActorId)
	case len(b.Events) == 0 && (b.HighestSeq == 0 || b.DeletedTo > b.HighestSeq):
		return nil, fmt.Errorf("no events and not a deletion marker (highest %d, deleted to %d)", b.HighestSeq, b.DeletedTo)
	case len(b.Events) > 0 && (b.Events[0].Seq == 0 || b.Events[len(b.Events)-1].Seq != b.HighestSeq ||
		b.Events[len(b.Events)-1].Seq-b.Events[0].Seq != uint64(len(b.Events)-1)):
		return nil, fmt.Errorf("events %d..%d (%d of them) do not end at its highest sequence %d",
			b.Events[0].Seq, b.Events[len(b.Events)-1].Seq, len(b.Events), b.HighestSeq)
	}
	return b, nil
}

// DecodeError says a journal message could not be decoded; it names where.
type DecodeError struct {
	Subject   string
	StreamSeq uint64
	Seq       uint64 // event sequence, when known
	Err       error
}

func (e *DecodeError) Error() string {
	if e.Seq > 0 {
		return fmt.Sprintf("journal: %s event seq %d (stream seq %d): %v", e.Subject, e.Seq, e.StreamSeq, e.Err)
	}
	return fmt.Sprintf("journal: %s stream seq %d: %v", e.Subject, e.StreamSeq, e.Err)
}

func (e *DecodeError) Unwrap() error { return e.Err }

// Record is one event read from the journal.
type Record struct {
	Kind, ID  string
	Subject   string
	Seq       uint64
	Time      time.Time
	CommandID string
	Payload   *anypb.Any
	// StreamSeq is the stream sequence of the message holding the event.
	StreamSeq uint64
	// LastInBatch is true for the last event of its command's batch.
	LastInBatch bool
}

// Type is the protobuf full name of the event.
func (r *Record) Type() string {
	n := r.Payload.GetTypeUrl()
	if i := strings.LastIndexByte(n, '/'); i >= 0 {
		return n[i+1:]
	}
	return n
}

// Decode unmarshals the event. An event type this binary does not know
// (schema drift) is an error naming the subject and sequence.
func (r *Record) Decode() (proto.Message, error) {
	m, err := r.Payload.UnmarshalNew()
	if err != nil {
		return nil, &DecodeError{Subject: r.Subject, StreamSeq: r.StreamSeq, Seq: r.Seq,
			Err: fmt.Errorf("event type %q: %w", r.Type(), err)}
	}
	return m, nil
}

// Query selects events of one actor. Zero values select everything.
type Query struct {
	FromSeq uint64    // first event sequence (inclusive)
	ToSeq   uint64    // last event sequence (inclusive); 0: up to the highest at the start of the read
	Since   time.Time // only events of commands handled at or after this time
	Until   time.Time // only events before the first command handled at or after this time
	// AfterStream starts reading after this stream sequence (a snapshot's
	// journal position), skipping what lies before without reading it.
	AfterStream uint64
}

// Read calls fn for each selected event, in sequence order. It reads up to
// the actor's last message as of the call, so it terminates while writers
// go on. From > To reads nothing.
func (j *Journal) Read(ctx context.Context, kind, id string, q Query, fn func(*Record) error) error {
	if q.ToSeq != 0 && q.FromSeq > q.ToSeq {
		return nil
	}
	end, err := j.Highest(ctx, kind, id)
	if err != nil {
		return err
	}
	if end.Stream == 0 || end.Stream <= q.AfterStream || (q.FromSeq > end.Seq) {
		return nil
	}
	subject := j.Subject(kind, id)
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}, DeliverPolicy: jetstream.DeliverAllPolicy}
	// Time filters apply to the command time inside each batch, not to the
	// server's receive time (the two clocks need not agree), so a time query
	// scans the actor's subject.
	if q.AfterStream > 0 {
		occ.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		occ.OptStartSeq = q.AfterStream + 1
	}
	cons, err := j.stream.OrderedConsumer(ctx, occ)
	if err != nil {
		return fmt.Errorf("journal: read %s: %w", subject, err)
	}
	// Bounded by bytes too: 512 batches near the max payload would buffer
	// half a gigabyte. Room for several of the largest.
	it, err := cons.Messages(jetstream.PullMaxMessagesWithBytesLimit(512, int(max(32<<20, 4*j.MaxPayload()))))
	if err != nil {
		return fmt.Errorf("journal: read %s: %w", subject, err)
	}
	defer it.Stop()
	for {
		m, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return fmt.Errorf("journal: read %s: %w", subject, err)
		}
		md, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("journal: read %s: %w", subject, err)
		}
		b, err := decodeBatch(m.Data(), kind, id)
		if err != nil {
			return &DecodeError{Subject: subject, StreamSeq: md.Sequence.Stream, Err: j.stray(err, md.Sequence.Stream)}
		}
		t := time.Unix(0, b.TimeUnixNanos)
		if !q.Until.IsZero() && !t.Before(q.Until) {
			// The first command at or after Until ends the read: the
			// events before it are the actor's history up to then, even
			// when a later command's time is earlier (another node's
			// clock behind); filtering batch by batch would leave a gap.
			return nil
		}
		inTime := q.Since.IsZero() || !t.Before(q.Since)
		for i, e := range b.Events {
			if e.Seq < q.FromSeq || !inTime {
				continue
			}
			if (q.ToSeq != 0 && e.Seq > q.ToSeq) || e.Seq > end.Seq {
				return nil
			}
			rec := &Record{Kind: kind, ID: id, Subject: subject, Seq: e.Seq, Time: t, CommandID: b.CommandId,
				Payload: e.Payload, StreamSeq: md.Sequence.Stream, LastInBatch: i == len(b.Events)-1}
			if err := fn(rec); err != nil {
				return err
			}
		}
		if md.Sequence.Stream >= end.Stream || (q.ToSeq != 0 && b.HighestSeq >= q.ToSeq) {
			return nil
		}
	}
}

// DeleteTo deletes the actor's events up to and including toSeq (capped at
// the highest). The highest sequence is kept: a deletion marker is appended
// and stays as the actor's last message.
func (j *Journal) DeleteTo(ctx context.Context, kind, id string, toSeq uint64) error {
	last, streamSeq, err := j.last(ctx, kind, id)
	if err != nil || last == nil {
		return err
	}
	if toSeq > last.HighestSeq {
		toSeq = last.HighestSeq
	}
	if len(last.Events) == 0 && toSeq <= last.DeletedTo {
		return nil // deleted already
	}
	// Find the first message holding an event after toSeq: it and everything
	// after it stay. It need not hold toSeq+1, which an earlier deletion
	// to a higher sequence may have taken: then nothing new goes.
	keepFrom := uint64(0)
	if toSeq < last.HighestSeq {
		err := j.Read(ctx, kind, id, Query{FromSeq: toSeq + 1}, func(r *Record) error {
			keepFrom = r.StreamSeq
			return errFound
		})
		if err != nil && !errors.Is(err, errFound) {
			return err
		}
	}
	marker := &triplanev1.EventBatch{Kind: kind, ActorId: id, HighestSeq: last.HighestSeq, DeletedTo: toSeq,
		TimeUnixNanos: last.TimeUnixNanos,
		CommandId:     "delete-to-" + strconv.FormatUint(toSeq, 10)}
	msgID := kind + "." + id + ".delete." + strconv.FormatUint(streamSeq, 10)
	p, err := j.start(kind, id, Position{Seq: last.HighestSeq, Stream: streamSeq}, marker, msgID)
	if err != nil {
		return err
	}
	pos, err := p.Wait(ctx)
	if err != nil {
		return err
	}
	if keepFrom == 0 {
		keepFrom = pos.Stream
	}
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Timeout)
	defer cancel()
	if err := j.stream.Purge(ctx, jetstream.WithPurgeSubject(j.Subject(kind, id)), jetstream.WithPurgeSequence(keepFrom)); err != nil {
		return fmt.Errorf("journal: delete %s/%s to %d: %w", kind, id, toSeq, err)
	}
	return nil
}

// errFound ends a read at the record looked for.
var errFound = errors.New("found")

// ActorInfo summarises one actor in the journal.
type ActorInfo struct {
	Kind, ID  string
	Highest   uint64
	LastEvent time.Time
	Messages  uint64
	// Err says why the actor's last message could not be read (a
	// *DecodeError, or a subject whose kind or id this journal would not
	// write); Highest and LastEvent are then zero.
	Err error
}

// Actors lists every actor with events in the journal.
func (j *Journal) Actors(ctx context.Context) ([]ActorInfo, error) {
	info, err := j.stream.Info(ctx, jetstream.WithSubjectFilter(j.cfg.Prefix+".journal.>"))
	if err != nil {
		return nil, fmt.Errorf("journal: list actors: %w", err)
	}
	out := make([]ActorInfo, 0, len(info.State.Subjects))
	for subj, n := range info.State.Subjects {
		kind, id, ok := j.SplitSubject(subj)
		if !ok {
			continue
		}
		b, _, err := j.last(ctx, kind, id)
		var de *DecodeError
		if errors.As(err, &de) || errors.Is(err, ErrBadName) {
			// One damaged actor must not hide the others (verify is for
			// exactly this moment).
			out = append(out, ActorInfo{Kind: kind, ID: id, Messages: n, Err: err})
			continue
		}
		if err != nil {
			return nil, err
		}
		if b == nil {
			continue
		}
		out = append(out, ActorInfo{Kind: kind, ID: id, Highest: b.HighestSeq, Messages: n, LastEvent: time.Unix(0, b.TimeUnixNanos)})
	}
	sortActors(out)
	return out, nil
}
