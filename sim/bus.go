package sim

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
)

// Bus is the simulated event plane, with NATS core semantics: subjects of
// dot-separated tokens, subscriptions with wildcards ('*' one token, '>'
// the rest), queue groups (each message goes to one member of a group,
// besides every plain subscriber), request-reply to a served subject, and
// at-most-once delivery: a message arrives after a seeded latency or is
// lost, and a partitioned client's messages are lost both ways until the
// heal. As over one NATS connection, a publisher's messages reach each
// subscriber in the order sent, unless Reorder is set; Duplicate delivers
// some twice. Both are harsher than NATS, faults for the code above it to
// survive. Each receiver gets its own copy of a message, as each decodes
// its own in the real system.
type Bus struct {
	w    *World
	subs []*busSub
	cut  map[string]time.Time
	// MinLatency..MaxLatency bound a delivery (default 100 µs..5 ms); Loss
	// and Duplicate are the chances a message is lost or delivered twice.
	MinLatency, MaxLatency time.Duration
	Loss, Duplicate        float64
	Reorder                bool
	// last is when the latest message from a publisher to a subscription
	// arrives: the next one arrives no earlier (in-order delivery).
	last map[busPair]time.Duration
	// Counters.
	Published, Delivered, Lost, Duplicated, NoResponders uint64
}

type busPair struct {
	from string
	sub  *busSub
}

type busSub struct {
	client  string
	pattern []string
	group   string
	fn      func(subject string, payload any) // a proto.Message, or a *busRequest
	closed  bool
}

// ErrNoResponders: a request found nobody serving its subject.
var ErrNoResponders = errors.New("sim bus: no responders")

// ErrTimeout: a request's reply did not arrive in time (lost, or the
// responder is cut off).
var ErrTimeout = errors.New("sim bus: request timed out")

// NewBus creates a simulated event plane in w.
func NewBus(w *World) *Bus {
	return &Bus{w: w, cut: map[string]time.Time{}, last: map[busPair]time.Duration{}, MinLatency: 100 * time.Microsecond, MaxLatency: 5 * time.Millisecond}
}

// BusClient is one process's connection to the bus: what a partition cuts.
type BusClient struct {
	b    *Bus
	name string
}

// Client opens a named connection.
func (b *Bus) Client(name string) *BusClient { return &BusClient{b: b, name: name} }

// Partition cuts client off the bus for d: what it publishes and what is
// delivered to it meanwhile is lost. Overlapping partitions: the later
// heal wins.
func (b *Bus) Partition(client string, d time.Duration) {
	if until := b.w.Now().Add(d); until.After(b.cut[client]) {
		b.cut[client] = until
	}
	b.w.Tracef("bus: client %s partitioned for %s", client, d)
}

// Cut reports whether client is partitioned off now.
func (b *Bus) Cut(client string) bool { return b.w.Now().Before(b.cut[client]) }

// checkSubject accepts a subject to publish on: tokens, no wildcards.
func checkSubject(s string, wildcards bool) error {
	if s == "" {
		return errors.New("empty subject")
	}
	toks := strings.Split(s, ".")
	for i, t := range toks {
		switch {
		case t == "":
			return fmt.Errorf("subject %q has an empty token", s)
		case (t == "*" || t == ">") && !wildcards:
			return fmt.Errorf("subject %q: wildcards only subscribe", s)
		case t == ">" && i != len(toks)-1:
			return fmt.Errorf("subject %q: '>' must be the last token", s)
		}
	}
	return nil
}

// matches walks subject token by token against pattern, without
// splitting it (this runs for every subscription of every message).
func matches(pattern []string, subject string) bool {
	for _, p := range pattern {
		if subject == "" {
			return false
		}
		if p == ">" {
			return true
		}
		tok, rest, _ := strings.Cut(subject, ".")
		if p != "*" && p != tok {
			return false
		}
		subject = rest
	}
	return subject == ""
}

// Subscribe calls fn for every message on a subject matching pattern;
// group, when not empty, makes it a queue group member. The returned
// function unsubscribes. A malformed pattern is an error.
func (c *BusClient) Subscribe(pattern, group string, fn func(subject string, msg proto.Message)) (func(), error) {
	if fn == nil {
		return nil, errors.New("sim bus: subscribe: no handler")
	}
	return c.subscribe(pattern, group, func(subject string, p any) {
		if m, ok := p.(proto.Message); ok {
			fn(subject, m)
		}
	})
}

func (c *BusClient) subscribe(pattern, group string, fn func(subject string, payload any)) (func(), error) {
	if fn == nil {
		return nil, errors.New("sim bus: subscribe: no handler")
	}
	if err := checkSubject(pattern, true); err != nil {
		return nil, fmt.Errorf("sim bus: subscribe: %w", err)
	}
	s := &busSub{client: c.name, pattern: strings.Split(pattern, "."), group: group, fn: fn}
	c.b.subs = append(c.b.subs, s)
	return func() { s.closed = true }, nil
}

