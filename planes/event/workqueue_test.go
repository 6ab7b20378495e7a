package event_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
	"github.com/triplane-dev/triplane/planetest"
)

func TestWorkQueueAckRetryRejectDeadLetter(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, event.QueueConfig{
		Namespace: "ns", Component: "prefill", Name: "jobs", MaxDeliver: 3, RetryDelay: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if q.Subject() != "triplane.ns.prefill.queue.jobs" || q.DeadLetterSubject() != "triplane.ns.prefill.dlq.jobs" {
		t.Fatalf("subjects %s %s", q.Subject(), q.DeadLetterSubject())
	}
	// ok: acked first time; retry: nak with delay once then ok;
	// reject: straight to the DLQ; always: fails every delivery.
	for _, text := range []string{"ok", "retry", "reject", "always"} {
		if _, err := q.Enqueue(ctx, &triplanev1.EventProbe{Text: text}); err != nil {
			t.Fatal(err)
		}
	}
	// A job that does not decode goes to the DLQ too.
	if _, err := b.Conn().Request(q.Subject(), []byte{0xff, 0xff}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	deliveries := map[string][]uint64{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = q.Consume(ctx, func(_ context.Context, j *event.Job[*triplanev1.EventProbe]) error {
			mu.Lock()
			deliveries[j.Value.Text] = append(deliveries[j.Value.Text], j.Deliveries)
			mu.Unlock()
			switch j.Value.Text {
			case "retry":
				if j.Deliveries == 1 {
					return event.Retry(5*time.Millisecond, errors.New("not yet"))
				}
			case "reject":
				return event.Reject(errors.New("bad job"))
			case "always":
				return errors.New("broken")
			}
			return nil
		})
	}()
	planetest.Eventually(t, "three dead letters", func() bool {
		dl, err := q.DeadLetters(ctx, 10)
		return err == nil && len(dl) == 3
	})
	planetest.Eventually(t, "the queue to empty", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(deliveries["retry"]) == 2 && len(deliveries["ok"]) == 1
	})
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	if got := deliveries["always"]; len(got) != 3 || got[2] != 3 {
		t.Fatalf("failing job delivered %v, want 3 deliveries", got)
	}
	if got := deliveries["reject"]; len(got) != 1 {
		t.Fatalf("rejected job delivered %v times, want once", got)
	}
	dl, err := q.DeadLetters(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]event.DeadLetter[*triplanev1.EventProbe]{}
	for _, d := range dl {
		key := "malformed"
		if d.Value != nil {
			key = d.Value.Text
		}
		reasons[key] = d
	}
	if d := reasons["always"]; d.Deliveries != 3 || !strings.Contains(d.Reason, "broken") {
		t.Errorf("exhausted dead letter %+v", d)
	}
	if d := reasons["reject"]; !strings.Contains(d.Reason, "bad job") {
		t.Errorf("rejected dead letter %+v", d)
	}
	if d := reasons["malformed"]; !strings.Contains(d.Reason, "malformed") {
		t.Errorf("malformed dead letter %+v", d)
	}
	if v := planetest.CounterValue(t, b.Metrics().DeadLettered); v != 3 {
		t.Errorf("dead lettered %v, want 3", v)
	}
	// Work-queue retention: nothing left in the queue.
	big := &triplanev1.EventProbe{Body: make([]byte, b.MaxPayload())}
	if _, err := q.Enqueue(context.Background(), big); !errors.Is(err, event.ErrTooLarge) {
		t.Fatalf("big job: %v", err)
	}
}

func TestWorkQueueEachJobToOneWorker(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := event.QueueConfig{Namespace: "ns", Component: "prefill", Name: "shared"}
	q, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, cfg)
	if err != nil {
		t.Fatal(err)
	}
	const N = 200
	for i := range N {
		if _, err := q.EnqueueAsync(&triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	<-q.EnqueueComplete()
	var mu sync.Mutex
	seen := map[uint64]int{}
	var wg sync.WaitGroup
	for range 3 {
		// Each worker opens the queue on its own connection.
		wb := newBus(t, n.Connect(t), event.Config{})
		wq, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, wb, cfg)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = wq.Consume(ctx, func(_ context.Context, j *event.Job[*triplanev1.EventProbe]) error {
				mu.Lock()
				seen[j.Value.Seq]++
				mu.Unlock()
				return nil
			})
		}()
	}
	planetest.Eventually(t, "every job", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == N })
	cancel()
	wg.Wait()
	for s, c := range seen {
		if c != 1 {
			t.Fatalf("job %d handled %d times", s, c)
		}
	}
}

