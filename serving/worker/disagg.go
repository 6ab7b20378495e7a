package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/transfer"
	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
	"github.com/triplane-dev/triplane/planes/event"
)

// Worker roles in disaggregated serving.
const (
	RoleBoth    = "both"
	RolePrefill = "prefill"
	RoleDecode  = "decode"
	// RoleAggregated serves whole requests only: no block transfers in
	// or out (what a node without prefill workers runs).
	RoleAggregated = "aggregated"
)

// decodes reports whether a worker of role receives KV blocks, and
// prefills whether it answers prefill requests.
func decodes(role string) bool  { return role == RoleBoth || role == RoleDecode }
func prefills(role string) bool { return role == RoleBoth || role == RolePrefill }

// prefillTimeout bounds a decode worker's wait for a remote prefill; past
// it the decode worker prefills locally.
const prefillTimeout = 60 * time.Second

// PrefillSubject is where a prefill worker takes prefill requests.
func PrefillSubject(b *event.Bus, namespace, worker string) (string, error) {
	return b.Subject(namespace, Component, "prefill", worker)
}

// Stats counts a worker's disaggregation work.
type Stats struct {
	RemotePrefills, Fallbacks, Imported, Exported uint64
	// ShmDials and TCPDials count the connections this worker's transfers
	// made, by the transport the dialer chose.
	ShmDials, TCPDials uint64
	// PrefillCancelsSent counts the remote prefills this worker gave up
	// because the client left, telling the prefill worker so;
	// PrefillsCancelled the prefills it stopped or refused on such a cancel.
	PrefillCancelsSent, PrefillsCancelled uint64
}

type stats struct {
	remotePrefills, fallbacks, imported, exported, shmDials, tcpDials atomic.Uint64
	prefillCancelsSent, prefillsCancelled                             atomic.Uint64
}

// Stats returns the counters.
func (w *Worker) Stats() Stats {
	return Stats{RemotePrefills: w.stats.remotePrefills.Load(), Fallbacks: w.stats.fallbacks.Load(),
		Imported: w.stats.imported.Load(), Exported: w.stats.exported.Load(),
		ShmDials: w.stats.shmDials.Load(), TCPDials: w.stats.tcpDials.Load(),
		PrefillCancelsSent: w.stats.prefillCancelsSent.Load(), PrefillsCancelled: w.stats.prefillsCancelled.Load()}
}

func (w *Worker) startDisagg() error {
	w.xfer = w.cfg.TransferMetrics
	if w.xfer == nil {
		w.xfer = transfer.NewMetrics(nil)
	}
	if decodes(w.cfg.Role) {
		regions, err := data.NewRegions(w.region)
		if err != nil {
			return err
		}
		scfg := data.ServerConfig{Regions: regions, Token: w.cfg.DataToken, OnLanded: w.onLanded, Logger: w.log, Metrics: w.cfg.DataMetrics}
		if w.dataSrv, err = data.ListenTCP(net.JoinHostPort(w.cfg.ListenHost, "0"), scfg); err != nil {
			return fmt.Errorf("data plane: %w", err)
		}
		if w.region.Shared() {
			// Peers on this host copy straight into the staging region; the
			// receiver still verifies every block's checksum.
			if w.shmDir, err = os.MkdirTemp("", "triplane-shm-"); err != nil {
				return fmt.Errorf("data plane: %w", err)
			}
			if w.shmSrv, err = data.ListenShm(filepath.Join(w.shmDir, "blocks.sock"), scfg, false); err != nil {
				return fmt.Errorf("data plane: %w", err)
			}
		}
		// What a sender needs: published on the control plane and sent
		// with each prefill request (so a prefill worker reads no etcd per
		// request), with the TCP address peers can dial.
		w.dataPeer = data.Peer(regions, w.dataSrv, w.shmSrv)
		w.dataPeer.TcpAddr = w.advertised(w.dataPeer.TcpAddr)
	}
	if prefills(w.cfg.Role) && w.cfg.Host != nil {
		// One dialer and one supervisor for every prefill this worker
		// serves: the supervisor refuses a second run of a session
		// already running here (a prefill request delivered twice), and
		// the dialer's counts land in the node's metrics. Each session
		// dials its own decode worker (Spec.Dial).
		w.dialer = data.NewDialer(data.DialOptions{Lanes: 1, Token: w.cfg.DataToken, Logger: w.log, Metrics: w.cfg.DataMetrics})
		var err error
		if w.sup, err = transfer.NewSupervisor(transfer.Config{Host: w.cfg.Host, Logger: w.log, Metrics: w.xfer}); err != nil {
			return err
		}
		subj, err := PrefillSubject(w.cfg.Bus, w.cfg.Namespace, w.cfg.ID)
		if err != nil {
			return err
		}
		limit := w.cfg.MaxPrefills
		if limit <= 0 {
			limit = 16
		}
		// Cancels first: none may miss a prefill already served.
		csubj, err := PrefillCancelSubject(w.cfg.Bus, w.cfg.Namespace, w.cfg.ID)
		if err != nil {
			return err
		}
		if w.prefillCancels, err = event.Subscribe(w.cfg.Bus, csubj, w.onPrefillCancel); err != nil {
			return fmt.Errorf("prefill cancels: %w", err)
		}
		if w.prefill, err = event.ServeConcurrent(w.cfg.Bus, subj, "", limit, w.servePrefill); err != nil {
			return fmt.Errorf("prefill service: %w", err)
		}
	}
	return nil
}

