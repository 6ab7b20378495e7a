// Package databench measures the data plane for `triplane bench transfer`:
// GB/s of block moves over TCP (one lane and several) and shared memory,
// each beside a baseline measured in the same run (a plain Go TCP stream of
// 1 MiB writes, iperf3 -l 1M when installed, and copy of the same bytes),
// and small-block latency.
package databench

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/triplane-dev/triplane/planes/data"
)

// Config sizes the benchmark.
type Config struct {
	// BlockSizes to measure, in bytes.
	BlockSizes []int
	// Bytes moved per measurement.
	Bytes int64
	// RegionBytes bounds the source and destination regions; transfers
	// cycle over them.
	RegionBytes int
	// Lanes of the multi-lane TCP runs.
	Lanes int
	// Rounds repeats every measurement and its baseline; medians reported.
	Rounds int
	// LatencySamples of the small-block latency runs; LatencyBlock is their
	// block size.
	LatencySamples, LatencyBlock int
	// Iperf runs iperf3 -l 1M as a further baseline when it is installed.
	Iperf bool
	// Progress, when set, gets a line per measurement.
	Progress io.Writer
}

// Row is one throughput line.
type Row struct {
	What      string
	Block     int
	GBps      float64
	Baseline  string
	BaseGBps  float64
	Ratio     float64
	Goal      float64 // ratio wanted, 0 if none
	GoalOf    string
	GoalRatio float64
	// Cores is the process's CPU time over the wall time of the
	// measurement (both ends run in this process): a line at the
	// machine's core count is CPU-bound, and more lanes cannot help it.
	Cores float64
}

// Latency is one latency line.
type Latency struct {
	What     string
	Block    int
	P50, P99 time.Duration
}

// Report is the whole result.
type Report struct {
	Rows      []Row
	Latencies []Latency
	Notes     []string
}

// Run measures everything in cfg.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Rounds <= 0 || cfg.Bytes <= 0 || cfg.RegionBytes <= 0 || cfg.Lanes < 2 || len(cfg.BlockSizes) == 0 {
		return nil, errors.New("databench: rounds, bytes, region bytes must be positive, lanes at least 2, and at least one block size")
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	rep := &Report{}
	dir, err := os.MkdirTemp("", "triplane-bench-transfer-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	if cfg.Iperf {
		if g, err := iperf(ctx); err == nil {
			rep.Rows = append(rep.Rows, Row{What: "iperf3 -l 1M (baseline)", Block: 1 << 20, GBps: g})
			fmt.Fprintf(cfg.Progress, "iperf3 -l 1M: %.2f GB/s\n", g)
		} else {
			rep.Notes = append(rep.Notes, "iperf3 baseline skipped: "+err.Error())
		}
	}
	for _, bs := range cfg.BlockSizes {
		blocks := max(1, cfg.RegionBytes/bs)
		recv, err := data.NewSharedRegion(1, bs, blocks)
		if err != nil {
			return nil, err
		}
		src, err := data.NewRegion(2, bs, blocks)
		if err != nil {
			recv.Close()
			return nil, err
		}
		fillRandom(src.Bytes())
		rows, err := measureBlock(ctx, cfg, dir, bs, recv, src)
		recv.Close()
		if err != nil {
			return nil, fmt.Errorf("block size %d: %w", bs, err)
		}
		rep.Rows = append(rep.Rows, rows...)
	}
	lats, err := latencies(ctx, cfg, dir)
	if err != nil {
		return nil, fmt.Errorf("latency: %w", err)
	}
	rep.Latencies = lats
	return rep, nil
}

