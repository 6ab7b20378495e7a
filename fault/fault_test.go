package fault_test

import (
	"testing"

	"github.com/triplane-dev/triplane/fault"
)

type always map[string]int

func (a always) Fire(point string) bool { a[point]++; return true }

func TestNilPointsNeverFire(t *testing.T) {
	if fault.Fire(nil, "x") {
		t.Fatal("a nil Points fired")
	}
	a := always{}
	if !fault.Fire(a, "x") || a["x"] != 1 {
		t.Fatalf("points not consulted: %v", a)
	}
}
