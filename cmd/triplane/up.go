package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
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

// stopTimeout bounds a clean stop after SIGINT/SIGTERM.
const stopTimeout = 10 * time.Second

type upFlags struct {
	dataDir      string
	host         string
	natsPort     int
	etcdPort     int
	etcdPeerPort int
	adminAddr    string
	natsURL      string
	etcd         []string
	jsSync       string
	snapEvery    uint64
	replicas     int
	namespace    string
	leaseTTL     time.Duration
	configFile   string
	printConfig  bool
}

func defaultDataDir() string {
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".triplane")
	}
	return ".triplane"
}

func newUpCmd(g *globalFlags) *cobra.Command {
	f := &upFlags{}
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run the whole system on this machine (embedded NATS and etcd)",
		Long: `Run the whole Triplane system in this process: an embedded NATS server with
JetStream and an embedded etcd, both on loopback with their data under
--data-dir, and the admin endpoints /healthz, /readyz and /metrics on
--admin-addr. With --nats or --etcd it joins external servers instead of
embedding them.

Settings come from flags, then TRIPLANE_<FLAG> environment variables (for
example TRIPLANE_NATS_PORT), then the YAML file given by --config, whose keys
are the flag names. --print-config shows the result and exits.

Stop with Ctrl-C or SIGTERM: everything stops cleanly within 10 seconds, and a
restart on the same data dir finds its streams and keys again.`,
		Example: `  triplane up
  triplane up --data-dir /tmp/tp --admin-addr 127.0.0.1:0
  triplane up --nats nats://10.0.0.5:4222 --etcd http://10.0.0.6:2379,http://10.0.0.7:2379
  TRIPLANE_LOG_FORMAT=json triplane up --config triplane.yaml --print-config`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := resolve(cmd, "print-config")
			if err != nil {
				return err
			}
			if err := f.validate(); err != nil {
				return usageError{err}
			}
			if f.printConfig {
				fmt.Fprint(cmd.OutOrStdout(), r.YAML())
				return nil
			}
			return runUp(cmd, g, f)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.dataDir, "data-dir", defaultDataDir(), "directory for the node's data: JetStream store, etcd data, snapshots, lock file")
	fs.StringVar(&f.host, "host", "127.0.0.1", "host the embedded NATS and etcd listen on")
	fs.IntVar(&f.natsPort, "nats-port", 4222, "port of the embedded NATS server (0: any free port)")
	fs.IntVar(&f.etcdPort, "etcd-port", 2379, "client port of the embedded etcd (0: any free port)")
	fs.IntVar(&f.etcdPeerPort, "etcd-peer-port", 2380, "peer port of the embedded etcd (0: any free port)")
	fs.StringVar(&f.adminAddr, "admin-addr", admin.DefaultAddr, "address of the admin HTTP server: /healthz, /readyz, /metrics (port 0: any free port)")
	fs.StringVar(&f.natsURL, "nats", "", "URL of an external NATS server with JetStream; when set, NATS is not embedded")
	fs.StringSliceVar(&f.etcd, "etcd", nil, "comma-separated URLs of an external etcd cluster; when set, etcd is not embedded")
	config.EnumVar(fs, &f.jsSync, "jetstream-sync", "always", []string{"always", "interval"},
		"when the embedded JetStream fsyncs: always = before acknowledging each write (no acknowledged event lost even if the machine dies), interval = every 2 minutes (faster; a machine crash can lose the last ones)")
	fs.Uint64Var(&f.snapEvery, "snapshot-every", 1000, "events between an actor's snapshots (Pebble, under --data-dir)")
	fs.StringVar(&f.namespace, "namespace", "default", "namespace of the deployment's control-plane keys in etcd")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", control.DefaultTTL, "TTL of the node's etcd lease (whole seconds, at least 1s); keepalive every TTL/3")
	fs.IntVar(&f.replicas, "journal-replicas", 1, "replicas of the journal stream (for a clustered external NATS)")
	fs.StringVar(&f.configFile, "config", "", "YAML file of settings, keyed by flag name (env TRIPLANE_CONFIG)")
	fs.BoolVar(&f.printConfig, "print-config", false, "print the effective configuration as YAML and exit")
	return cmd
}