// measureBlock measures one block size. Every round runs the baselines
// (plain TCP stream, copy) next to the measured lines, so that a change in
// the machine's load moves both.
func measureBlock(ctx context.Context, cfg Config, dir string, bs int, recv, src *data.Region) ([]Row, error) {
	regions, _ := data.NewRegions(recv)
	tcp, err := data.ListenTCP("127.0.0.1:0", data.ServerConfig{Regions: regions})
	if err != nil {
		return nil, err
	}
	defer tcp.Close()
	shmVerify, err := data.ListenShm(filepath.Join(dir, "v.sock"), data.ServerConfig{Regions: regions}, false)
	if err != nil {
		return nil, err
	}
	defer shmVerify.Close()
	shmTrust, err := data.ListenShm(filepath.Join(dir, "t.sock"), data.ServerConfig{Regions: regions}, true)
	if err != nil {
		return nil, err
	}
	defer shmTrust.Close()

	ops := make([]data.Op, src.Blocks())
	for i := range ops {
		ops[i] = data.Op{Src: src.Block(i), Dst: recv.BlockDesc(i)}
	}
	run := func(prefer string, lanes int, skipVerify bool, sock string) (sample, error) {
		peer := data.Peer(regions, tcp, nil)
		peer.ShmSocket = sock
		tr, err := data.NewDialer(data.DialOptions{Prefer: prefer, Lanes: lanes, SkipShmVerify: skipVerify}).Dial(ctx, peer)
		if err != nil {
			return sample{}, err
		}
		defer tr.Close()
		return throughput(cfg.Bytes, int64(len(src.Bytes())), func() error { return tr.Write(ctx, ops) })
	}
	memcpy := func() (sample, error) {
		dst := recv.Bytes()
		return throughput(cfg.Bytes, int64(len(src.Bytes())), func() error {
			for i := range ops {
				copy(dst[i*bs:(i+1)*bs], src.Block(i))
			}
			return nil
		})
	}
	var plain, plainRegions, one, many, shmV, shmT, mc []sample
	for r := 0; r < cfg.Rounds; r++ {
		for _, m := range []struct {
			into *[]sample
			f    func() (sample, error)
		}{
			{&plain, func() (sample, error) { return plainStream(ctx, cfg.Bytes, nil, nil) }},
			{&plainRegions, func() (sample, error) { return plainStream(ctx, cfg.Bytes, src.Bytes(), recv.Bytes()) }},
			{&mc, memcpy},
			{&one, func() (sample, error) { return run("tcp", 1, false, "") }},
			{&many, func() (sample, error) { return run("tcp", cfg.Lanes, false, "") }},
			{&shmV, func() (sample, error) { return run("shm", 0, false, shmVerify.Path()) }},
			{&shmT, func() (sample, error) { return run("shm", 0, true, shmTrust.Path()) }},
		} {
			g, err := m.f()
			if err != nil {
				return nil, err
			}
			*m.into = append(*m.into, g)
		}
	}
	stream, streamR, o, mn, sv, st, c := medianOf(plain), medianOf(plainRegions), medianOf(one), medianOf(many), medianOf(shmV), medianOf(shmT), medianOf(mc)
	fmt.Fprintf(cfg.Progress, "block %s: plain stream %.2f, tcp 1 lane %.2f, tcp %d lanes %.2f, shm %.2f (verified) %.2f (trusted), copy %.2f GB/s\n",
		size(bs), stream.gbps, o.gbps, cfg.Lanes, mn.gbps, sv.gbps, st.gbps, c.gbps)
	streamName := "plain Go TCP stream"
	row := func(what string, s sample) Row { return Row{What: what, Block: bs, GBps: s.gbps, Cores: s.cores} }
	vs := func(r Row, name string, base sample, goal float64) Row {
		r.Baseline, r.BaseGBps, r.Ratio, r.Goal = name, base.gbps, r.GBps/base.gbps, goal
		return r
	}
	lanes := vs(row(fmt.Sprintf("tcp, %d lanes", cfg.Lanes), mn), streamName, stream, 1.3)
	lanes.GoalOf, lanes.GoalRatio = "tcp, 1 lane", mn.gbps/o.gbps
	return []Row{
		row("plain Go TCP stream, 1 MiB writes (baseline)", stream),
		vs(row("tcp, 1 lane", o), streamName, stream, 0.9),
		lanes,
		row("plain Go TCP stream, region to region (like-for-like baseline)", streamR),
		vs(row("tcp, 1 lane vs the region-to-region stream", o), "region-to-region stream", streamR, 0),
		row("copy (memcpy baseline)", c),
		vs(row("shm, receiver verifies CRC", sv), "copy", c, 0.5),
		vs(row("shm, no receiver CRC", st), "copy", c, 0.5),
	}, nil
}

// sample is one measurement: throughput, and the cores the process kept
// busy meanwhile.
type sample struct{ gbps, cores float64 }