// Endpoints lists what the worker serves, as registered on the control
// plane: its response stream, and its block receivers when it decodes.
func (w *Worker) Endpoints() []*triplanev1.Endpoint {
	out := []*triplanev1.Endpoint{{Protocol: triplanev1.Protocol_PROTOCOL_RESPONSE_STREAM, Address: w.Addr()}}
	if w.dataSrv != nil {
		out = append(out, &triplanev1.Endpoint{Protocol: triplanev1.Protocol_PROTOCOL_DATA_TCP, Address: w.dataPeer.TcpAddr})
	}
	if w.shmSrv != nil {
		out = append(out, &triplanev1.Endpoint{Protocol: triplanev1.Protocol_PROTOCOL_DATA_SHM, Address: w.shmSrv.Path()})
	}
	return out
}

// onLanded records bytes that landed in reserved blocks and verified: a
// frame may hold part of a block (transports split blocks over 1 MiB) or
// several. Bytes outside reserved blocks are counted (the data server only
// writes inside the region, but a block nobody reserved is a peer's
// mistake).
func (w *Worker) onLanded(l data.Landed) {
	bs := uint64(w.region.BlockSize())
	ok := l.Desc.Region == w.region.ID() && l.Desc.Length > 0
	w.mu.Lock()
	for off, end := l.Desc.Offset, l.Desc.Offset+l.Desc.Length; ok && off < end; {
		b := w.region.BlockDesc(int(off / bs))
		n := min(end, b.Offset+b.Length) - off
		if !w.expect[b] {
			ok = false
			break
		}
		w.landed[b] += n
		off += n
	}
	w.mu.Unlock()
	if !ok {
		w.metrics.unexpectedBlocks.Inc()
	}
}

// onEngine runs fn on the engine goroutine and waits for it. It is not
// dropped when the mailbox is full (it waits for room) and not abandoned
// half-way: it returns an error only when the worker stopped, and then fn
// did not run.
func (w *Worker) onEngine(fn func()) error {
	done := make(chan struct{})
	select {
	case w.inbox <- op{fn: func() { fn(); close(done) }}:
	case <-w.done:
		return ErrStopped
	}
	select {
	case <-done:
		return nil
	case <-w.done:
		// The engine goroutine ran fn before stopping, or never will.
		select {
		case <-done:
			return nil
		default:
			return ErrStopped
		}
	}
}

// takeSlots reserves n staging slots, or none.
func (w *Worker) takeSlots(n int) ([]int, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if n > len(w.slots) {
		return nil, false
	}
	out := slices.Clone(w.slots[:n])
	w.slots = w.slots[n:]
	return out, true
}

