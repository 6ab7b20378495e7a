// Package logging builds the process's slog logger from the --log-format and
// --log-level settings, and adapts the loggers of the embedded servers (NATS,
// etcd's zap) onto it so one process writes one log stream in one format.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// Formats lists the accepted values of --log-format.
var Formats = []string{"text", "json"}

// Levels lists the accepted values of --log-level.
var Levels = []string{"debug", "info", "warn", "error"}

// ParseLevel turns a --log-level value into a slog level.
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info", "":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("unknown log level %q (want one of %s)", s, strings.Join(Levels, ", "))
}

// New returns a logger writing to w in the given format ("text" or "json")
// at the given level.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	lvl, err := ParseLevel(level)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("unknown log format %q (want one of %s)", format, strings.Join(Formats, ", "))
}
