package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/triplane-dev/triplane/admin"
	"github.com/triplane-dev/triplane/config"
	"github.com/triplane-dev/triplane/journal"
	"github.com/triplane-dev/triplane/logging"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/system"
)

type nodeFlags struct {
	dataDir    string
	adminAddr  string
	natsURL    string
	etcd       []string
	namespace  string
	leaseTTL   time.Duration
	groups     []string
	want       []string
	snapEvery  uint64
	replicas   int
	configFile string
}

func newNodeCmd(g *globalFlags) *cobra.Command {
	f := &nodeFlags{}
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Join existing etcd and NATS as a node: register, take part in placement, host actors",
		Long: `Run one Triplane node against an existing etcd cluster (--etcd) and an existing
NATS server with JetStream (--nats). The node registers itself in etcd on a
lease (--lease-ttl, keepalive every TTL/3; a lost lease is replaced and the
node registers again, it never exits for it), campaigns for the placement
leadership of its groups, and hosts the singleton actors placement gives it.
--want asks placement for actors (kind/id) to be hosted somewhere.

Stop with Ctrl-C or SIGTERM: the lease is revoked, so the node's
registrations disappear at once and its actors are placed elsewhere.`,
		Example: `  triplane node --etcd http://10.0.0.6:2379 --nats nats://10.0.0.5:4222 --data-dir /var/lib/triplane
  triplane node --etcd http://127.0.0.1:2379 --nats nats://127.0.0.1:4222 --want ledger/acct-1`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := resolve(cmd); err != nil {
				return err
			}
			if err := f.validate(); err != nil {
				return usageError{err}
			}
			return runNode(cmd, g, f)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.dataDir, "data-dir", defaultDataDir(), "directory for the node's id, snapshots and lock file")
	fs.StringVar(&f.adminAddr, "admin-addr", admin.DefaultAddr, "address of the admin HTTP server (port 0: any free port)")
	fs.StringVar(&f.natsURL, "nats", "", "URL of the NATS server with JetStream to join (required)")
	fs.StringSliceVar(&f.etcd, "etcd", nil, "comma-separated client URLs of the etcd cluster to join (required)")
	fs.StringVar(&f.namespace, "namespace", "default", "namespace of the deployment's control-plane keys")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", control.DefaultTTL, "TTL of the node's etcd lease (whole seconds, at least 1s)")
	fs.StringSliceVar(&f.groups, "placement-group", []string{control.DefaultGroup}, "placement groups the node joins")
	fs.StringSliceVar(&f.want, "want", nil, "singleton actors to ask placement to host: kind/id (in the first --placement-group) or group:kind/id")
	fs.Uint64Var(&f.snapEvery, "snapshot-every", 1000, "events between an actor's snapshots")
	fs.IntVar(&f.replicas, "journal-replicas", 1, "replicas of the journal stream")
	fs.StringVar(&f.configFile, "config", "", "YAML file of settings, keyed by flag name (env TRIPLANE_CONFIG)")
	return cmd
}

func (f *nodeFlags) validate() error {
	var errs []error
	if f.natsURL == "" {
		errs = append(errs, &config.Error{Key: "nats", Err: errors.New("required: the URL of the NATS server to join")})
	} else if err := checkURL(f.natsURL, "nats", "tls", "ws", "wss"); err != nil {
		errs = append(errs, &config.Error{Key: "nats", Err: err})
	}
	if len(f.etcd) == 0 {
		errs = append(errs, &config.Error{Key: "etcd", Err: errors.New("required: the client URLs of the etcd cluster to join")})
	}
	for _, e := range f.etcd {
		if err := checkURL(e, "http", "https"); err != nil {
			errs = append(errs, &config.Error{Key: "etcd", Err: err})
		}
	}
	if f.leaseTTL < time.Second {
		errs = append(errs, &config.Error{Key: "lease-ttl", Err: fmt.Errorf("%s is below etcd's 1s granularity", f.leaseTTL)})
	}
	if f.replicas < 1 || f.replicas > 5 {
		errs = append(errs, &config.Error{Key: "journal-replicas", Err: fmt.Errorf("%d is outside 1-5", f.replicas)})
	}
	if err := control.CheckName("namespace", f.namespace); err != nil {
		errs = append(errs, &config.Error{Key: "namespace", Err: err})
	}
	for _, g := range f.groups {
		if err := control.CheckName("placement group", g); err != nil {
			errs = append(errs, &config.Error{Key: "placement-group", Err: err})
		}
	}
	for _, w := range f.want {
		if _, _, _, err := system.ParseWant(w, f.groups); err != nil {
			errs = append(errs, &config.Error{Key: "want", Err: err})
		}
	}
	if f.snapEvery == 0 {
		errs = append(errs, &config.Error{Key: "snapshot-every", Err: errors.New("must be at least 1")})
	}
	if strings.TrimSpace(f.dataDir) == "" {
		errs = append(errs, &config.Error{Key: "data-dir", Err: errors.New("must not be empty")})
	}
	return errors.Join(errs...)
}

func runNode(cmd *cobra.Command, g *globalFlags, f *nodeFlags) error {
	log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sys, err := system.Start(ctx, system.Config{
		DataDir: f.dataDir, AdminAddr: f.adminAddr, NATSURL: f.natsURL, EtcdEndpoints: f.etcd,
		Journal: journal.Config{Replicas: f.replicas}, SnapshotEvery: f.snapEvery,
		Namespace: f.namespace, LeaseTTL: f.leaseTTL, PlacementGroups: f.groups, Want: f.want,
		Version: buildVersion(), Logger: log,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "triplane node %s is up: nats=%s etcd=%s admin=http://%s namespace=%s groups=%s; stop with Ctrl-C or SIGTERM\n",
		sys.NodeID, sys.NATSURL, strings.Join(sys.EtcdURLs, ","), sys.Admin.Addr(), f.namespace, strings.Join(f.groups, ","))
	<-ctx.Done()
	stop()
	log.Info("stopping", "reason", context.Cause(ctx), "timeout", stopTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := sys.Close(sctx); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	return nil
}
