// Package event is Triplane's event plane on NATS core and JetStream: typed
// publish-subscribe, queue groups, request-reply (synchronous and
// asynchronous), configuration broadcast with the last value kept for late
// joiners, durable work queues with a dead-letter subject, and the load
// reports the load balancers read. Every payload is a protobuf message.
//
// # Subjects
//
// Every subject is <prefix>.<namespace>.<component>.<rest...> (default prefix
// "triplane"); Bus.Subject builds and checks one. The plane's own subjects:
//
//	<prefix>.<ns>.<component>.load                 LoadReport (pub/sub)
//	<prefix>.<ns>.kv.events.<worker>               KvEventBatch (pub/sub, package kvevents)
//	<prefix>.<ns>.kv.resend.<worker>               KvResendRequest -> KvResendReply (request-reply)
//	<prefix>.<ns>.<component>.queue.<name>         work queue (JetStream, work-queue retention)
//	<prefix>.<ns>.<component>.dlq.<name>           dead letters of that queue (JetStream, limits)
//
// Configuration lives in the JetStream key-value bucket <PREFIX>_CONFIG under
// keys <ns>.<component>.<name>.
//
// # Limits
//
// A payload above the server's max payload is refused before sending with
// ErrTooLarge (large payloads belong on the data plane). Each subscription
// has pending limits; a slow consumer's dropped messages are counted, never
// buffered without bound. Undecodable payloads are counted, logged at most
// once per interval per subscription, and dropped.
package event
