// Package all lists every actor kind compiled into the triplane binary, so
// the host, `triplane replay` and the simulator agree on what each kind is.
package all

import (
	"github.com/triplane-dev/triplane/actors"
	"github.com/triplane-dev/triplane/actors/ledger"
	"github.com/triplane-dev/triplane/actors/placement"
	routerm "github.com/triplane-dev/triplane/actors/router"
	"github.com/triplane-dev/triplane/actors/transfer"
)

// Registry returns a registry of every built-in actor kind.
func Registry() *actors.Registry {
	return actors.NewRegistry(ledger.Machine{}, placement.Machine{}, transfer.Machine{}, routerm.Machine{})
}
