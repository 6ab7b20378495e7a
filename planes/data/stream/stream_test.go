package stream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// tokens produces n frames "tok-i"; with n < 0 it runs until cancelled.
type producer struct {
	stopped chan error
}

func (p *producer) handle(ctx context.Context, open *triplanev1.StreamOpen, send func([]byte) error) (string, error) {
	var n int
	fmt.Sscanf(string(open.Payload), "%d", &n)
	if string(open.Payload) == "fail" {
		send([]byte("partial"))
		return "", errors.New("engine exploded")
	}
	for i := 0; n < 0 || i < n; i++ {
		if err := send([]byte(fmt.Sprintf("tok-%d", i))); err != nil {
			p.stopped <- err
			return "", err
		}
		if n < 0 {
			select {
			case <-ctx.Done():
				p.stopped <- context.Cause(ctx)
				return "", ctx.Err()
			case <-time.After(time.Millisecond): // a token every millisecond, like an engine
			}
		}
	}
	return "stop", nil
}

func start(t *testing.T, token string) (*Server, *producer) {
	p := &producer{stopped: make(chan error, 4)}
	s, err := Listen("127.0.0.1:0", ServerConfig{Handler: p.handle, Token: token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, p
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOrderedFramesAndFinalReason(t *testing.T) {
	ctx := ctxT(t)
	s, _ := start(t, "")
	st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r1", Payload: []byte("100")}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		f, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if f.Final || string(f.Data) != fmt.Sprintf("tok-%d", i) || f.Seq != uint64(i+1) {
			t.Fatalf("frame %d: %v", i, f)
		}
	}
	f, err := st.Recv()
	if err != nil || !f.Final || f.Reason != "stop" || f.Error != "" {
		t.Fatalf("final: %v %v", f, err)
	}
	if _, err := st.Recv(); err != io.EOF {
		t.Fatalf("after final: %v", err)
	}
}

func TestHandlerErrorEndsWithErrorFrame(t *testing.T) {
	ctx := ctxT(t)
	s, _ := start(t, "")
	st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r2", Payload: []byte("fail")}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if f, err := st.Recv(); err != nil || string(f.Data) != "partial" {
		t.Fatalf("%v %v", f, err)
	}
	f, err := st.Recv()
	if err != nil || !f.Final || f.Error != "engine exploded" {
		t.Fatalf("final: %v %v", f, err)
	}
}

func TestClientGoingAwayStopsProducer(t *testing.T) {
	for _, how := range []string{"close", "context"} {
		t.Run(how, func(t *testing.T) {
			ctx := ctxT(t)
			s, p := start(t, "")
			sctx, cancel := context.WithCancel(ctx)
			st, err := Open(sctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r3", Payload: []byte("-1")}, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				if _, err := st.Recv(); err != nil {
					t.Fatal(err)
				}
			}
			if how == "close" {
				st.Close()
			} else {
				cancel()
			}
			select {
			case err := <-p.stopped:
				if !strings.Contains(err.Error(), "frontend") {
					t.Fatalf("producer stopped with %v", err)
				}
			case <-ctx.Done():
				t.Fatal("producer not stopped")
			}
			cancel()
		})
	}
}

func TestServerCloseEndsStreamWithError(t *testing.T) {
	ctx := ctxT(t)
	s, _ := start(t, "")
	st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r4", Payload: []byte("-1")}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	go s.Close()
	for {
		f, err := st.Recv()
		if err != nil {
			t.Fatalf("no final frame: %v", err)
		}
		if f.Final {
			if f.Error == "" {
				t.Fatalf("final frame without error: %v", f)
			}
			return
		}
	}
}

func TestBadInputAndAuth(t *testing.T) {
	ctx := ctxT(t)
	s, _ := start(t, "s3cret")
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"huge length", []byte{0xff, 0xff, 0xff, 0xff}},
		{"garbage proto", []byte{3, 0, 0, 0, 0xff, 0xff, 0xff}},
		{"cut short", []byte{10, 0, 0, 0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", s.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write(tc.in)
			if tc.name == "cut short" {
				c.(*net.TCPConn).CloseWrite()
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			var f triplanev1.StreamFrame
			if err := readFrame(c, &f); err != nil || !f.Final || !strings.Contains(f.Error, "malformed") {
				t.Fatalf("answer %v %v", &f, err)
			}
		})
	}
	st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r5", Payload: []byte("1")}, ClientOptions{Token: "wrong"})
	if err != nil {
		t.Fatal(err)
	}
	if f, err := st.Recv(); err != nil || !f.Final || !strings.Contains(f.Error, "token") {
		t.Fatalf("unauthenticated: %v %v", f, err)
	}
	// Next to the bad ones, a good stream works.
	st, err = Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r6", Payload: []byte("2")}, ClientOptions{Token: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.cfg.Metrics.Refused(); got != 4 {
		t.Fatalf("refused %v, want 4", got)
	}
}

