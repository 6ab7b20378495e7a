package sim

import (
	"errors"
	"fmt"
	"slices"
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
	// conns are the clients by name, with their partitions (a client's
	// subscriptions and requests hold theirs: no lookup by name per
	// message).
	conns map[string]*busConn
	// MinLatency..MaxLatency bound a delivery (default 100 µs..5 ms); Loss
	// and Duplicate are the chances a message is lost or delivered twice.
	MinLatency, MaxLatency time.Duration
	Loss, Duplicate        float64
	Reorder                bool
	// last is when the latest message from a publisher to a subscription
	// arrives: the next one arrives no earlier (in-order delivery).
	last map[busPair]time.Duration
	// routes caches each subject's matching subscriptions; subscribing and
	// unsubscribing clear it.
	routes map[string]*busRoute
	// Counters.
	Published, Delivered, Lost, Duplicated, NoResponders uint64
}

type busPair struct {
	from *busConn
	sub  *busSub
}

// busConn is what the bus knows of a client by its name: until when it is
// cut off.
type busConn struct {
	cut outage
}

type busSub struct {
	client  *busConn
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
	return &Bus{w: w, conns: map[string]*busConn{}, last: map[busPair]time.Duration{}, routes: map[string]*busRoute{}, MinLatency: 100 * time.Microsecond, MaxLatency: 5 * time.Millisecond}
}

// BusClient is one process's connection to the bus: what a partition cuts.
type BusClient struct {
	b    *Bus
	conn *busConn
}

// Client opens a named connection.
func (b *Bus) Client(name string) *BusClient { return &BusClient{b: b, conn: b.conn(name)} }

func (b *Bus) conn(name string) *busConn {
	c := b.conns[name]
	if c == nil {
		c = &busConn{}
		b.conns[name] = c
	}
	return c
}

// Partition cuts client off the bus for d: what it publishes and what is
// delivered to it meanwhile is lost. Overlapping partitions: the later
// heal wins.
func (b *Bus) Partition(client string, d time.Duration) {
	b.conn(client).cut.extend(b.w.Now(), d)
	b.w.Tracef("bus: client %s partitioned for %s", client, d)
}

func (b *Bus) isCut(c *busConn) bool { return c.cut.on(b.w.Now()) }

