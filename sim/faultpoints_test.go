package sim_test

import "github.com/triplane-dev/triplane/engine/mocker"

// servingFaultPoints are the fault points the serving scenario's real code
// reaches.
var servingFaultPoints = mocker.FaultPoints
