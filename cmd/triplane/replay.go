package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/all"
	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/logging"
	"github.com/triplane-dev/triplane/replay"
)

// replayFlags are the flags every replay subcommand shares: where to read.
type replayFlags struct {
	natsURL   string
	dataDir   string
	snapshots string
	prefix    string
	stream    string
	verify    bool
}

// replaySourceFlags are also read from TRIPLANE_* variables, like up's.
var replaySourceFlags = []string{"nats", "data-dir", "snapshots", "journal-prefix", "journal-stream", "log-format", "log-level"}

const replaySourceHelp = `
Where it reads from:
  --data-dir DIR   a stopped 'triplane up' (default ~/.triplane, as for up): its
                   lock is taken (a running 'triplane up' on it is an error),
                   its JetStream store is served by an embedded NATS server
                   for the duration, and <DIR>/snapshots is read if it exists.
  --nats URL       a running system's NATS; snapshots only with --snapshots DIR.
Nothing is ever written to the journal.`

func newReplayCmd(g *globalFlags) *cobra.Command {
	f := &replayFlags{}
	cmd := &cobra.Command{
		Use:   "replay",
		Short: "Read actor journals back: list actors, print events, rebuild state, verify snapshots, draw timelines",
		Long: `Replay reads the actor journal (JetStream) and the snapshot store (Pebble)
back, with the same state machines the host runs, to explain what actors did:

  list       the actors in the journal, with their highest sequence
  events     an actor's events, filtered by sequence, time or type
  state      an actor's state rebuilt at a sequence or a time
  verify     replay every actor; check each snapshot against the journal
  timeline   several actors' events in time order, as Mermaid or HTML
` + replaySourceHelp,
		Example: `  triplane replay list
  triplane replay events ledger acct-1 --type LedgerDeposited --since 2025-03-14T09:00:00Z
  triplane replay state ledger acct-1 --at-seq 42
  triplane replay verify --data-dir /var/lib/triplane
  triplane replay timeline ledger/acct-1 ledger/acct-2 --format html -o timeline.html
  triplane replay list --nats nats://10.0.0.5:4222`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown replay command %q (commands: list, events, state, verify, timeline)", args[0])}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.verify {
				return runVerify(cmd, g, f)
			}
			return cmd.Help()
		},
	}
	f.bind(cmd.PersistentFlags())
	cmd.Flags().BoolVar(&f.verify, "verify", false, "run `triplane replay verify`")
	cmd.AddCommand(newReplayListCmd(g, f), newReplayEventsCmd(g, f), newReplayStateCmd(g, f),
		newReplayVerifyCmd(g, f), newReplayTimelineCmd(g, f))
	return cmd
}

// bind adds the source flags (shared by replay and journal).
func (f *replayFlags) bind(pf *pflag.FlagSet) {
	pf.StringVar(&f.dataDir, "data-dir", defaultDataDir(), "data dir of a stopped `triplane up` (its lock is taken)")
	pf.StringVar(&f.natsURL, "nats", "", "URL of a running system's NATS server, instead of --data-dir")
	pf.StringVar(&f.snapshots, "snapshots", "", "snapshot store directory (default with --data-dir: <data-dir>/snapshots if it exists)")
	pf.StringVar(&f.prefix, "journal-prefix", replay.DefaultJournalPrefix, "subject prefix of the journal: subjects are <prefix>.journal.<kind>.<id>")
	pf.StringVar(&f.stream, "journal-stream", replay.DefaultJournalStream, "JetStream stream of the journal")
}

// replaySession is an open replay source for one command.
type replaySession struct {
	*replay.Session
	ctx  context.Context
	log  *slog.Logger
	stop func()
}

func (s *replaySession) Close() {
	s.Session.Close()
	s.stop()
}

