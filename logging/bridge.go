package logging

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// NATSLogger adapts slog to the nats-server Logger interface. NATS notices
// are routine start-up chatter, so they are logged at debug unless they are
// warnings or errors.
type NATSLogger struct{ L *slog.Logger }

func (n NATSLogger) Noticef(format string, v ...any) { n.L.Debug(fmt.Sprintf(format, v...)) }
func (n NATSLogger) Warnf(format string, v ...any)   { n.L.Warn(fmt.Sprintf(format, v...)) }
func (n NATSLogger) Errorf(format string, v ...any)  { n.L.Error(fmt.Sprintf(format, v...)) }
func (n NATSLogger) Debugf(format string, v ...any)  { n.L.Debug(fmt.Sprintf(format, v...)) }
func (n NATSLogger) Tracef(format string, v ...any)  {}

// Fatalf is logged as an error: an embedded server must never exit the
// process; the failure surfaces through the server's own start-up checks.
func (n NATSLogger) Fatalf(format string, v ...any) {
	n.L.Error("fatal: " + fmt.Sprintf(format, v...))
}

// Zap returns a zap logger that writes through l. etcd's info level is very
// chatty, so zap's info maps to slog debug; warnings and errors keep their level.
func Zap(l *slog.Logger) *zap.Logger {
	return zap.New(&zapCore{l: l})
}

type zapCore struct {
	l      *slog.Logger
	fields []zapcore.Field
}

func (c *zapCore) Enabled(lvl zapcore.Level) bool {
	return c.l.Enabled(context.Background(), slogLevel(lvl))
}

func (c *zapCore) With(fields []zapcore.Field) zapcore.Core {
	return &zapCore{l: c.l, fields: append(append([]zapcore.Field(nil), c.fields...), fields...)}
}

func (c *zapCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *zapCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	lvl := slogLevel(e.Level)
	if lvl > slog.LevelDebug && isSingleNodeNoise(e.Message) {
		lvl = slog.LevelDebug
	}
	attrs := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		v := enc.Fields[k]
		if s, ok := v.(string); ok && lvl > slog.LevelDebug && (isShutdownNoise(s) || isBootstrapNoise(e.Message, s)) {
			// etcd reports its own listeners closing on a clean stop as
			// errors; they are expected then and only alarm operators.
			lvl = slog.LevelDebug
		}
		attrs = append(attrs, k, v)
	}
	c.l.Log(context.Background(), lvl, e.Message, attrs...)
	return nil
}

func (c *zapCore) Sync() error { return nil }

// isSingleNodeNoise matches etcd warnings about choices that are deliberate
// for an embedded loopback member.
func isSingleNodeNoise(msg string) bool {
	return strings.HasPrefix(msg, "Running http and grpc server on single port") ||
		strings.HasPrefix(msg, "simple token is not cryptographically signed")
}

// isBootstrapNoise matches what a new etcd member logs as an error before
// its first raft term: it cannot tell its storage schema yet, and sets it
// once the term is there. Every first start of `triplane up` printed it.
func isBootstrapNoise(msg, field string) bool {
	return (msg == "failed to update storage version" || msg == "Failed to detect schema version") &&
		strings.Contains(field, "missing term information")
}

func isShutdownNoise(s string) bool {
	return strings.Contains(s, "use of closed network connection") ||
		strings.Contains(s, "server closed") || strings.Contains(s, "Server closed")
}

func slogLevel(l zapcore.Level) slog.Level {
	switch {
	case l >= zapcore.ErrorLevel:
		return slog.LevelError
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	default:
		return slog.LevelDebug
	}
}
