package event

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
)

// ErrNotFound: no value under the key.
var ErrNotFound = errors.New("event: no such configuration key")

// ConfigBroadcast distributes configuration values of type T to every node
// through a JetStream key-value bucket: the bucket keeps the last value of
// each key, so a node that starts late reads the current value first and
// then every change. Keys are <namespace>.<component>.<name>.
type ConfigBroadcast[T proto.Message] struct {
	b      *Bus
	kv     jetstream.KeyValue
	bucket string
}

// OpenConfig creates (or opens) the configuration bucket; bucket "" means
// <PREFIX>_CONFIG.
func OpenConfig[T proto.Message](ctx context.Context, b *Bus, bucket string) (*ConfigBroadcast[T], error) {
	if bucket == "" {
		bucket = strings.ToUpper(b.cfg.Prefix) + "_CONFIG"
	}
	js, err := jetstream.New(b.nc)
	if err != nil {
		return nil, fmt.Errorf("event: jetstream: %w", err)
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:       bucket,
		Description:  "Triplane configuration broadcast (last value per key)",
		History:      1,
		MaxValueSize: int32(b.nc.MaxPayload()),
	})
	if err != nil {
		return nil, fmt.Errorf("event: config bucket %s: %w", bucket, err)
	}
	return &ConfigBroadcast[T]{b: b, kv: kv, bucket: bucket}, nil
}

// Key builds the key <namespace>.<component>.<name>, checking each part.
func ConfigKey(namespace, component, name string) (string, error) {
	for _, p := range []string{namespace, component, name} {
		if err := checkToken(p); err != nil {
			return "", fmt.Errorf("event: config key %s.%s.%s: %w", namespace, component, name, err)
		}
	}
	return namespace + "." + component + "." + name, nil
}

// Put stores v under key and broadcasts it; it returns the revision.
func (c *ConfigBroadcast[T]) Put(ctx context.Context, key string, v T) (uint64, error) {
	data, err := proto.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("event: encode config %s: %w", key, err)
	}
	if err := c.b.checkSize("config "+key, len(data)); err != nil {
		return 0, err
	}
	rev, err := c.kv.Put(ctx, key, data)
	if err != nil {
		return 0, fmt.Errorf("event: put config %s: %w", key, err)
	}
	return rev, nil
}

// Get reads the current value of key.
func (c *ConfigBroadcast[T]) Get(ctx context.Context, key string) (T, uint64, error) {
	var zero T
	e, err := c.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return zero, 0, fmt.Errorf("%w: %s in bucket %s", ErrNotFound, key, c.bucket)
	}
	if err != nil {
		return zero, 0, fmt.Errorf("event: get config %s: %w", key, err)
	}
	v, err := Decode[T](e.Value())
	if err != nil {
		return zero, 0, fmt.Errorf("event: config %s revision %d: %w", key, e.Revision(), err)
	}
	return v, e.Revision(), nil
}

// Watch calls h with the current value of every key matching pattern
// (wildcards allowed), then with every change, until ctx ends or stop is
// called. A deleted key is reported with deleted set and a zero v.
// Malformed values are counted and skipped. h runs on one goroutine.
func (c *ConfigBroadcast[T]) Watch(ctx context.Context, pattern string, h func(key string, v T, rev uint64, deleted bool)) (stop func(), err error) {
	w, err := c.kv.Watch(ctx, pattern)
	if err != nil {
		return nil, fmt.Errorf("event: watch config %s: %w", pattern, err)
	}
	malformed := c.b.metrics.Malformed.WithLabelValues("config:" + c.bucket)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range w.Updates() {
			if e == nil {
				continue // end of the initial values
			}
			var zero T
			switch e.Operation() {
			case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
				h(e.Key(), zero, e.Revision(), true)
				continue
			}
			v, err := Decode[T](e.Value())
			if err != nil {
				malformed.Inc()
				c.b.log.Warn("skipping malformed config value", "bucket", c.bucket, "key", e.Key(), "rev", e.Revision(), "err", err)
				continue
			}
			h(e.Key(), v, e.Revision(), false)
		}
	}()
	return func() {
		_ = w.Stop()
		<-done
	}, nil
}