// open resolves the source flags (flags, then TRIPLANE_* variables) and
// opens the journal.
func (f *replayFlags) open(cmd *cobra.Command, g *globalFlags) (*replaySession, error) {
	keep := map[string]bool{}
	for _, n := range replaySourceFlags {
		keep[n] = true
	}
	var skip []string
	cmd.Flags().VisitAll(func(fl *pflag.Flag) {
		if !keep[fl.Name] {
			skip = append(skip, fl.Name)
		}
	})
	r, err := config.Resolve(cmd.Flags(), config.Options{Skip: skip})
	if err != nil {
		return nil, usageError{err}
	}
	if f.natsURL != "" {
		if err := checkURL(f.natsURL, "nats", "tls", "ws", "wss"); err != nil {
			return nil, usageError{&config.Error{Key: "nats", Err: err}}
		}
		if r.Source("data-dir") == config.FromFlag {
			nats := "--nats"
			if src := r.Source("nats"); src != config.FromFlag {
				// Named where it came from: the user typed only --data-dir.
				nats = fmt.Sprintf("nats (set by the config file %s)", r.File)
				if src == config.FromEnv {
					nats = "nats (set by $" + config.EnvName("nats") + ")"
				}
			}
			return nil, usageError{fmt.Errorf("give --nats (a running system) or --data-dir (a stopped one), not both: %s and --data-dir are both set; with --nats, --snapshots names a snapshot store", nats)}
		}
	} else if strings.TrimSpace(f.dataDir) == "" {
		return nil, usageError{&config.Error{Key: "data-dir", Err: errors.New("must not be empty")}}
	}
	log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
	if err != nil {
		return nil, usageError{err}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	s, err := replay.Open(ctx, replay.Options{
		NATSURL: f.natsURL, DataDir: f.dataDir, SnapshotsDir: f.snapshots,
		Journal:  journal.Config{Prefix: f.prefix, Stream: f.stream},
		Registry: all.Registry(), Log: log,
		Progress: replay.TerminalProgress(cmd.ErrOrStderr()),
	})
	if err != nil {
		stop()
		return nil, err
	}
	log.Debug("replaying", "source", s.Source, "stream", s.Journal.Config().Stream)
	return &replaySession{Session: s, ctx: ctx, log: log, stop: stop}, nil
}

// replayErr turns errors about what the user asked for into usage errors.
func replayErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, replay.ErrUnknownKind) || errors.Is(err, replay.ErrUnknownType) || errors.Is(err, journal.ErrBadName) {
		return usageError{err}
	}
	return err
}

// actorArgs accepts exactly KIND ID.
func actorArgs(cmd *cobra.Command, args []string) error {
	if len(args) != 2 {
		return usageError{fmt.Errorf("%s needs an actor KIND and ID, for example `%s ledger acct-1`; got %d argument(s)",
			cmd.CommandPath(), cmd.CommandPath(), len(args))}
	}
	if err := replay.CheckActor(args[0], args[1]); err != nil {
		return usageError{err}
	}
	return nil
}

func parseTime(flag, s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, usageError{fmt.Errorf("--%s %q: want an RFC 3339 time such as 2025-03-14T09:26:53Z or 2025-03-14T10:26:53.5+01:00", flag, s)}
	}
	return t, nil
}

// filterFlags select events.
type filterFlags struct {
	from, to     uint64
	since, until string
	typ          string
}

func (ff *filterFlags) bind(fs *pflag.FlagSet) {
	fs.Uint64Var(&ff.from, "from", 0, "first event sequence (inclusive)")
	fs.Uint64Var(&ff.to, "to", 0, "last event sequence (inclusive; 0: the last)")
	fs.StringVar(&ff.since, "since", "", "only events of commands handled at or after this RFC 3339 time")
	fs.StringVar(&ff.until, "until", "", "only events before the first command handled at or after this RFC 3339 time")
	fs.StringVar(&ff.typ, "type", "", "only events of this protobuf type: full (triplane.v1.LedgerDeposited) or short (LedgerDeposited) name")
}

func (ff *filterFlags) filter() (replay.Filter, error) {
	flt := replay.Filter{From: ff.from, To: ff.to}
	var err error
	if flt.Since, err = parseTime("since", ff.since); err != nil {
		return flt, err
	}
	if flt.Until, err = parseTime("until", ff.until); err != nil {
		return flt, err
	}
	if ff.to != 0 && ff.from > ff.to {
		return flt, usageError{fmt.Errorf("--from %d is after --to %d: nothing could match", ff.from, ff.to)}
	}
	if !flt.Since.IsZero() && !flt.Until.IsZero() && !flt.Since.Before(flt.Until) {
		return flt, usageError{fmt.Errorf("--since %s is not before --until %s: nothing could match", ff.since, ff.until)}
	}
	if flt.Type, err = replay.ResolveType(ff.typ); err != nil {
		return flt, usageError{err}
	}
	return flt, nil
}

func newReplayListCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the actors in the journal: kind, id, highest sequence, last event time, snapshot",
		Long: `List every actor with events in the journal, sorted by kind and id: its highest
event sequence, the time of its last command, and the sequence of its newest
snapshot (when a snapshot store is read). --json prints one JSON object per
actor per line.
` + replaySourceHelp,
		Example: `  triplane replay list
  triplane replay list --data-dir /tmp/tp --json | jq -r 'select(.highest_seq > 100) | .id'
  triplane replay list --nats nats://127.0.0.1:4222`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.open(cmd, g)
			if err != nil {
				return err
			}
			defer s.Close()
			list, err := s.List(s.ctx)
			if err != nil {
				return err
			}
			if len(list) == 0 && !asJSON {
				fmt.Fprintf(cmd.ErrOrStderr(), "the journal (stream %s) has no actors\n", s.Journal.Config().Stream)
				return nil
			}
			return replay.WriteActors(cmd.OutOrStdout(), list, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per actor per line")
	return cmd
}

func newReplayEventsCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	var (
		ff     filterFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "events KIND ID",
		Short: "Print an actor's events: sequence, time, type and fields",
		Long: `Print the events of one actor in sequence order, one per line: sequence,
command time (UTC), type and fields as protojson, and the command id. --json
prints one JSON object per event per line instead, with the full type name and
the fields under "event".

Filters combine: --from/--to select sequences, --since/--until command times
(RFC 3339), --type one event type. An event type this binary does not know
(schema drift) stops the listing with an error naming its subject and sequence.
` + replaySourceHelp,
		Example: `  triplane replay events ledger acct-1
  triplane replay events ledger acct-1 --from 10 --to 20
  triplane replay events ledger acct-1 --type LedgerDeposited --since 2025-03-14T09:00:00Z --until 2025-03-14T10:00:00Z
  triplane replay events ledger acct-1 --json | jq -c .event`,
		Args: actorArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			flt, err := ff.filter()
			if err != nil {
				return err
			}
			s, err := f.open(cmd, g)
			if err != nil {
				return err
			}
			defer s.Close()
			w := bufio.NewWriter(cmd.OutOrStdout())
			n := 0
			err = s.Events(s.ctx, args[0], args[1], flt, func(e *replay.Event) error {
				n++
				return replay.WriteEvent(w, e, asJSON)
			})
			if ferr := w.Flush(); err == nil && ferr != nil {
				err = fmt.Errorf("write events: %w", ferr)
			}
			if err != nil {
				return replayErr(err)
			}
			if n == 0 {
				fmt.Fprintf(cmd.ErrOrStderr(), "no events of %s/%s match\n", args[0], args[1])
			}
			return nil
		},
	}
	ff.bind(cmd.Flags())
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per event per line")
	return cmd
}

func newReplayStateCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	var (
		atSeq  uint64
		atTime string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "state KIND ID [--at-seq N | --at-time TIME]",
		Short: "Rebuild an actor's state at a sequence or a time and print it",
		Long: `Rebuild an actor's state from its journal with its state machine, as the host
would, and print it as protojson with the sequence and command time it
reflects. Without --at-seq or --at-time it is the latest state. --at-seq N is
the state after event N; --at-time T the state after the commands up to the
first one handled after T (command times come from the nodes' clocks, and a
command on a node whose clock is behind may carry an earlier time than the one
before it: the state is a prefix of the journal, never one with a gap). Snapshots are not used: every event from the first is applied.
` + replaySourceHelp,
		Example: `  triplane replay state ledger acct-1
  triplane replay state ledger acct-1 --at-seq 42
  triplane replay state ledger acct-1 --at-time 2025-03-14T09:30:00Z --json`,
		Args: actorArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var at replay.At
			if cmd.Flags().Changed("at-seq") {
				if cmd.Flags().Changed("at-time") {
					return usageError{errors.New("give --at-seq or --at-time, not both")}
				}
				if atSeq == 0 {
					return usageError{errors.New("--at-seq 0: sequences start at 1 (the state before any event is the machine's initial state)")}
				}
				at.Seq = atSeq
			}
			t, err := parseTime("at-time", atTime)
			if err != nil {
				return err
			}
			at.Time = t
			s, err := f.open(cmd, g)
			if err != nil {
				return err
			}
			defer s.Close()
			st, err := s.State(s.ctx, args[0], args[1], at)
			if err != nil {
				return replayErr(err)
			}
			if at.Seq > st.Highest {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s/%s has events up to seq %d only: this is its state at seq %d\n",
					args[0], args[1], st.Highest, st.Seq)
			}
			return replay.WriteState(cmd.OutOrStdout(), st, asJSON)
		},
	}
	cmd.Flags().Uint64Var(&atSeq, "at-seq", 0, "rebuild the state after this event sequence")
	cmd.Flags().StringVar(&atTime, "at-time", "", "rebuild the state after every command handled at or before this RFC 3339 time")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object: kind, id, seq, time, state")
	return cmd
}

func newReplayVerifyCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "verify",
		Short: "Replay every actor and check each snapshot against the journal",
		Long: `Replay every actor's whole journal with its state machine: every event must
decode and apply. For each actor with a snapshot, rebuild its state from the
journal up to the snapshot's sequence and compare: a state that differs is
reported with a field-by-field diff and the sequence to look at (a snapshot
holds only its final state, so the cause lies at or before its sequence, and
replay says at which sequence the journal's state does equal the snapshot's,
if any); a journal shorter than the snapshot, a wrong journal position and an
unreadable (corrupt) snapshot are reported too.

One line per actor with its status (OK, SKIPPED, DIVERGED, CORRUPT, FAILED,
UNKNOWN-KIND), then a summary. The exit code is 1 when any actor has a
problem. 'triplane replay --verify' does the same.
` + replaySourceHelp,
		Example: `  triplane replay verify
  triplane replay verify --data-dir /var/lib/triplane
  triplane replay verify --nats nats://10.0.0.5:4222 --snapshots /backup/snapshots`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return runVerify(cmd, g, f) },
	}
}

