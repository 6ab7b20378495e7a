package control

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
)

// JournalHoster hosts placed actors on this node's actor host: starting one
// recovers it from its snapshot and journal (so a moved actor resumes where
// its previous node left it, and a journal it cannot read fails the start,
// which is retried); stopping one drops it from the hosted set. Callers
// route commands to an actor through the node that hosts it.
type JournalHoster struct {
	Journal   *journal.Journal
	Snapshots *journal.Snapshots
	Registry  *actors.Registry
	Logger    *slog.Logger
	// OnStart and OnStop, when set, are called after an actor starts or
	// stops here.
	OnStart func(actors.Address, *actors.Recovered)
	OnStop  func(actors.Address)

	mu        sync.Mutex
	recovered map[actors.Address]*actors.Recovered
}

// StartActor implements Hoster.
func (h *JournalHoster) StartActor(ctx context.Context, a actors.Address) error {
	m, err := h.Registry.Machine(a.Kind)
	if err != nil {
		return err
	}
	r, err := actors.Recover(ctx, h.Journal, h.Snapshots, m, a.ID, h.Logger)
	if err != nil {
		return fmt.Errorf("control: start %s: %w", a, err)
	}
	h.mu.Lock()
	if h.recovered == nil {
		h.recovered = map[actors.Address]*actors.Recovered{}
	}
	h.recovered[a] = r
	h.mu.Unlock()
	if h.OnStart != nil {
		h.OnStart(a, r)
	}
	return nil
}

// StopActor implements Hoster.
func (h *JournalHoster) StopActor(_ context.Context, a actors.Address) error {
	h.mu.Lock()
	delete(h.recovered, a)
	h.mu.Unlock()
	if h.OnStop != nil {
		h.OnStop(a)
	}
	return nil
}

// Recovered returns what starting a hosted actor recovered.
func (h *JournalHoster) Recovered(a actors.Address) (*actors.Recovered, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r, ok := h.recovered[a]
	return r, ok
}
