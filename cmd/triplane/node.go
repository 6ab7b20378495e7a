package main

import (
	"errors"

	"github.com/spf13/cobra"
)

func newNodeCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:    "node",
		Short:  "Join existing etcd and NATS as a node (issue 4, in progress)",
		Hidden: true,
		Args:   noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return errors.New("not implemented yet")
		},
	}
}