func runVerify(cmd *cobra.Command, g *globalFlags, f *replayFlags) error {
	s, err := f.open(cmd, g)
	if err != nil {
		return err
	}
	defer s.Close()
	if s.Snapshots == nil {
		fmt.Fprintln(cmd.ErrOrStderr(), "no snapshot store (--snapshots, or <data-dir>/snapshots): replaying the journal only")
	}
	rep, err := s.Verify(s.ctx)
	if err != nil {
		return err
	}
	if err := rep.WriteText(cmd.OutOrStdout()); err != nil {
		return err
	}
	if !rep.OK() {
		return fmt.Errorf("verify: %d of %d actors have problems (listed above)", rep.Faults, len(rep.Checks))
	}
	return nil
}

var timelineFormats = []string{"mermaid", "html"}

func newReplayTimelineCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	var (
		ff     filterFlags
		format string
		output string
		limit  int
	)
	cmd := &cobra.Command{
		Use:   "timeline KIND/ID [KIND/ID ...]",
		Short: "Draw several actors' events in time order, as Mermaid or self-contained HTML",
		Long: `Merge the events of the given actors by command time and draw them:

  --format mermaid   a Mermaid sequence diagram, one participant per actor and a
                     note per event (sequence, time, type, fields); to stdout
                     unless -o is given.
  --format html      one self-contained page (no scripts, nothing fetched): a
                     lane per actor with events placed by time, fields on hover,
                     and a table of every event. Needs -o FILE (-o - for stdout).

--limit bounds the events per actor (the first ones that match); a cut actor
is flagged in the output and on stderr. The --from/--to/--since/--until/--type
filters of 'replay events' apply to every actor.
` + replaySourceHelp,
		Example: `  triplane replay timeline ledger/acct-1 ledger/acct-2
  triplane replay timeline ledger/acct-1 ledger/acct-2 --format html -o timeline.html
  triplane replay timeline ledger/acct-1 --since 2025-03-14T09:00:00Z --limit 200 -o acct-1.mmd`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{fmt.Errorf("%s needs at least one actor as KIND/ID, for example `%s ledger/acct-1 ledger/acct-2`",
					cmd.CommandPath(), cmd.CommandPath())}
			}
			for _, a := range args {
				if _, err := replay.ParseActor(a); err != nil {
					return usageError{err}
				}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit <= 0 {
				return usageError{&config.Error{Key: "limit", Err: fmt.Errorf("must be at least 1, got %d", limit)}}
			}
			if format == "html" && output == "" {
				return usageError{errors.New("--format html writes a page: give -o FILE (or -o - for stdout)")}
			}
			flt, err := ff.filter()
			if err != nil {
				return err
			}
			addrs := make([]actors.Address, 0, len(args))
			for _, a := range args {
				addr, _ := replay.ParseActor(a) // checked by Args
				addrs = append(addrs, addr)
			}
			s, err := f.open(cmd, g)
			if err != nil {
				return err
			}
			defer s.Close()
			tl, err := s.Timeline(s.ctx, addrs, flt, limit)
			if err != nil {
				return replayErr(err)
			}
			for _, l := range tl.Lanes {
				if l.Truncated {
					fmt.Fprintf(cmd.ErrOrStderr(), "%s: truncated to the first %d events (up to seq %d of %d); narrow with --from/--since or raise --limit\n",
						l.Actor(), l.Shown, l.LastSeq, l.Highest)
				}
			}
			write := tl.WriteMermaid
			if format == "html" {
				write = tl.WriteHTML
			}
			if output == "" || output == "-" {
				return write(cmd.OutOrStdout())
			}
			if err := writeFile(output, write); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s: %d events of %d actors\n", output, len(tl.Events), len(tl.Lanes))
			return nil
		},
	}
	fs := cmd.Flags()
	ff.bind(fs)
	config.EnumVar(fs, &format, "format", "mermaid", timelineFormats, "output format")
	fs.StringVarP(&output, "output", "o", "", "file to write (default for mermaid: stdout; - is stdout)")
	fs.IntVar(&limit, "limit", replay.DefaultLimit, "most events shown per actor")
	return cmd
}

// writeFile writes a file through write, reporting the file's name on
// failure.
func writeFile(path string, write func(io.Writer) error) error {
	out, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create output file: %w", err)
	}
	w := bufio.NewWriter(out)
	err = write(w)
	if err == nil {
		err = w.Flush()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
