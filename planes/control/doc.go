// Package control is the control plane on etcd: leases, registration, discovery, elections and placement.
package control