func FuzzReadFrame(f *testing.F) {
	var b bytes.Buffer
	writeFrame(&b, &triplanev1.StreamClientFrame{Kind: &triplanev1.StreamClientFrame_Open{Open: &triplanev1.StreamOpen{RequestId: "x", Payload: []byte("1")}}})
	f.Add(b.Bytes())
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		var m triplanev1.StreamClientFrame
		readFrame(bytes.NewReader(in), &m)
	})
}

func TestCloseDoesNotWaitForSilentPeers(t *testing.T) {
	p := &producer{stopped: make(chan error, 4)}
	s, err := Listen("127.0.0.1:0", ServerConfig{Handler: p.handle, OpenTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{1}) // the server is now inside its open read
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-ctxT(t).Done():
		t.Fatal("Close waited for a peer that never sent its open frame")
	}
}

// A producer silent for longer than the frontend's idle timeout keeps its
// stream thanks to keep-alives; without them the frontend gives up on it
// (a stuck worker does not hold a request forever).
func TestKeepAliveAndIdleTimeout(t *testing.T) {
	ctx := ctxT(t)
	slow := func(ctx context.Context, _ *triplanev1.StreamOpen, send func([]byte) error) (string, error) {
		select {
		case <-time.After(400 * time.Millisecond): // longer than the client's idle timeout
		case <-ctx.Done():
			return "", ctx.Err()
		}
		return "stop", send([]byte("late"))
	}
	for _, tc := range []struct {
		keepAlive time.Duration
		wantErr   bool
	}{{10 * time.Millisecond, false}, {-1, true}} {
		s, err := Listen("127.0.0.1:0", ServerConfig{Handler: slow, KeepAlive: tc.keepAlive})
		if err != nil {
			t.Fatal(err)
		}
		st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "slow"}, ClientOptions{IdleTimeout: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		f, err := st.Recv()
		switch {
		case tc.wantErr && (err == nil || !strings.Contains(err.Error(), "no frame from the worker")):
			t.Errorf("keep-alive %s: %v %v, want an idle timeout", tc.keepAlive, f, err)
		case !tc.wantErr && (err != nil || string(f.Data) != "late" || f.Seq != 1):
			t.Errorf("keep-alive %s: %v %v, want the late frame", tc.keepAlive, f, err)
		}
		st.Close()
		s.Close()
	}
}

// A frame's length prefix alone does not make the reader hold that much
// memory: a peer announcing MaxFrame and sending 100 bytes costs about
// 100 bytes. A real large frame beside it reads whole.
func TestFrameLengthAloneHoldsNoMemory(t *testing.T) {
	var good bytes.Buffer
	payload := bytes.Repeat([]byte{7}, 1<<20)
	writeFrame(&good, &triplanev1.StreamFrame{Seq: 1, Data: payload})
	var f triplanev1.StreamFrame
	if err := readFrame(&good, &f); err != nil || !bytes.Equal(f.Data, payload) {
		t.Fatalf("a 1 MiB frame: %v", err)
	}

	bad := append([]byte{0, 0, 0x40, 0}, make([]byte, 100)...) // MaxFrame announced
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	err := readFrame(bytes.NewReader(bad), &f)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "cut short") {
		t.Fatalf("a frame cut short: %v", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("reading a %d-byte prefix-only frame allocated %d bytes", len(bad), n)
	}
}

// Connections past MaxConns are closed at once and counted; once one
// ends, a good stream is served again.
func TestConnectionLimit(t *testing.T) {
	ctx := ctxT(t)
	p := &producer{stopped: make(chan error, 4)}
	s, err := Listen("127.0.0.1:0", ServerConfig{Handler: p.handle, MaxConns: 2, OpenTimeout: time.Hour,
		ErrorCode: func(err error) string {
			if errors.Is(err, ErrTooManyStreams) {
				return "overloaded"
			}
			return ""
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	for s.conns.Len() < 2 {
		if ctx.Err() != nil {
			t.Fatal("the server never took the two connections")
		}
		runtime.Gosched()
	}
	// A stream past the limit ends at once with a final frame that says
	// so, coded for the producer's client (busy, not failed).
	busy, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "busy", Payload: []byte("1")}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if f, err := busy.Recv(); err != nil || !f.Final || f.Code != "overloaded" || !strings.Contains(f.Error, "connection limit") {
		t.Fatalf("a stream past the limit: %v %v", f, err)
	}
	if got := s.cfg.Metrics.Refused(); got != 1 {
		t.Fatalf("refused %v, want 1", got)
	}
	idle[0].Close()
	for {
		st, err := Open(ctx, s.Addr(), &triplanev1.StreamOpen{RequestId: "r", Payload: []byte("1")}, ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		f, err := st.Recv()
		if err == nil && string(f.Data) == "tok-0" {
			st.Close()
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("no stream served after a connection ended: %v", err)
		}
		st.Close()
	}
}
