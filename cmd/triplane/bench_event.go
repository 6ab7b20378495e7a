package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/logging"
	"github.com/triplane-dev/triplane/planes/event/eventbench"
)

func newBenchEventCmd(g *globalFlags) *cobra.Command {
	var cfg eventbench.Config
	cmd := &cobra.Command{
		Use:   "event",
		Short: "Event plane throughput and latency against raw nats.go",
		Long: `Starts an embedded NATS server with JetStream in a temporary directory and
measures, in one run, each against its baseline:
  - pub/sub messages/s through the typed API against raw nats.go with the
    same protobuf payloads (and against raw bytes with no protobuf at all),
  - request-reply round trip p50/p99, typed against raw,
  - work-queue consume+ack throughput, typed against raw jetstream,
  - KV event ingestion into a consumer: core NATS with gap repair (without
    and with 5% of the batches dropped) against a JetStream stream read by
    an ordered consumer.`,
		Example: `  triplane bench event
  triplane bench event --messages 1000000 --rounds 5`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			if cfg.Messages <= 0 || cfg.Requests <= 0 || cfg.Jobs <= 0 || cfg.KvEvents <= 0 || cfg.Rounds <= 0 || cfg.PayloadSize < 0 {
				return usageError{fmt.Errorf("--messages, --requests, --jobs, --kv-events and --rounds must be positive, --payload not negative")}
			}
			for _, o := range cfg.Only {
				if o != "pubsub" && o != "request" && o != "queue" && o != "kv" {
					return usageError{fmt.Errorf("--only: %q is not pubsub, request, queue or kv", o)}
				}
			}
			log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
			if err != nil {
				return usageError{err}
			}
			cfg.Logger = log
			fmt.Fprintln(cmd.ErrOrStderr(), "event plane:")
			r, err := eventbench.Run(cmd.Context(), cfg, cmd.ErrOrStderr())
			if err != nil {
				return fmt.Errorf("bench event: %w", err)
			}
			r.Print(cmd.OutOrStdout(), fmt.Sprintf("event plane (%s)", strings.Join(os.Args[1:], " ")))
			return nil
		},
	}
	fs := cmd.Flags()
	fs.IntVar(&cfg.Messages, "messages", 300_000, "pub/sub messages per run")
	fs.IntVar(&cfg.PayloadSize, "payload", 64, "bytes in the probe message's body (the encoded probe is about 20 bytes more)")
	fs.IntVar(&cfg.Requests, "requests", 5000, "request-reply round trips per run")
	fs.IntVar(&cfg.Jobs, "jobs", 50_000, "work-queue jobs per run")
	fs.IntVar(&cfg.KvEvents, "kv-events", 100_000, "KV events per run")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "repetitions of every run with its baseline; the median is reported")
	fs.StringSliceVar(&cfg.Only, "only", nil, "run only these parts: pubsub, request, queue, kv (default all)")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for the server store (default: a temporary one, removed after)")
	return cmd
}
