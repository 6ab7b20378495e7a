package logging

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// etcd's known-benign errors (a new member's first start, its listeners
// closing on a clean stop) are logged at debug; other errors stay errors.
func TestZapBridgeLevels(t *testing.T) {
	var buf bytes.Buffer
	z := Zap(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	z.Error("failed to update storage version", zap.String("cluster-version", "3.7.0"),
		zap.Error(errors.New("cannot detect storage schema version: missing term information")))
	z.Warn("Failed to detect schema version", zap.Error(errors.New("missing term information")))
	z.Error("serving grpc", zap.Error(errors.New("use of closed network connection")))
	if buf.Len() != 0 {
		t.Fatalf("benign etcd messages shown at info level:\n%s", buf.String())
	}
	z.Error("failed to update storage version", zap.Error(errors.New("disk full")))
	if !strings.Contains(buf.String(), "level=ERROR") || !strings.Contains(buf.String(), "disk full") {
		t.Fatalf("a real error was not shown:\n%s", buf.String())
	}
}
