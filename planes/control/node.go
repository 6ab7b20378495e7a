package control

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/journal"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// DefaultGroup is the placement group nodes join when none is named.
const DefaultGroup = "default"

// NodeConfig configures a node's part in the control plane.
type NodeConfig struct {
	Client    *clientv3.Client
	Namespace string
	Info      *triplanev1.NodeInfo
	TTL       time.Duration
	// Groups are the placement groups the node joins (default: "default").
	Groups []string
	// Host, Journal, Snapshots and Registry run the placement actor and
	// the actors placed here.
	Host       *actors.Host
	Journal    *journal.Journal
	Snapshots  *journal.Snapshots
	Registry   *actors.Registry
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Node is one node's part in the control plane: its registration, and its
// placement in every group it joined.
type Node struct {
	Registrar  *Registrar
	Hoster     *JournalHoster
	Placements map[string]*Placement
	Metrics    *Metrics
}

// StartNode registers the node and joins its placement groups.
func StartNode(ctx context.Context, cfg NodeConfig) (_ *Node, err error) {
	if len(cfg.Groups) == 0 {
		cfg.Groups = []string{DefaultGroup}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := NewMetrics(cfg.Registerer)
	n := &Node{Metrics: m, Placements: map[string]*Placement{}}
	defer func() {
		if err != nil {
			// Cleanup of a failed start: bounded even when ctx has no
			// deadline left, or etcd is what failed.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			_ = n.Close(cctx)
			cancel()
		}
	}()
	n.Registrar, err = StartRegistrar(ctx, RegistrarConfig{Client: cfg.Client, Namespace: cfg.Namespace, Node: cfg.Info,
		PlacementGroups: cfg.Groups, TTL: cfg.TTL, Logger: cfg.Logger, Metrics: m})
	if err != nil {
		return nil, err
	}
	if cfg.Journal != nil && cfg.Registry != nil {
		n.Hoster = &JournalHoster{Journal: cfg.Journal, Snapshots: cfg.Snapshots, Registry: cfg.Registry, Logger: cfg.Logger}
	}
	for _, g := range cfg.Groups {
		pc := PlacementConfig{Registrar: n.Registrar, Group: g, Host: cfg.Host, Logger: cfg.Logger, Metrics: m}
		if n.Hoster != nil {
			pc.Hoster = n.Hoster
		}
		p, err := StartPlacement(pc)
		if err != nil {
			return nil, err
		}
		n.Placements[g] = p
	}
	return n, nil
}

// Close leaves the placement groups and revokes the lease.
func (n *Node) Close(ctx context.Context) error {
	for _, p := range n.Placements {
		p.Close(ctx)
	}
	if n.Registrar != nil {
		return n.Registrar.Close(ctx)
	}
	return errors.Join()
}
