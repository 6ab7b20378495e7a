package control_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/triplane-dev/triplane/embedded"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

func client(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func nodeInfo(id string) *triplanev1.NodeInfo {
	return &triplanev1.NodeInfo{Identity: &triplanev1.NodeIdentity{NodeId: id, Namespace: "test"}}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// proxy forwards TCP to target; Block cuts every connection and refuses
// new ones, as a network partition would.
type proxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	blocked bool
	conns   map[net.Conn]bool
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	t.Cleanup(func() { ln.Close(); p.Block() })
	go p.serve()
	return p
}

func (p *proxy) URL() string { return "http://" + p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.blocked {
			p.mu.Unlock()
			c.Close()
			continue
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c], p.conns[u] = true, true
		p.mu.Unlock()
		go func() { _, _ = io.Copy(u, c); u.Close(); c.Close() }()
		go func() { _, _ = io.Copy(c, u); u.Close(); c.Close() }()
	}
}

func (p *proxy) Block() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

func (p *proxy) Unblock() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = false
}

// cluster starts n embedded etcd members forming one cluster, with fast
// raft timers. It returns the members and their client URLs.
func cluster(t *testing.T, n int) ([]*embed.Etcd, []string) {
	t.Helper()
	// The ports are free when picked, not always when bound (another
	// process, or an outgoing connection's ephemeral port, may take one in
	// between): then the cluster starts again on new ones.
	for attempt := 1; ; attempt++ {
		members, urls, err := tryCluster(t, n)
		if err == nil {
			return members, urls
		}
		if attempt == 3 || !errors.Is(err, syscall.EADDRINUSE) {
			t.Fatal(err)
		}
		t.Logf("cluster start: %v; again on other ports", err)
	}
}

func tryCluster(t *testing.T, n int) ([]*embed.Etcd, []string, error) {
	dir := t.TempDir()
	type ports struct{ client, peer int }
	ps := make([]ports, n)
	var initial []string
	for i := range ps {
		var err error
		if ps[i].client, err = embedded.FreePort("127.0.0.1"); err != nil {
			return nil, nil, err
		}
		if ps[i].peer, err = embedded.FreePort("127.0.0.1"); err != nil {
			return nil, nil, err
		}
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i, ps[i].peer))
	}
	members := make([]*embed.Etcd, n)
	urls := make([]string, n)
	errs := make(chan error, n)
	for i := range ps {
		cu := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(ps[i].client)}
		pu := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(ps[i].peer)}
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = filepath.Join(dir, cfg.Name)
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "triplane-test"
		cfg.TickMs, cfg.ElectionMs = 20, 200
		cfg.Logger = "zap"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		urls[i] = cu.String()
		go func(i int) {
			e, err := embed.StartEtcd(cfg)
			if err != nil {
				errs <- err
				return
			}
			members[i] = e
			select {
			case <-e.Server.ReadyNotify():
				errs <- nil
			case <-time.After(30 * time.Second):
				errs <- fmt.Errorf("member %d not ready", i)
			}
		}(i)
	}
	var err error
	for range n {
		err = errors.Join(err, <-errs)
	}
	closeAll := func() {
		for _, m := range members {
			if m != nil {
				m.Close()
			}
		}
	}
	if err != nil {
		closeAll()
		return nil, nil, err
	}
	t.Cleanup(closeAll)
	return members, urls, nil
}
