package sim_test

import (
	"slices"

	"github.com/triplane-dev/triplane/engine/mocker"
	"github.com/triplane-dev/triplane/planes/event/kvevents"
)

// servingFaultPoints are the fault points the serving scenario's real code
// reaches: the engine's and the KV event log's and sequencer's.
var servingFaultPoints = append(slices.Clone(mocker.FaultPoints), kvevents.FaultPoints...)
