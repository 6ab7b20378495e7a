package sim

import (
	"testing"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// The text in a failing run's trace does not depend on the build.
func TestStableTextHasSingleSpaces(t *testing.T) {
	got := stableText(&triplanev1.LedgerState{Balance: 12959, Applied: 73, InterestPayments: 2})
	if want := "balance:12959 applied:73 interest_payments:2"; got != want {
		t.Fatalf("stableText = %q, want %q", got, want)
	}
}