// medianOf is the round with the median throughput (its cores with it).
func medianOf(xs []sample) sample {
	xs = slices.Clone(xs)
	slices.SortFunc(xs, func(a, b sample) int { return cmp.Compare(a.gbps, b.gbps) })
	return xs[len(xs)/2]
}

// clock reads the wall clock and the process's CPU time (user and system,
// every thread).
type clock struct {
	wall time.Time
	cpu  time.Duration
}

func now() clock {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return clock{wall: time.Now(), cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano())}
}

// since turns bytes moved since c into a sample.
func (c clock) since(bytes int64) sample {
	e := now()
	wall := e.wall.Sub(c.wall).Seconds()
	return sample{gbps: float64(bytes) / wall / 1e9, cores: (e.cpu - c.cpu).Seconds() / wall}
}

// throughput calls pass (which moves per bytes) until total bytes moved,
// after one warm-up pass.
func throughput(total, per int64, pass func() error) (sample, error) {
	if err := pass(); err != nil {
		return sample{}, err
	}
	start := now()
	var moved int64
	for moved < total {
		if err := pass(); err != nil {
			return sample{}, err
		}
		moved += per
	}
	return start.since(moved), nil
}

// plainStream is the TCP baseline: one Go connection, 1 MiB writes, the
// reader reading 1 MiB at a time. With src and dst nil both sides reuse one
// cache-hot 1 MiB buffer (the baseline the issue names); given the regions,
// the writer walks src and the reader walks dst, so the baseline pays the
// same memory traffic as a transfer between the regions.
func plainStream(ctx context.Context, total int64, src, dst []byte) (sample, error) {
	const chunk = 1 << 20
	if src == nil {
		src = make([]byte, chunk)
		fillRandom(src)
	}
	if dst == nil {
		dst = make([]byte, chunk)
	}
	piece := func(b []byte, i int64) []byte {
		n := int64(len(b)) / chunk
		off := (i % n) * chunk
		return b[off : off+chunk]
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return sample{}, err
	}
	defer ln.Close()
	got := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		var n int64
		for i := int64(0); n < total+chunk; i++ {
			k, err := io.ReadFull(c, piece(dst, i))
			n += int64(k)
			if err != nil {
				got <- err
				return
			}
		}
		c.Write([]byte{1})
		got <- nil
	}()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return sample{}, err
	}
	defer c.Close()
	if _, err := c.Write(piece(src, 0)); err != nil { // warm-up
		return sample{}, err
	}
	start := now()
	var n int64
	for i := int64(1); n < total; i++ {
		if _, err := c.Write(piece(src, i)); err != nil {
			return sample{}, err
		}
		n += chunk
	}
	// Wait until the reader has it all, like a transfer waits for acks.
	one := make([]byte, 1)
	if _, err := io.ReadFull(c, one); err != nil {
		return sample{}, err
	}
	res := start.since(n)
	if err := <-got; err != nil {
		return sample{}, err
	}
	return res, nil
}

// iperf runs iperf3 -l 1M over loopback for 3 s.
func iperf(ctx context.Context) (float64, error) {
	bin, err := exec.LookPath("iperf3")
	if err != nil {
		return 0, errors.New("iperf3 not installed")
	}
	port := strconv.Itoa(20000 + rand.IntN(20000))
	srv := exec.CommandContext(ctx, bin, "-s", "-1", "-p", port)
	if err := srv.Start(); err != nil {
		return 0, err
	}
	defer srv.Wait()
	defer srv.Process.Kill()
	var out []byte
	for i := 0; i < 50; i++ {
		out, err = exec.CommandContext(ctx, bin, "-c", "127.0.0.1", "-p", port, "-l", "1M", "-t", "3", "-J").Output()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond) // the server is starting; nothing to wait on
	}
	if err != nil {
		return 0, fmt.Errorf("iperf3 client: %w", err)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	return res.End.SumReceived.BitsPerSecond / 8 / 1e9, nil
}

