// Package actors holds the actor state machines (pure: a command in, events and effects out) and the protoactor-go host that runs them.
package actors
