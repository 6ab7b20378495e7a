// Package data is the data plane: KV block transfers and response streams
// over TCP and shared memory.
//
// Workers register memory regions (pools of fixed-size blocks of real
// bytes, see Region and Regions). A sender names the bytes to move by
// Descriptor (region, offset, length), like NIXL's descriptor lists, and
// hands a list of Ops to a Transport; Write returns once every byte has
// landed in the receiver's region and its CRC-32C checksum verified. The
// receiving side checks every descriptor against its registered regions and
// never writes outside them.
//
// Two transports ship: TCP (several lanes per peer, writev batches, reads
// straight into the destination block) and shared memory (memfd regions
// handed over with SCM_RIGHTS, one copy per transfer). A Dialer picks one
// per peer: shared memory on the same host, TCP otherwise; the choice can
// be overridden, and another Backend (an RDMA/UCX one) can be put in front
// without touching callers.
package data
