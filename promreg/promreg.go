// Package promreg registers Prometheus collectors so that a component
// started again in the same process, on the same registry (a node's
// serving stack restarted, tests that start several), shares the series
// the first one registered instead of panicking as MustRegister does.
// Counters then go on from where the first left them, which is what a
// node-wide series (the data plane's bytes, the transfer sessions) means.
package promreg

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Register registers c with reg and returns it, or, when reg holds an equal
// collector already, that one (c is then unused). A nil reg registers
// nothing. Any other registration error (the same name with other labels
// or help: two pieces of code disagreeing on a metric) is a programming
// error and panics, as MustRegister does.
func Register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	c, err := TryRegister(reg, c)
	if err != nil {
		panic(err)
	}
	return c
}

// TryRegister is Register returning the error it would panic with.
func TryRegister[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if reg == nil {
		return c, nil
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, err
	}
	return c, nil
}
