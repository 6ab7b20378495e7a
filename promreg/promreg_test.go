package promreg_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/triplane-dev/triplane/planetest"
	"github.com/triplane-dev/triplane/promreg"
)

func counter() prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: "x_total", Help: "X."})
}

// The second registration of an equal collector gets the first one, so
// both users count into one series; a nil registry registers nothing.
func TestRegisterSharesAnEqualCollector(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := promreg.Register(reg, counter())
	b := promreg.Register(reg, counter())
	a.Inc()
	b.Inc()
	if planetest.CounterValue(t, a) != 2 || a != b {
		t.Fatalf("two registrations count apart: %v, %v", planetest.CounterValue(t, a), planetest.CounterValue(t, b))
	}
	c := promreg.Register[prometheus.Counter](nil, counter())
	c.Inc()
	if planetest.CounterValue(t, a) != 2 || c == a || planetest.CounterValue(t, c) != 1 {
		t.Fatal("a nil registry's collector counted into the registered one")
	}
	if prometheus.DefaultRegisterer.Unregister(c) {
		t.Fatal("a nil registry registered on the default one")
	}
}

// A registered collector of another type under the same description is
// an error TryRegister returns (and Register panics with).
func TestTryRegisterRefusesAnotherType(t *testing.T) {
	reg := prometheus.NewRegistry()
	promreg.Register(reg, counter())
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x_total", Help: "X."})
	if got, err := promreg.TryRegister(reg, g); err == nil || got != g {
		t.Fatalf("a gauge where a counter is registered: %v, %v", got, err)
	}
}

// A collector that conflicts with a registered one (same name, other help)
// is a programming error: it panics, as MustRegister does.
func TestRegisterPanicsOnAConflict(t *testing.T) {
	reg := prometheus.NewRegistry()
	promreg.Register(reg, counter())
	defer func() {
		if recover() == nil {
			t.Fatal("a conflicting collector was registered without a panic")
		}
	}()
	promreg.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{Name: "x_total", Help: "Something else."}))
}
