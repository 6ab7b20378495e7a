package transfer

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data"
)

// The receiving worker of TestReceiverProcessKilled runs as a re-exec of
// the test binary.
const (
	envRegion = "TRIPLANE_TEST_TRANSFER_REGION"
	envAddr   = "TRIPLANE_TEST_TRANSFER_ADDR"
	envStall  = "TRIPLANE_TEST_TRANSFER_STALL_AFTER"

	killBlockSize = 64 << 10
	killBlocks    = 256
)

func TestMain(m *testing.M) {
	if path := os.Getenv(envRegion); path != "" {
		if err := runReceiver(path, os.Getenv(envAddr), os.Getenv(envStall)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		return
	}
	os.Exit(m.Run())
}

// runReceiver serves a file-backed region until killed. With stall > 0 it
// stops acknowledging after that many landed frames and says so on stdout.
func runReceiver(path, addr, stall string) error {
	reg, err := data.OpenFileRegion(path, 9, killBlockSize, killBlocks)
	if err != nil {
		return err
	}
	regions, _ := data.NewRegions(reg)
	after, _ := strconv.Atoi(stall)
	var mu sync.Mutex
	n := 0
	srv, err := data.ListenTCP(addr, data.ServerConfig{Regions: regions, OnLanded: func(data.Landed) {
		mu.Lock()
		n++
		hit := n == after
		mu.Unlock()
		if hit {
			fmt.Println("stalled")
			select {} // hang: the process is killed here, mid-transfer
		}
	}})
	if err != nil {
		return err
	}
	fmt.Println("listening", srv.Addr())
	select {}
}

// receiverProc starts the receiving worker and returns it with its address.
func receiverProc(t *testing.T, path, addr string, stall int) (*exec.Cmd, string, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envRegion+"="+path, envAddr+"="+addr, envStall+"="+strconv.Itoa(stall))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "listening ") {
		t.Fatalf("receiver did not start: %q %v", sc.Text(), sc.Err())
	}
	return cmd, strings.TrimPrefix(sc.Text(), "listening "), sc
}

func TestReceiverProcessKilledWithSIGKILLResumes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newHost(t, ctx)
	path := filepath.Join(t.TempDir(), "region")
	proc, addr, out := receiverProc(t, path, "127.0.0.1:0", 100)

	src, _ := data.NewRegion(1, killBlockSize, killBlocks)
	for i, b := 0, src.Bytes(); i < len(b); i++ {
		b[i] = byte(i*13 + i/65537)
	}
	ops := make([]data.Op, killBlocks)
	for i := range ops {
		ops[i] = data.Op{Src: src.Block(i), Dst: data.Descriptor{Region: 9, Offset: uint64(i * killBlockSize), Length: killBlockSize}}
	}
	var mu sync.Mutex
	cur := addr
	// Up to 50 attempts with backoff capped at 200 ms: ~10 s for the new
	// process to come up even on a loaded machine.
	sup, err := NewSupervisor(Config{Host: h, Pacing: Pacing{RangeBlocks: 8, BackoffMin: 5 * time.Millisecond, BackoffMax: 200 * time.Millisecond},
		Dial: func(ctx context.Context) (data.Transport, error) {
			mu.Lock()
			a := cur
			mu.Unlock()
			return data.NewDialer(data.DialOptions{Prefer: "tcp", Lanes: 2, IOTimeout: 5 * time.Second}).Dial(ctx, &triplanev1.DataPeer{TcpAddr: a})
		}})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		st  *triplanev1.TransferState
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := sup.Run(ctx, Spec{ID: "sigkill-1", Blocks: ops, BlockSize: killBlockSize, MaxAttempts: 50})
		done <- result{st, err}
	}()
	if !out.Scan() || out.Text() != "stalled" {
		t.Fatalf("receiver did not stall: %q", out.Text())
	}
	before, err := sup.State(ctx, "sigkill-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	proc.Wait()
	// The worker comes back on the same address with the same region file.
	receiverProc(t, path, addr, 0)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.st.Status != triplanev1.TransferStatus_TRANSFER_STATUS_COMPLETED || r.st.Attempts == 0 {
		t.Fatalf("final state %v", r.st)
	}
	if before.Acked == 0 || before.Acked >= killBlocks {
		t.Fatalf("kill was not mid-transfer: %d blocks acknowledged before", before.Acked)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < killBlocks; i++ {
		if data.Checksum(got[i*killBlockSize:(i+1)*killBlockSize]) != data.Checksum(src.Block(i)) {
			t.Fatalf("block %d checksum differs after the restart", i)
		}
	}
	t.Logf("killed after %d blocks acknowledged; completed after %d failed attempts", before.Acked, r.st.Attempts)
}
