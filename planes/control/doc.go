// Package control is the control plane on etcd: leases, registration,
// watch-backed discovery with load-balancing choices, elections and fenced
// placement of singleton actors.
//
// Key layout (all values protobuf JSON, readable with `etcdctl get`):
//
//	/triplane/<ns>/nodes/<node-id>                                 NodeRegistration, node lease
//	/triplane/<ns>/instances/<component>/<endpoint>/<instance-id>  InstanceInfo, node lease
//	/triplane/<ns>/election/<group>/<lease-id-hex>                 concurrency.Election keys, node lease
//	/triplane/<ns>/placement/<group>/want/<kind>/<id>              PlacementWant, no lease
//	/triplane/<ns>/placement/<group>/assign/<kind>/<id>            PlacementRecord, no lease, fenced writes
//
// A Registrar owns one lease per node and keeps every registration on it; a
// lost lease is replaced and everything re-registered, never fatal. A Cache
// lists and watches a prefix joined on the revision. Placement runs an
// election per group; its leader journals decisions through the placement
// actor (actors/placement) and publishes them with transactions that compare
// its election key's create revision.
package control
