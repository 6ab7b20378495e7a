package config

import (
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/pflag"
)

// enumValue is a string flag restricted to a fixed set of values, so a bad
// value is refused where it is parsed, wherever it came from.
type enumValue struct {
	val     *string
	allowed []string
}

func (e *enumValue) String() string { return *e.val }
func (e *enumValue) Type() string   { return "string" }
func (e *enumValue) Set(s string) error {
	s = strings.ToLower(strings.TrimSpace(s))
	if !slices.Contains(e.allowed, s) {
		return fmt.Errorf("%q is not one of %s", s, strings.Join(e.allowed, ", "))
	}
	*e.val = s
	return nil
}

// EnumVar defines a string flag that accepts only the allowed values.
func EnumVar(fs *pflag.FlagSet, p *string, name, def string, allowed []string, usage string) {
	*p = def
	fs.Var(&enumValue{val: p, allowed: allowed}, name, fmt.Sprintf("%s (%s)", usage, strings.Join(allowed, "|")))
}
