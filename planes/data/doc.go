// Package data is the data plane: KV block transfers and response streams over TCP and shared memory.
package data
