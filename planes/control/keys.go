package control

import (
	"fmt"
	"strings"
)

// Root of every key Triplane writes to etcd.
const Root = "/triplane/"

// CheckName checks one key segment: non-empty, printable, without '/'.
func CheckName(what, s string) error {
	if s == "" {
		return fmt.Errorf("control: %s is empty", what)
	}
	if len(s) > 253 {
		return fmt.Errorf("control: %s %.20q... is longer than 253 bytes", what, s)
	}
	for _, r := range s {
		if r == '/' || r <= ' ' || r == 0x7f {
			return fmt.Errorf("control: %s %q contains %q (no '/', spaces or control characters)", what, s, r)
		}
	}
	return nil
}

// Keys builds the keys of one namespace.
type Keys struct{ NS string }

func (k Keys) base() string { return Root + k.NS + "/" }

// Nodes is the prefix of node registrations.
func (k Keys) Nodes() string { return k.base() + "nodes/" }

// Node is a node's registration key.
func (k Keys) Node(id string) string { return k.Nodes() + id }

// Instances is the prefix of every instance of an endpoint; with an empty
// endpoint, of every endpoint of the component; with both empty, of all.
func (k Keys) Instances(component, endpoint string) string {
	p := k.base() + "instances/"
	if component == "" {
		return p
	}
	p += component + "/"
	if endpoint == "" {
		return p
	}
	return p + endpoint + "/"
}

// Instance is an instance's registration key.
func (k Keys) Instance(component, endpoint, id string) string {
	return k.Instances(component, endpoint) + id
}

// Election is the prefix of a placement group's election; the election
// recipe appends "/<lease-id-hex>".
func (k Keys) Election(group string) string { return k.base() + "election/" + group }

// Wants is the prefix of the actors wanted in a placement group.
func (k Keys) Wants(group string) string { return k.base() + "placement/" + group + "/want/" }

// Want is the key asking for an actor in a group.
func (k Keys) Want(group, kind, id string) string { return k.Wants(group) + kind + "/" + id }

// Assigns is the prefix of a placement group's published assignments.
func (k Keys) Assigns(group string) string { return k.base() + "placement/" + group + "/assign/" }

// Assign is the key of one actor's assignment.
func (k Keys) Assign(group, kind, id string) string { return k.Assigns(group) + kind + "/" + id }

// lastSegment returns what follows the last '/'.
func lastSegment(key string) string {
	return key[strings.LastIndexByte(key, '/')+1:]
}