// Jobs a consumer holds behind a slow one do not expire while they wait
// (they did: delivered again, handled twice, their deliveries used up). A
// job in hand when the worker stops goes back to the queue, not to the
// dead letters (before, a handler that returned ctx.Err() on the job's
// last delivery dead-lettered it).
func TestWorkQueueHeldJobsKeptAndStopReturnsThem(t *testing.T) {
	n := planetest.StartNATS(t)
	nc := n.Connect(t)
	b := newBus(t, nc, event.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	q, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, event.QueueConfig{Namespace: "ns", Component: "c", Name: "one",
		MaxDeliver: 2, AckWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	enqueue := func(from, to int) {
		for i := from; i < to; i++ {
			if _, err := q.Enqueue(ctx, &triplanev1.EventProbe{Seq: uint64(i)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	enqueue(0, 5)
	var mu sync.Mutex
	handled := map[uint64]int{}
	slow := make(chan struct{})
	wctx, stop := context.WithCancel(ctx)
	stopped := make(chan error, 1)
	go func() {
		stopped <- q.Consume(wctx, func(ctx context.Context, j *event.Job[*triplanev1.EventProbe]) error {
			mu.Lock()
			handled[j.Value.Seq]++
			mu.Unlock()
			if j.Value.Seq == 0 {
				// Slower than the ack wait, telling the server so; the
				// jobs held behind it must not expire meanwhile.
				for {
					select {
					case <-slow:
						return nil
					case <-time.After(200 * time.Millisecond):
						_ = j.InProgress()
					}
				}
			}
			if j.Value.Seq == 9 {
				<-ctx.Done()
				return ctx.Err()
			}
			return nil
		})
	}()
	time.Sleep(2500 * time.Millisecond) // past two ack waits: watching for redeliveries
	close(slow)
	for {
		mu.Lock()
		n := len(handled)
		mu.Unlock()
		if n == 5 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("jobs not handled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Job 9 stays in hand until the stop; 10..14 wait behind it.
	enqueue(9, 15)
	for {
		mu.Lock()
		n := handled[9]
		mu.Unlock()
		if n == 1 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("job 9 never in hand")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	for seq, n := range handled {
		if n != 1 {
			t.Errorf("job %d handled %d times", seq, n)
		}
	}
	mu.Unlock()
	if dl, err := q.DeadLetters(ctx, 10); err != nil || len(dl) != 0 {
		t.Fatalf("dead letters: %v %v", dl, err)
	}
	// Another worker gets every job left, the one stopped in hand included.
	got := make(chan uint64, 10)
	wctx2, stop2 := context.WithCancel(ctx)
	defer stop2()
	go q.Consume(wctx2, func(_ context.Context, j *event.Job[*triplanev1.EventProbe]) error {
		got <- j.Value.Seq
		return nil
	})
	seen := map[uint64]bool{}
	for len(seen) < 6 {
		select {
		case s := <-got:
			seen[s] = true
		case <-ctx.Done():
			t.Fatalf("jobs handled after the stop: %v", seen)
		}
	}
}

// Two queues whose names map to one stream name are refused, not merged
// (which took the first queue's subjects from its stream).
func TestWorkQueueNameCollisionRefused(t *testing.T) {
	n := planetest.StartNATS(t)
	b := newBus(t, n.Connect(t), event.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, event.QueueConfig{Namespace: "a_b", Component: "c", Name: "jobs"})
	if err != nil {
		t.Fatal(err)
	}
	for _, cfg := range []event.QueueConfig{{Namespace: "a", Component: "b_c", Name: "jobs"}, {Namespace: "a_b", Component: "c", Name: "JOBS"}} {
		if _, err := event.OpenWorkQueue[*triplanev1.EventProbe](ctx, b, cfg); err == nil || !strings.Contains(err.Error(), "maps to the same stream") {
			t.Errorf("%+v: %v, want a refusal", cfg, err)
		}
	}
	if _, err := a.Enqueue(ctx, &triplanev1.EventProbe{}); err != nil {
		t.Fatalf("the first queue after the refusals: %v", err)
	}
}