// latencies measures one small block per Write, one after another: TCP one
// lane, shm, and a plain TCP ping-pong of the same size as baseline.
func latencies(ctx context.Context, cfg Config, dir string) ([]Latency, error) {
	bs := cfg.LatencyBlock
	recv, err := data.NewSharedRegion(1, bs, 64)
	if err != nil {
		return nil, err
	}
	defer recv.Close()
	regions, _ := data.NewRegions(recv)
	tcp, err := data.ListenTCP("127.0.0.1:0", data.ServerConfig{Regions: regions})
	if err != nil {
		return nil, err
	}
	defer tcp.Close()
	shm, err := data.ListenShm(filepath.Join(dir, "lat.sock"), data.ServerConfig{Regions: regions}, false)
	if err != nil {
		return nil, err
	}
	defer shm.Close()
	src := make([]byte, bs)
	fillRandom(src)
	var out []Latency
	pp, err := pingPong(ctx, bs, cfg.LatencySamples)
	if err != nil {
		return nil, err
	}
	out = append(out, Latency{What: "plain Go TCP ping-pong (baseline)", Block: bs, P50: pp[0], P99: pp[1]})
	for _, prefer := range []string{"tcp", "shm"} {
		tr, err := data.NewDialer(data.DialOptions{Prefer: prefer, Lanes: 1}).Dial(ctx, data.Peer(regions, tcp, shm))
		if err != nil {
			return nil, err
		}
		var ds []time.Duration
		for i := 0; i < cfg.LatencySamples+100; i++ {
			start := time.Now()
			if err := tr.Write(ctx, []data.Op{{Src: src, Dst: recv.BlockDesc(i % 64)}}); err != nil {
				tr.Close()
				return nil, err
			}
			if i >= 100 {
				ds = append(ds, time.Since(start))
			}
		}
		tr.Close()
		p := pct(ds)
		out = append(out, Latency{What: prefer + ", one block per Write", Block: bs, P50: p[0], P99: p[1]})
	}
	return out, nil
}

func pingPong(ctx context.Context, bs, n int) ([2]time.Duration, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return [2]time.Duration{}, err
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, bs)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf[:data.HeaderSize]); err != nil {
				return
			}
		}
	}()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return [2]time.Duration{}, err
	}
	defer c.Close()
	buf := make([]byte, bs)
	var ds []time.Duration
	for i := 0; i < n+100; i++ {
		start := time.Now()
		if _, err := c.Write(buf); err != nil {
			return [2]time.Duration{}, err
		}
		if _, err := io.ReadFull(c, buf[:data.HeaderSize]); err != nil {
			return [2]time.Duration{}, err
		}
		if i >= 100 {
			ds = append(ds, time.Since(start))
		}
	}
	return pct(ds), nil
}

func pct(ds []time.Duration) [2]time.Duration {
	slices.Sort(ds)
	return [2]time.Duration{ds[len(ds)/2], ds[len(ds)*99/100]}
}

func fillRandom(b []byte) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for k := 0; k < 8; k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

func size(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// Print writes the report as aligned tables.
func Print(w io.Writer, title string, rep *Report) {
	fmt.Fprintf(w, "%s\n", title)
	fmt.Fprintf(w, "  %-46s %8s %9s %6s  %-34s %s\n", "what", "block", "GB/s", "cores", "vs baseline", "goal")
	for _, r := range rep.Rows {
		vs, goal := "", ""
		if r.Baseline != "" {
			vs = fmt.Sprintf("%.2fx of %s (%.2f)", r.Ratio, r.Baseline, r.BaseGBps)
		}
		switch {
		case r.GoalOf != "":
			goal = fmt.Sprintf("%.2fx of %s, goal >= %.1fx %s", r.GoalRatio, r.GoalOf, r.Goal, okString(r.GoalRatio >= r.Goal))
		case r.Goal > 0:
			goal = fmt.Sprintf("goal >= %.1fx %s", r.Goal, okString(r.Ratio >= r.Goal))
		}
		cores := "-"
		if r.Cores > 0 {
			cores = fmt.Sprintf("%.2f", r.Cores)
		}
		fmt.Fprintf(w, "  %-46s %8s %9.2f %6s  %-34s %s\n", r.What, size(r.Block), r.GBps, cores, vs, goal)
	}
	fmt.Fprintf(w, "  %-46s %8s %10s %10s\n", "latency, one block at a time", "block", "p50", "p99")
	for _, l := range rep.Latencies {
		fmt.Fprintf(w, "  %-46s %8s %10s %10s\n", l.What, size(l.Block), l.P50.Round(time.Microsecond/10), l.P99.Round(time.Microsecond/10))
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
}

func okString(ok bool) string {
	if ok {
		return "(met)"
	}
	return "(NOT met)"
}
