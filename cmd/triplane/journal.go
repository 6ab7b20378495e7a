package main

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/journal"
)

// newJournalCmd is `triplane journal`: repairs of the actor journal, the
// only commands that write to it from outside the actors.
func newJournalCmd(g *globalFlags) *cobra.Command {
	f := &replayFlags{}
	cmd := &cobra.Command{
		Use:   "journal",
		Short: "Repair the actor journal: remove a message the journal did not write",
		Long: `Journal repairs the actor journal (JetStream). Unlike replay, it writes.

  remove-stray   delete a message that is not a batch the journal wrote for
                 the actor its subject names (an empty or foreign publish):
                 that actor's reads fail, and it stays stopped, until it is gone
` + journalSourceHelp,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown journal command %q (commands: remove-stray)", args[0])}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	f.bind(cmd.PersistentFlags())
	cmd.AddCommand(newJournalRemoveStrayCmd(g, f))
	return cmd
}

const journalSourceHelp = `
Where it works:
  --data-dir DIR   a stopped 'triplane up' (default ~/.triplane, as for up): its
                   lock is taken (a running 'triplane up' on it is an error),
                   and its JetStream store is served by an embedded NATS server
                   for the duration.
  --nats URL       a running system's NATS.`

func newJournalRemoveStrayCmd(g *globalFlags, f *replayFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "remove-stray STREAM_SEQ",
		Short: "Delete the journal stream's message at STREAM_SEQ if the journal did not write it",
		Long: `Delete the journal stream's message at STREAM_SEQ when it is not a batch the
journal wrote for the actor its subject names: an empty publish, garbage, or
another actor's batch on that subject. Such a message stops the actor (its
recovery fails with an error naming the stream sequence, as do replay's
reads of it) rather than letting it recover past it. A batch of events or a
deletion marker is refused (exit 1): those are the actor's history.
` + journalSourceHelp,
		Example: `  triplane journal remove-stray 1042 --data-dir /var/lib/triplane
  triplane journal remove-stray 1042 --nats nats://10.0.0.5:4222`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("remove-stray needs the message's stream sequence (from the error naming it); got %d arguments", len(args))}
			}
			if n, err := strconv.ParseUint(args[0], 10, 64); err != nil || n == 0 {
				return usageError{fmt.Errorf("stream sequence %q: want a positive integer", args[0])}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			seq, _ := strconv.ParseUint(args[0], 10, 64)
			s, err := f.open(cmd, g)
			if err != nil {
				return err
			}
			defer s.Close()
			what, err := s.Journal.RemoveStray(s.ctx, seq)
			if errors.Is(err, journal.ErrNotStray) {
				return fmt.Errorf("%w (use `triplane replay events` to read it)", err)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", what)
			return nil
		},
	}
}
