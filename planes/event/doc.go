// Package event is the event plane on NATS and JetStream: pub/sub, queues, request-reply, KV event streams and load metrics.
package event
