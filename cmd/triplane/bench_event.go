package main

import (
	"errors"

	"github.com/spf13/cobra"
)

func newBenchEventCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:    "event",
		Short:  "Event plane benchmarks (issue 5, in progress)",
		Hidden: true,
		Args:   noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return errors.New("not implemented yet")
		},
	}
}
