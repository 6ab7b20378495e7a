// Package sim is the deterministic simulator: virtual clock, seeded scheduler, simulated planes, faults and invariant checks.
package sim