// importPrefix has the prefill worker compute the prompt's blocks and
// transfer them into staging slots here, then commits them into the
// engine's cache after checking them. Any failure is logged and counted
// and the request is prefilled here instead: disaggregation is an
// optimisation, never a reason to fail a request. When ctx ends meanwhile
// the reservation is given up and nothing is counted; the caller must not
// add the request then.
func (w *Worker) importPrefix(ctx context.Context, req *triplanev1.GenerateRequest) {
	if ctx.Err() != nil {
		return // the client left: reserve nothing (it could evict cached blocks)
	}
	if w.dataSrv == nil {
		// A frontend that does not know this worker's role asked it to
		// take blocks it has no receiver for.
		w.remoteFailed(ctx, req, "no_data_plane", fmt.Errorf("a %s worker receives no blocks", w.cfg.Role))
		return
	}
	bs := w.eng.Config().BlockSize
	hashes := importBlocks(req.Tokens, bs)
	if len(hashes) == 0 {
		return
	}
	id := "import-" + req.RequestId
	var res mocker.Reservation
	var rerr error
	if err := w.onEngine(func() {
		res, rerr = w.eng.ReserveImport(id, hashes)
		if rerr == nil && len(res.Blocks) == 0 {
			// All cached here already: nothing to move; let go of the
			// references the reservation took.
			w.eng.AbortImport(id)
		}
	}); err != nil || rerr != nil {
		w.remoteFailed(ctx, req, "reserve", errors.Join(err, rerr))
		return
	}
	if len(res.Blocks) == 0 {
		return
	}
	slots, ok := w.takeSlots(len(res.Blocks))
	if !ok {
		_ = w.onEngine(func() { w.eng.AbortImport(id) })
		w.remoteFailed(ctx, req, "staging", fmt.Errorf("%d blocks do not fit the staging region now", len(res.Blocks)))
		return
	}
	deadline := time.Now().Add(prefillTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	descs := make([]data.Descriptor, len(slots))
	preq := &triplanev1.PrefillRequest{RequestId: req.RequestId, Tokens: req.Tokens, BlockHashes: hashes[res.Cached:],
		Peer:              w.dataPeer,
		SessionId:         fmt.Sprintf("kv-%s-%s", w.cfg.ID, req.RequestId),
		DeadlineUnixNanos: deadline.UnixNano()}
	w.mu.Lock()
	for i, slot := range slots {
		descs[i] = w.region.BlockDesc(slot)
		w.expect[descs[i]] = true
		preq.Destinations = append(preq.Destinations, descs[i].Proto())
	}
	w.mu.Unlock()
	// settle ends the reservation either way and hands the slots back.
	// Committing copies each staged block into the engine and checks its
	// bytes against its hash there, so a slot a late transfer spoiled can
	// never put a wrong block in the cache.
	settle := func(commit bool) (int, error) {
		w.mu.Lock()
		all := true
		for _, d := range descs {
			// A block landed twice (a resent range) counts more: all is
			// about every block having arrived, and the commit checks
			// each block's bytes against its hash.
			all = all && w.landed[d] >= d.Length
			delete(w.expect, d)
			delete(w.landed, d)
		}
		w.mu.Unlock()
		var n int
		var cerr error
		err := w.onEngine(func() {
			if commit && all {
				n, cerr = w.eng.CommitImportFrom(id, func(i int) []byte { return w.region.Block(slots[i]) })
				w.publish(w.eng.TakeEvents())
			} else {
				w.eng.AbortImport(id)
			}
		})
		w.mu.Lock()
		w.slots = append(w.slots, slots...)
		w.mu.Unlock()
		if commit && !all {
			cerr = errors.New("the prefill worker reported success but not every block landed here")
		}
		return n, errors.Join(err, cerr)
	}
	subj, err := PrefillSubject(w.cfg.Bus, w.cfg.Namespace, req.PrefillWorker)
	if err != nil {
		_, _ = settle(false)
		w.remoteFailed(ctx, req, "subject", err)
		return
	}
	pctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	if _, err := event.Request[*triplanev1.PrefillRequest, *triplanev1.PrefillReply](pctx, w.cfg.Bus, subj, preq); err != nil {
		_, _ = settle(false)
		if ctx.Err() != nil {
			// The request itself was cancelled: nothing falls back to a
			// local prefill (the caller drops the request), and the
			// prefill worker can stop working for nobody.
			w.cancelRemotePrefill(req.PrefillWorker, preq.SessionId)
			w.log.Debug("remote prefill abandoned: request cancelled", "request", req.RequestId,
				"prefill_worker", req.PrefillWorker, "err", err)
			return
		}
		w.remoteFailed(ctx, req, "prefill", err)
		return
	}
	n, err := settle(true)
	if err != nil {
		w.remoteFailed(ctx, req, "commit", err)
		return
	}
	w.metrics.imported.Add(float64(n))
	w.metrics.remotePrefills.Inc()
	w.stats.imported.Add(uint64(n))
	w.stats.remotePrefills.Add(1)
	w.log.Debug("prompt blocks imported", "request", req.RequestId, "from", req.PrefillWorker, "blocks", n)
}

func (w *Worker) remoteFailed(ctx context.Context, req *triplanev1.GenerateRequest, stage string, err error) {
	if ctx.Err() != nil {
		// The client left: whatever failed, nothing is prefilled here
		// instead (the caller does not add the request).
		return
	}
	w.metrics.prefillFallbacks.WithLabelValues(stage).Inc()
	w.stats.fallbacks.Add(1)
	w.log.Warn("remote prefill failed; prefilling here", "request", req.RequestId, "prefill_worker", req.PrefillWorker,
		"stage", stage, "err", err)
}

// servePrefill computes a prompt's blocks and moves the asked ones to the
// decode worker with a transfer session.
func (w *Worker) servePrefill(ctx context.Context, r *triplanev1.PrefillRequest) (_ *triplanev1.PrefillReply, err error) {
	bs := w.eng.Config().BlockSize
	full := mocker.BlockHashes(r.Tokens, bs)
	k := slices.Index(full, firstOr(r.BlockHashes))
	switch {
	case r.RequestId == "" || r.SessionId == "" || len(r.BlockHashes) == 0:
		return nil, fmt.Errorf("%w: prefill needs a request id, a session id and blocks", ErrBadRequest)
	case len(r.BlockHashes) != len(r.Destinations):
		return nil, fmt.Errorf("%w: %d blocks but %d destinations", ErrBadRequest, len(r.BlockHashes), len(r.Destinations))
	case k < 0 || k+len(r.BlockHashes) > len(full) || !slices.Equal(full[k:k+len(r.BlockHashes)], r.BlockHashes):
		return nil, fmt.Errorf("%w: the blocks asked for are not blocks of the prompt", ErrBadRequest)
	case r.Peer.GetTcpAddr() == "":
		return nil, fmt.Errorf("%w: no data-plane address for the decode worker", ErrBadRequest)
	}
	ctx, stop, err := w.runs.start(ctx, r.SessionId)
	if err != nil {
		w.prefillCancelled()
		return nil, fmt.Errorf("session %s: %w", r.SessionId, err)
	}
	tracked := ctx
	defer func() {
		if err != nil && errors.Is(context.Cause(tracked), ErrPrefillCancelled) {
			w.prefillCancelled()
		}
		stop()
	}()
	if r.DeadlineUnixNanos > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, time.Unix(0, r.DeadlineUnixNanos))
		defer cancel()
	}
	// Prefill: the prompt with one generated token computes every block.
	p, err := w.register(engine.Request{ID: "prefill-" + r.RequestId, Tokens: r.Tokens, MaxTokens: 1})
	if err != nil {
		return nil, err
	}
	defer w.forget(p.req.ID)
	if err := w.add(p); err != nil {
		return nil, err
	}
	for done := false; !done; {
		select {
		case <-p.notify:
		case <-ctx.Done():
			w.cancel(p.req.ID)
			return nil, context.Cause(ctx)
		case <-w.done:
			return nil, ErrStopped
		}
		p.mu.Lock()
		done = p.done
		perr := p.err
		p.mu.Unlock()
		if perr != nil {
			return nil, perr
		}
	}
	if ctx.Err() != nil {
		// Cancelled as the prefill ended: send nothing.
		return nil, context.Cause(ctx)
	}
	// Copy the blocks out on the engine goroutine (they may be evicted
	// once the request is gone); the transport checksums the copies off it,
	// so engine steps wait for the copy only.
	ops := make([]data.Op, len(r.BlockHashes))
	var missing error
	if err := w.onEngine(func() {
		for i, h := range r.BlockHashes {
			b, ok := w.eng.BlockBytes(h)
			if !ok {
				missing = fmt.Errorf("block %d (hash %016x) was evicted before it could be sent", i, h)
				return
			}
			src := slices.Clone(b)
			d := r.Destinations[i]
			ops[i] = data.Op{Src: src,
				Dst: data.Descriptor{Region: d.GetRegion(), Offset: d.GetOffset(), Length: d.GetLength()}}
		}
	}); err != nil || missing != nil {
		return nil, errors.Join(err, missing)
	}
	// Automatic choice: shared memory when the decode worker is on this
	// host and serves it, else TCP.
	dial := func(ctx context.Context) (data.Transport, error) {
		t, err := w.dialer.Dial(ctx, r.Peer)
		if err == nil && t.Name() == "shm" {
			w.stats.shmDials.Add(1)
		} else if err == nil {
			w.stats.tcpDials.Add(1)
		}
		return t, err
	}
	_, err = w.sup.Run(ctx, transfer.Spec{ID: r.SessionId, Blocks: ops, BlockSize: w.eng.Config().BlockBytes,
		MaxAttempts: 5, Peer: r.Peer.GetTcpAddr(), Dial: dial})
	if errors.Is(err, transfer.ErrAlreadyRunning) {
		// Another prefill drives this session (the same session asked
		// twice): it is not over, so its actor stays. The transfer
		// package's errors name the session.
		return nil, err
	}
	// The session is over either way: free its actor (its journal stays).
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if rerr := w.cfg.Host.Release(rctx, actors.Address{Kind: transfer.Kind, ID: r.SessionId}); rerr != nil {
		w.log.Warn("releasing a finished transfer session", "session", r.SessionId, "err", rerr)
	}
	if err != nil {
		return nil, err
	}
	w.metrics.exported.Add(float64(len(ops)))
	w.stats.exported.Add(uint64(len(ops)))
	p.mu.Lock()
	cached := p.cached
	p.mu.Unlock()
	return &triplanev1.PrefillReply{BlocksSent: uint32(len(ops)), CachedTokens: uint32(cached)}, nil
}

func (w *Worker) prefillCancelled() {
	w.metrics.prefillsCancelled.Inc()
	w.stats.prefillsCancelled.Add(1)
}

func firstOr(h []uint64) uint64 {
	if len(h) == 0 {
		return 0
	}
	return h[0]
}

// CheckCache verifies every cached block's bytes against its hash (the
// invariant that no corrupted block is ever cached) and returns how many
// are wrong and how many there are.
func (w *Worker) CheckCache() (bad, total int, err error) {
	err = w.onEngine(func() {
		for h := range w.eng.Cached() {
			b, _ := w.eng.BlockBytes(h)
			total++
			if !mocker.Verify(b, h) {
				bad++
			}
		}
	})
	return bad, total, err
}

// importBlocks are the hashes of a prompt's blocks worth importing: the full
// blocks before the one holding its last token. The engine computes that
// one wherever the request runs (it never takes it from the cache, so
// there is a token to prefill), and importing it, when the prompt ends on
// a block boundary, moved a block nobody used.
func importBlocks(tokens []uint32, blockSize int) []uint64 {
	if len(tokens) < 2 {
		return nil
	}
	return mocker.BlockHashes(tokens[:len(tokens)-1], blockSize)
}
