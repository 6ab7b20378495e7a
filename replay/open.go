package replay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/embedded"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/system"
)

// Defaults of the journal, as journal.Config has them.
const (
	DefaultJournalPrefix = "triplane"
	DefaultJournalStream = "TRIPLANE_JOURNAL"
)

// Options say where a Session reads from.
type Options struct {
	// NATSURL is the NATS server of a running system. When empty, DataDir
	// is read instead.
	NATSURL string
	// DataDir is the data dir of a stopped `triplane up`: its lock is
	// taken, and its JetStream store (<DataDir>/nats) served by an
	// embedded NATS server on a free loopback port for the session.
	DataDir string
	// SnapshotsDir is the snapshot store; default <DataDir>/snapshots
	// when reading a data dir and that directory exists. With NATSURL it
	// is only used when given.
	SnapshotsDir string
	// Journal names the stream and subject prefix; Replicas and
	// Duplicates are taken from the existing stream.
	Journal journal.Config
	// Registry of machines; nil means none (State and Verify then fail).
	Registry *actors.Registry
	Log      *slog.Logger
	Progress Progress
}

// Session is an open journal (and snapshot store) to replay from.
type Session struct {
	*Replayer
	// Source describes what is read, for messages.
	Source  string
	closers []func()
}

// Close releases everything the session holds, in reverse order of
// opening: connection, embedded server, snapshot store, data dir lock.
func (s *Session) Close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
	s.closers = nil
}

// Open opens the journal of a running system (Options.NATSURL) or of a
// stopped node's data dir. Nothing is written: a journal stream that does
// not exist is an error (ErrNoJournal), not created.
func Open(ctx context.Context, o Options) (_ *Session, err error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Registry == nil {
		o.Registry = actors.NewRegistry()
	}
	s := &Session{Replayer: &Replayer{Registry: o.Registry, Log: log, Progress: o.Progress}}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	url := o.NATSURL
	snapDir := o.SnapshotsDir
	if url == "" {
		dir, err := filepath.Abs(o.DataDir)
		if err != nil {
			return nil, fmt.Errorf("data dir %q: %w", o.DataDir, err)
		}
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("%w: data dir %s does not exist (give the --data-dir `triplane up` ran with, or --nats URL for a running system)", ErrNoData, dir)
		}
		natsDir := filepath.Join(dir, "nats")
		if _, err := os.Stat(natsDir); err != nil {
			return nil, fmt.Errorf("%w: data dir %s has no JetStream store (%s): did its `triplane up` use an external --nats? Then replay with --nats URL",
				ErrNoData, dir, natsDir)
		}
		// The lock keeps a `triplane up` from starting on the store while
		// it is read, and says who holds it if one runs.
		unlock, err := system.LockDataDir(dir)
		if err != nil {
			var inUse *system.DataDirInUseError
			if errors.As(err, &inUse) {
				return nil, fmt.Errorf("%w (to read a running system's journal, use --nats URL)", err)
			}
			return nil, fmt.Errorf("lock data dir: %w", err)
		}
		s.closers = append(s.closers, unlock)
		srv, err := embedded.StartNATS(ctx, embedded.NATSConfig{StoreDir: natsDir, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("serve the JetStream store of %s: %w", dir, err)
		}
		s.closers = append(s.closers, srv.Close)
		url = srv.URL()
		s.Source = "data dir " + dir
		if snapDir == "" {
			if st, err := os.Stat(filepath.Join(dir, "snapshots")); err == nil && st.IsDir() {
				snapDir = filepath.Join(dir, "snapshots")
			}
		}
		log.Debug("reading a stopped node's data dir", "dir", dir, "nats", url)
	} else {
		s.Source = "NATS " + url
	}

	if snapDir != "" {
		if st, err := os.Stat(snapDir); err != nil {
			return nil, fmt.Errorf("%w: snapshot store %s does not exist", ErrNoData, snapDir)
		} else if !st.IsDir() {
			return nil, fmt.Errorf("%w: snapshot store %s is a file, not a directory", ErrNoData, snapDir)
		}
		// Read-only: replay is for looking, and must not change a stopped
		// node's store (no new manifest, log or compaction).
		snaps, err := journal.OpenSnapshotsReadOnly(snapDir, log)
		switch {
		case errors.Is(err, journal.ErrNoStore):
			return nil, fmt.Errorf("%w: %w", ErrNoData, err)
		case err != nil && strings.Contains(err.Error(), "lock"):
			return nil, fmt.Errorf("open the snapshot store (is a node using it?): %w", err)
		case err != nil:
			return nil, fmt.Errorf("open the snapshot store: %w", err)
		}
		s.closers = append(s.closers, func() {
			if err := snaps.Close(); err != nil {
				log.Warn("closing the snapshot store", "dir", snapDir, "err", err)
			}
		})
		s.Snapshots = snaps
		s.Source += ", snapshots " + snapDir
	}

	nc, err := nats.Connect(url, nats.Name("triplane replay"), nats.MaxReconnects(0))
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s: %w", url, err)
	}
	s.closers = append(s.closers, nc.Close)
	j, err := OpenJournal(ctx, nc, o.Journal)
	if err != nil {
		return nil, err
	}
	s.Journal = j
	return s, nil
}

// OpenJournal opens an existing journal stream for reading. Unlike
// journal.Open it neither creates nor updates the stream (journal.Attach),
// so opening changes nothing on a running system or a stopped node's store.
func OpenJournal(ctx context.Context, nc *nats.Conn, cfg journal.Config) (*journal.Journal, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultJournalPrefix
	}
	if cfg.Stream == "" {
		cfg.Stream = DefaultJournalStream
	}
	j, err := journal.Attach(ctx, nc, cfg)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return nil, fmt.Errorf("%w: the server has no stream %s: nothing was journaled yet, or the journal has another name (--journal-stream)",
			ErrNoJournal, cfg.Stream)
	case errors.Is(err, journal.ErrNotJournal):
		return nil, fmt.Errorf("%w: %w: check --journal-prefix", ErrNoJournal, err)
	case err != nil:
		return nil, fmt.Errorf("replay: %w", err)
	}
	return j, nil
}
