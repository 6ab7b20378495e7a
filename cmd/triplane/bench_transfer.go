package main

import (
	"errors"

	"github.com/spf13/cobra"
)

func newBenchTransferCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:    "transfer",
		Short:  "Data plane transfer benchmarks (issue 6, in progress)",
		Hidden: true,
		Args:   noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return errors.New("not implemented yet")
		},
	}
}
