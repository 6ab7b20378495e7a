package databench

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

func TestRunSmall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := Run(ctx, Config{BlockSizes: []int{4096, 1 << 20}, Bytes: 8 << 20, RegionBytes: 4 << 20, Lanes: 2, Rounds: 1,
		LatencySamples: 50, LatencyBlock: 4096})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	Print(&b, "test", rep)
	for _, want := range []string{"tcp, 1 lane", "tcp, 2 lanes", "shm, receiver verifies CRC", "copy (memcpy baseline)", "plain Go TCP stream", "p99"} {
		if !strings.Contains(b.String(), want) {
			t.Fatalf("report lacks %q:\n%s", want, b.String())
		}
	}
	if _, err := Run(ctx, Config{}); err == nil {
		t.Fatal("empty config accepted")
	}
}
