// Package journal stores actor events in JetStream, one subject per actor with optimistic concurrency, and snapshots actor state in Pebble.
package journal