func (f *upFlags) validate() error {
	var errs []error
	for _, p := range []struct {
		name string
		v    int
	}{{"nats-port", f.natsPort}, {"etcd-port", f.etcdPort}, {"etcd-peer-port", f.etcdPeerPort}} {
		if p.v < 0 || p.v > 65535 {
			errs = append(errs, &config.Error{Key: p.name, Err: fmt.Errorf("port %d is outside 0-65535", p.v)})
		}
	}
	if f.etcdPort != 0 && f.etcdPort == f.etcdPeerPort {
		errs = append(errs, &config.Error{Key: "etcd-peer-port", Err: fmt.Errorf("must differ from etcd-port (both %d)", f.etcdPort)})
	}
	if _, _, err := net.SplitHostPort(f.adminAddr); err != nil {
		errs = append(errs, &config.Error{Key: "admin-addr", Err: fmt.Errorf("want host:port: %w", err)})
	}
	if f.leaseTTL < time.Second {
		errs = append(errs, &config.Error{Key: "lease-ttl", Err: fmt.Errorf("%s is below etcd's 1s granularity", f.leaseTTL)})
	}
	if err := control.CheckName("namespace", f.namespace); err != nil {
		errs = append(errs, &config.Error{Key: "namespace", Err: err})
	}
	if f.snapEvery == 0 {
		errs = append(errs, &config.Error{Key: "snapshot-every", Err: errors.New("must be at least 1")})
	}
	if f.replicas < 1 || f.replicas > 5 {
		errs = append(errs, &config.Error{Key: "journal-replicas", Err: fmt.Errorf("%d is outside 1-5", f.replicas)})
	}
	if strings.TrimSpace(f.dataDir) == "" {
		errs = append(errs, &config.Error{Key: "data-dir", Err: errors.New("must not be empty")})
	}
	if f.natsURL != "" {
		if err := checkURL(f.natsURL, "nats", "tls", "ws", "wss"); err != nil {
			errs = append(errs, &config.Error{Key: "nats", Err: err})
		}
	}
	for _, e := range f.etcd {
		if err := checkURL(e, "http", "https"); err != nil {
			errs = append(errs, &config.Error{Key: "etcd", Err: err})
		}
	}
	return errors.Join(errs...)
}

func checkURL(s string, schemes ...string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("bad URL %q: %w", s, err)
	}
	for _, sc := range schemes {
		if u.Scheme == sc && u.Host != "" {
			return nil
		}
	}
	return fmt.Errorf("bad URL %q: want %s://host:port (schemes: %s)", s, schemes[0], strings.Join(schemes, ", "))
}

func runUp(cmd *cobra.Command, g *globalFlags, f *upFlags) error {
	log, err := logging.New(cmd.ErrOrStderr(), g.logFormat, g.logLevel)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	sys, err := system.Start(ctx, system.Config{
		DataDir: f.dataDir, Host: f.host,
		NATSPort: f.natsPort, EtcdPort: f.etcdPort, EtcdPeerPort: f.etcdPeerPort,
		AdminAddr: f.adminAddr, NATSURL: f.natsURL, EtcdEndpoints: f.etcd,
		JetStreamSyncAlways: f.jsSync == "always",
		Journal:             journal.Config{Replicas: f.replicas},
		SnapshotEvery:       f.snapEvery,
		Namespace:           f.namespace,
		LeaseTTL:            f.leaseTTL,
		Version:             buildVersion(), Logger: log,
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), sys.Summary())

	<-ctx.Done()
	stop() // a second Ctrl-C kills the process the default way
	log.Info("stopping", "reason", context.Cause(ctx), "timeout", stopTimeout)
	t0 := time.Now()
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := sys.Close(sctx); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	log.Info("stopped", "took", time.Since(t0).Round(time.Millisecond))
	return nil
}
