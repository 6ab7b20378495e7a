// Command triplane is the one Triplane binary: `triplane up` runs the whole
// system on one machine; further subcommands join clusters, replay journals,
// simulate and benchmark.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/logging"
)

// version is set at link time by the Makefile (-X main.version=...).
var version = ""

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		v := bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v = "dev-" + s.Value[:12]
			}
		}
		if v != "" && v != "(devel)" {
			return v
		}
	}
	return "dev"
}

// usageError is a problem with how the command was invoked: exit code 2.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// globalFlags are the settings every subcommand shares.
type globalFlags struct {
	logFormat string
	logLevel  string
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "triplane",
		Short: "Triplane: a distributed LLM inference serving runtime",
		Long: `Triplane carries the three communication planes of distributed LLM inference
serving (control: etcd; event: NATS and JetStream; data: TCP and shared memory)
as an event-sourced actor system.

Start the whole system on this machine with:  triplane up`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q", args[0])}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	config.EnumVar(pf, &g.logFormat, "log-format", "text", logging.Formats, "log format")
	config.EnumVar(pf, &g.logLevel, "log-level", "info", logging.Levels, "lowest level logged")
	root.AddCommand(newVersionCmd(), newUpCmd(g), newReplayCmd(g), newJournalCmd(g))
	root.AddCommand(newBenchCmd(g), newNodeCmd(g), newSimCmd(g))
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "triplane %s\n", buildVersion())
			return nil
		},
	}
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments, got %q", cmd.CommandPath(), args)}
	}
	return nil
}

// resolve applies env variables and the config file to cmd's flags.
func resolve(cmd *cobra.Command, skip ...string) (*config.Resolved, error) {
	opts := config.Options{Skip: skip}
	// Only a command with a --config flag reads a config file (or
	// TRIPLANE_CONFIG): one meant for `up` must not change a benchmark.
	if cmd.Flags().Lookup("config") != nil {
		opts.FileFlag = "config"
	}
	r, err := config.Resolve(cmd.Flags(), opts)
	if err != nil {
		return nil, usageError{err}
	}
	return r, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "triplane: %v\n", err)
	var ue usageError
	if errors.As(err, &ue) || errors.Is(err, pflag.ErrHelp) {
		fmt.Fprintln(stderr, "Run 'triplane --help' or 'triplane <command> --help' for usage.")
		return exitUsage
	}
	return exitError
}

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
