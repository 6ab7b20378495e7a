// Package admin serves a node's operational HTTP endpoints: /healthz (the
// process is alive), /readyz (every dependency answers through a real client)
// and /metrics (Prometheus text format).
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultAddr is where `triplane up` serves the admin endpoints.
const DefaultAddr = "127.0.0.1:9091"

// Check reports whether one dependency is ready. It must honour ctx.
type Check func(ctx context.Context) error

// Server is the admin HTTP server.
type Server struct {
	Registry *prometheus.Registry

	log      *slog.Logger
	mu       sync.Mutex
	checks   map[string]Check
	ln       net.Listener
	srv      *http.Server
	done     chan error
	checkDur time.Duration
}

// New creates a server with its own Prometheus registry for the node's
// metrics. Pass prometheus.DefaultGatherer to Serve for the Go runtime,
// process and embedded etcd metrics, which live in the default registry.
func New(log *slog.Logger) *Server {
	reg := prometheus.NewRegistry()
	return &Server{Registry: reg, log: log, checks: map[string]Check{}, checkDur: 2 * time.Second}
}

// AddCheck registers a readiness check under name.
func (s *Server) AddCheck(name string, c Check) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.checks[name] = c
}

// Handler returns the mux serving the admin endpoints. extra gatherers (for
// example prometheus.DefaultGatherer, where the embedded etcd registers its
// metrics) are merged into /metrics.
func (s *Server) Handler(extra ...prometheus.Gatherer) http.Handler {
	gs := prometheus.Gatherers{s.Registry}
	gs = append(gs, extra...)
	routes := []struct {
		path string
		h    http.Handler
	}{
		{"/healthz", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			fmt.Fprintln(w, "ok")
		})},
		{"/readyz", http.HandlerFunc(s.readyz)},
		{"/metrics", promhttp.HandlerFor(gs, promhttp.HandlerOpts{ErrorLog: slogErrorLog{s.log}})},
	}
	mux := http.NewServeMux()
	paths := make([]string, len(routes))
	for i, rt := range routes {
		mux.Handle("GET "+rt.path, rt.h)
		paths[i] = rt.path
	}
	notFound := "not found; try " + strings.Join(paths, ", ")
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if slices.Contains(paths, r.URL.Path) {
			// The path exists; the method does not (the catch-all would
			// otherwise answer 404 for a POST).
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, fmt.Sprintf("%s %s: only GET (or HEAD)", r.Method, r.URL.Path), http.StatusMethodNotAllowed)
			return
		}
		http.Error(w, notFound, http.StatusNotFound)
	})
	return mux
}

type checkResult struct {
	Status string `json:"status"`
	Error  string `json:"error,omitempty"`
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	names := make([]string, 0, len(s.checks))
	for n := range s.checks {
		names = append(names, n)
	}
	checks := make(map[string]Check, len(s.checks))
	for n, c := range s.checks {
		checks[n] = c
	}
	s.mu.Unlock()
	sort.Strings(names)

	ctx, cancel := context.WithTimeout(r.Context(), s.checkDur)
	defer cancel()
	results := make(map[string]checkResult, len(names))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range names {
		wg.Go(func() {
			res := checkResult{Status: "ok"}
			if err := checks[n](ctx); err != nil {
				res = checkResult{Status: "failing", Error: err.Error()}
			}
			mu.Lock()
			results[n] = res
			mu.Unlock()
		})
	}
	wg.Wait()
	code := http.StatusOK
	for _, res := range results {
		if res.Status != "ok" {
			code = http.StatusServiceUnavailable
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{"ready": code == http.StatusOK, "checks": results})
}

// Listen binds addr. It is separate from Serve so a busy port is reported
// before anything else starts.
func (s *Server) Listen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	s.ln = ln
	return nil
}

// Addr is the bound address, once Listen succeeded.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Serve serves in the background until Shutdown.
func (s *Server) Serve(extra ...prometheus.Gatherer) {
	s.srv = &http.Server{Handler: s.Handler(extra...), ReadHeaderTimeout: 10 * time.Second}
	s.done = make(chan error, 1)
	go func() {
		err := s.srv.Serve(s.ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		s.done <- err
	}()
}

// Shutdown stops the server, waiting for in-flight requests until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.srv == nil {
		if s.ln != nil {
			return s.ln.Close()
		}
		return nil
	}
	err := s.srv.Shutdown(ctx)
	if serr := <-s.done; err == nil {
		err = serr
	}
	return err
}

type slogErrorLog struct{ l *slog.Logger }

func (e slogErrorLog) Println(v ...any) { e.l.Error("metrics", "err", fmt.Sprint(v...)) }
