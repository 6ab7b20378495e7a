package worker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/triplane-dev/triplane/engine/mocker"
	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/data/stream"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/serving/worker"
)

// A worker whose waiting request cannot be admitted while an import holds
// blocks waits for something to change instead of stepping the engine in
// a loop (it ran millions of empty steps a second on one core).
func TestEngineWaitsWhenNothingCanRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bus, err := event.New(planetest.StartNATS(t).Connect(t), event.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	reg := prometheus.NewRegistry()
	w, err := worker.Start(ctx, worker.Config{ID: "w1", Model: "m", Bus: bus, Registerer: reg, Role: worker.RoleBoth,
		Engine: mocker.Config{BlockSize: 4, NumBlocks: 64}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// A prefill worker that answers only at the end: the decode worker
	// holds the prompt's blocks for the import meanwhile.
	release := make(chan struct{})
	defer close(release)
	subj, err := worker.PrefillSubject(bus, "default", "slow")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := event.Serve(bus, subj, "", func(ctx context.Context, r *triplanev1.PrefillRequest) (*triplanev1.PrefillReply, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, errors.New("not now")
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	open := func(id string, n int, prefill string) *stream.Stream {
		toks := make([]uint32, n)
		for i := range toks {
			toks[i] = uint32(len(id)*1000 + i)
		}
		b, _ := proto.Marshal(&triplanev1.GenerateRequest{RequestId: id, Tokens: toks, MaxTokens: 1, PrefillWorker: prefill})
		s, err := stream.Open(ctx, w.Addr(), &triplanev1.StreamOpen{RequestId: id, Payload: b}, stream.ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s1 := open("a", 64, "slow")
	defer s1.Close()
	for w.Load().BlocksUsed == 0 {
		if ctx.Err() != nil {
			t.Fatal("the first request never reserved its import")
		}
		time.Sleep(5 * time.Millisecond)
	}
	s2 := open("bb", 232, "")
	defer s2.Close()
	for w.Load().Waiting == 0 {
		if ctx.Err() != nil {
			t.Fatal("the second request never waited")
		}
		time.Sleep(5 * time.Millisecond)
	}
	steps := func() float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "triplane_worker_engine_steps_total" {
				return mf.GetMetric()[0].GetCounter().GetValue()
			}
		}
		t.Fatal("no steps metric")
		return 0
	}
	before := steps()
	time.Sleep(300 * time.Millisecond) // an absence can only be watched for a while
	if n := steps() - before; n > 1000 {
		t.Fatalf("%.0f engine steps in 300 ms with nothing able to run", n)
	}
}
