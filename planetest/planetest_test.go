package planetest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestStartBothPlanes(t *testing.T) {
	start := time.Now()
	p := Start(t)
	t.Logf("nats and etcd ready in %s", time.Since(start))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	js, err := jetstream.New(p.NATS.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}}); err != nil {
		t.Fatalf("create stream: %v", err)
	}
	if _, err := js.Publish(ctx, "t.x", []byte("hi")); err != nil {
		t.Fatalf("publish: %v", err)
	}
	cli := p.Etcd.Client(t)
	if _, err := cli.Put(ctx, "/k", "v"); err != nil {
		t.Fatalf("etcd put: %v", err)
	}
	got, err := cli.Get(ctx, "/k")
	if err != nil || len(got.Kvs) != 1 || string(got.Kvs[0].Value) != "v" {
		t.Fatalf("etcd get: %v %v", got, err)
	}
}