// checkSubject accepts a subject to publish on: tokens, no wildcards. It
// walks the tokens without splitting (this runs for every message).
func checkSubject(s string, wildcards bool) error {
	if s == "" {
		return errors.New("empty subject")
	}
	for rest, more := s, true; more; {
		var t string
		t, rest, more = strings.Cut(rest, ".")
		switch {
		case t == "":
			return fmt.Errorf("subject %q has an empty token", s)
		case (t == "*" || t == ">") && !wildcards:
			return fmt.Errorf("subject %q: wildcards only subscribe", s)
		case t == ">" && more:
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
	s := &busSub{client: c.conn, pattern: strings.Split(pattern, "."), group: group, fn: fn}
	b := c.b
	b.subs = append(b.subs, s)
	clear(b.routes)
	return func() {
		if !s.closed {
			s.closed = true
			clear(b.routes)
		}
	}, nil
}

// Publish sends msg on subject to every matching subscriber and one member
// of each matching queue group. A malformed subject is an error.
func (c *BusClient) Publish(subject string, msg proto.Message) error {
	r, err := c.b.checkedRoute(subject)
	if err != nil {
		return fmt.Errorf("sim bus: publish: %w", err)
	}
	c.b.publish(c.conn, msg, c.b.receivers(r))
	return nil
}

// checkedRoute is route for a subject to publish on, checked first unless
// its route is cached (only a checked subject's is: checking every
// message's subject again was 2% of a serving run).
func (b *Bus) checkedRoute(subject string) (*busRoute, error) {
	if r, ok := b.routes[subject]; ok {
		return r, nil
	}
	if err := checkSubject(subject, false); err != nil {
		return nil, err
	}
	return b.route(subject), nil
}

// receivers are the subscriptions of r a message goes to: every plain
// one, and one member per queue group picked from the world's rand. The
// caller must not modify the slice.
func (b *Bus) receivers(r *busRoute) []busTarget {
	if len(r.groups) == 0 {
		return r.plain
	}
	out := make([]busTarget, len(r.plain), len(r.plain)+len(r.groups))
	copy(out, r.plain)
	for _, members := range r.groups {
		out = append(out, members[b.w.Rand().IntN(len(members))])
	}
	return out
}

// busRoute is what subscriptions a subject matches: the plain ones, and
// each queue group's members (groups in order of their first member), in
// subscription order.
type busRoute struct {
	plain  []busTarget
	groups [][]busTarget
}

// busTarget is a subscription a subject matches, with the function that
// delivers a message on that subject to it (made once per subject, not per
// message).
type busTarget struct {
	s       *busSub
	deliver func(payload any)
}

func (b *Bus) target(s *busSub, subject string) busTarget {
	return busTarget{s: s, deliver: func(payload any) {
		if s.closed || b.isCut(s.client) {
			b.Lost++
			return
		}
		b.Delivered++
		s.fn(subject, payload)
	}}
}

// route returns subject's matching subscriptions, from the cache that
// subscribing and unsubscribing clear (matching every subscription against
// every message, and building the receiver list, were 4% of a serving
// run).
func (b *Bus) route(subject string) *busRoute {
	if r, ok := b.routes[subject]; ok {
		return r
	}
	live := b.subs[:0]
	for _, s := range b.subs {
		if !s.closed {
			live = append(live, s)
		}
	}
	clear(b.subs[len(live):])
	b.subs = live
	r := &busRoute{}
	var names []string
	for _, s := range b.subs {
		if !matches(s.pattern, subject) {
			continue
		}
		if s.group == "" {
			r.plain = append(r.plain, b.target(s, subject))
			continue
		}
		i := slices.Index(names, s.group)
		if i < 0 {
			i = len(names)
			names = append(names, s.group)
			r.groups = append(r.groups, nil)
		}
		r.groups[i] = append(r.groups[i], b.target(s, subject))
	}
	if len(b.routes) >= maxBusRoutes {
		clear(b.routes) // a scenario publishing on ever new subjects: start again
	}
	b.routes[subject] = r
	return r
}

// maxBusRoutes bounds the subjects whose receivers are cached (the
// built-in scenarios use a few per worker; a user's may use more).
const maxBusRoutes = 4096

func (b *Bus) latency() time.Duration { return b.w.Between(b.MinLatency, b.MaxLatency) }

// publish delivers payload: a message (each receiver gets a copy) or a
// request (shared: its reply goes back to one requester).
func (b *Bus) publish(from *busConn, payload any, to []busTarget) {
	b.Published++
	if b.isCut(from) {
		b.Lost++
		return
	}
	for _, t := range to {
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
				m = copyMessage(msg)
			}
			d := b.latency()
			if !b.Reorder {
				pair := busPair{from, t.s}
				at := max(b.w.Elapsed()+d, b.last[pair])
				b.last[pair], d = at, at-b.w.Elapsed()
			}
			b.w.afterCall(d, t.deliver, m)
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
		reply, err := fn(copyMessage(req.msg))
		req.answer(c.conn, reply, err)
	})
}

// Request sends msg to a server of subject and calls reply once with its
// answer, or with ErrNoResponders, or ErrTimeout after timeout (a lost
// request or reply).
func (c *BusClient) Request(subject string, msg proto.Message, timeout time.Duration, reply func(proto.Message, error)) error {
	r, err := c.b.checkedRoute(subject)
	if err != nil {
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
	to := b.receivers(r)
	if len(to) == 0 {
		b.NoResponders++
		b.w.After(b.latency(), func() { finish(nil, fmt.Errorf("%w on %s", ErrNoResponders, subject)) })
		return nil
	}
	req := &busRequest{b: b, to: c.conn, msg: copyMessage(msg), finish: finish}
	b.publish(c.conn, req, to)
	b.w.After(timeout, func() {
		if !done { // usually answered by now: no error to format
			finish(nil, fmt.Errorf("%w after %s on %s", ErrTimeout, timeout, subject))
		}
	})
	return nil
}

// busRequest carries a request through publish.
type busRequest struct {
	b      *Bus
	to     *busConn
	msg    proto.Message
	finish func(proto.Message, error)
}

func (r *busRequest) answer(from *busConn, reply proto.Message, err error) {
	b := r.b
	if b.isCut(from) || b.w.Chance(b.Loss) {
		b.Lost++
		return // the requester times out
	}
	if reply != nil {
		reply = copyMessage(reply)
	}
	b.w.After(b.latency(), func() {
		if b.isCut(r.to) {
			b.Lost++
			return
		}
		r.finish(reply, err)
	})
}