// Publish sends msg on subject to every matching subscriber and one member
// of each matching queue group. A malformed subject is an error.
func (c *BusClient) Publish(subject string, msg proto.Message) error {
	if err := checkSubject(subject, false); err != nil {
		return fmt.Errorf("sim bus: publish: %w", err)
	}
	c.b.publish(c.name, subject, msg, c.b.receivers(subject))
	return nil
}

// receivers are the subscriptions a message on subject goes to: every
// plain one, and one member per queue group picked from the world's rand.
func (b *Bus) receivers(subject string) []*busSub {
	var out []*busSub
	groups := map[string][]*busSub{}
	var order []string
	live := b.subs[:0]
	for _, s := range b.subs {
		if s.closed {
			continue
		}
		live = append(live, s)
		if !matches(s.pattern, subject) {
			continue
		}
		if s.group == "" {
			out = append(out, s)
			continue
		}
		if _, ok := groups[s.group]; !ok {
			order = append(order, s.group)
		}
		groups[s.group] = append(groups[s.group], s)
	}
	clear(b.subs[len(live):])
	b.subs = live
	for _, g := range order {
		members := groups[g]
		out = append(out, members[b.w.Rand().IntN(len(members))])
	}
	return out
}

func (b *Bus) latency() time.Duration {
	d := b.MinLatency
	if span := int64(b.MaxLatency - b.MinLatency); span > 0 {
		d += time.Duration(b.w.Rand().Int64N(span + 1))
	}
	return d
}

// publish delivers payload: a message (each receiver gets a copy) or a
// request (shared: its reply goes back to one requester).
func (b *Bus) publish(from, subject string, payload any, to []*busSub) {
	b.Published++
	if b.Cut(from) {
		b.Lost++
		return
	}
	for _, s := range to {
		if b.w.Chance(b.Loss) {
			b.Lost++
			continue
		}
		copies := 1
		if b.w.Chance(b.Duplicate) {
			copies = 2
			b.Duplicated++
		}
		for range copies {
			m := payload
			if msg, ok := payload.(proto.Message); ok {
				m = proto.Clone(msg)
			}
			d := b.latency()
			if !b.Reorder {
				pair := busPair{from, s}
				at := max(b.w.Elapsed()+d, b.last[pair])
				b.last[pair], d = at, at-b.w.Elapsed()
			}
			b.w.After(d, func() {
				if s.closed || b.Cut(s.client) {
					b.Lost++
					return
				}
				b.Delivered++
				s.fn(subject, m)
			})
		}
	}
}

// Serve answers requests on subject (group: load-balanced among servers of
// the group) with fn's reply or error.
func (c *BusClient) Serve(subject, group string, fn func(msg proto.Message) (proto.Message, error)) (func(), error) {
	if fn == nil {
		return nil, errors.New("sim bus: serve: no handler")
	}
	return c.subscribe(subject, group, func(_ string, p any) {
		req, ok := p.(*busRequest)
		if !ok {
			return // a plain message on a served subject: nobody to answer
		}
		reply, err := fn(proto.Clone(req.msg))
		req.answer(c.name, reply, err)
	})
}

// Request sends msg to a server of subject and calls reply once with its
// answer, or with ErrNoResponders, or ErrTimeout after timeout (a lost
// request or reply).
func (c *BusClient) Request(subject string, msg proto.Message, timeout time.Duration, reply func(proto.Message, error)) error {
	if err := checkSubject(subject, false); err != nil {
		return fmt.Errorf("sim bus: request: %w", err)
	}
	if reply == nil {
		return errors.New("sim bus: request: no reply handler")
	}
	b := c.b
	done := false
	finish := func(m proto.Message, err error) {
		if !done {
			done = true
			reply(m, err)
		}
	}
	to := b.receivers(subject)
	if len(to) == 0 {
		b.NoResponders++
		b.w.After(b.latency(), func() { finish(nil, fmt.Errorf("%w on %s", ErrNoResponders, subject)) })
		return nil
	}
	req := &busRequest{b: b, to: c.name, msg: proto.Clone(msg), finish: finish}
	b.publish(c.name, subject, req, to)
	b.w.After(timeout, func() { finish(nil, fmt.Errorf("%w after %s on %s", ErrTimeout, timeout, subject)) })
	return nil
}

// busRequest carries a request through publish.
type busRequest struct {
	b      *Bus
	to     string
	msg    proto.Message
	finish func(proto.Message, error)
}

func (r *busRequest) answer(from string, reply proto.Message, err error) {
	b := r.b
	if b.Cut(from) || b.w.Chance(b.Loss) {
		b.Lost++
		return // the requester times out
	}
	if reply != nil {
		reply = proto.Clone(reply)
	}
	b.w.After(b.latency(), func() {
		if b.Cut(r.to) {
			b.Lost++
			return
		}
		r.finish(reply, err)
	})
}
