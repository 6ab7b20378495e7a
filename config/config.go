// Package config resolves a command's settings from, in order of precedence,
// its command-line flags, TRIPLANE_* environment variables and an optional
// YAML file. The command's pflag set is the single list of settings: every
// flag is a key, so help text, env names and file keys cannot drift apart.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// EnvPrefix starts the environment variable of every setting:
// --nats-port is TRIPLANE_NATS_PORT.
const EnvPrefix = "TRIPLANE_"

// Source says where a setting's effective value came from.
type Source string

// The sources, in order of precedence.
const (
	FromFlag    Source = "flag"
	FromEnv     Source = "env"
	FromFile    Source = "file"
	FromDefault Source = "default"
)

// Error is a configuration problem with one key. Commands report it as a
// usage error (exit code 2).
type Error struct {
	Key    string
	Source Source
	Origin string // the env variable or file that held the bad value
	Err    error
}

func (e *Error) Error() string {
	switch e.Source {
	case FromEnv:
		return fmt.Sprintf("setting %q (from %s): %v", e.Key, e.Origin, e.Err)
	case FromFile:
		return fmt.Sprintf("setting %q (in %s): %v", e.Key, e.Origin, e.Err)
	}
	return fmt.Sprintf("setting %q: %v", e.Key, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// EnvName is the environment variable for a flag name.
func EnvName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// Resolved records where each setting came from.
type Resolved struct {
	fs      *pflag.FlagSet
	skip    map[string]bool
	sources map[string]Source
	File    string // the YAML file read, if any
}

// Source of the named setting.
func (r *Resolved) Source(name string) Source { return r.sources[name] }

// Options tune Resolve.
type Options struct {
	// Skip names flags that are not settings (for example "config",
	// "print-config", "help"): they are neither read from env nor files.
	Skip []string
	// FileFlag names the flag holding the YAML file path; its env variable
	// works too. Empty disables files.
	FileFlag string
	// Getenv reads the environment; nil means os.Getenv.
	Getenv func(string) string
}

// Resolve fills every flag not given on the command line from its
// environment variable, then from the YAML file. Values go through each
// flag's own parser, so a bad value is reported exactly as a bad flag would
// be, naming the key and where it came from.
func Resolve(fs *pflag.FlagSet, opts Options) (*Resolved, error) {
	getenv := opts.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	r := &Resolved{fs: fs, skip: map[string]bool{"help": true}, sources: map[string]Source{}}
	for _, s := range opts.Skip {
		r.skip[s] = true
	}
	if opts.FileFlag != "" {
		r.skip[opts.FileFlag] = true
	}

	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		if r.skip[f.Name] {
			return
		}
		if f.Changed {
			r.sources[f.Name] = FromFlag
			return
		}
		env := EnvName(f.Name)
		if v, ok := lookup(getenv, env); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, &Error{Key: f.Name, Source: FromEnv, Origin: env, Err: err})
				return
			}
			r.sources[f.Name] = FromEnv
		}
	})
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	if opts.FileFlag != "" {
		path := ""
		if f := fs.Lookup(opts.FileFlag); f != nil && f.Changed {
			path = f.Value.String()
		} else if v, ok := lookup(getenv, EnvName(opts.FileFlag)); ok {
			path = v
		}
		if path != "" {
			if err := r.readFile(path); err != nil {
				return nil, err
			}
		}
	}
	fs.VisitAll(func(f *pflag.Flag) {
		if _, ok := r.sources[f.Name]; !ok && !r.skip[f.Name] {
			r.sources[f.Name] = FromDefault
		}
	})
	return r, nil
}

func lookup(getenv func(string) string, name string) (string, bool) {
	v := getenv(name)
	return v, v != ""
}

func (r *Resolved) readFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return &Error{Key: "config", Err: fmt.Errorf("read config file: %w", err)}
	}
	var doc map[string]yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return &Error{Key: "config", Err: fmt.Errorf("config file %s is not a YAML mapping of settings: %w", path, err)}
	}
	r.File = path
	keys := make([]string, 0, len(doc))
	for k := range doc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var errs []error
	for _, k := range keys {
		node := doc[k]
		f := r.fs.Lookup(k)
		if f == nil || r.skip[k] {
			errs = append(errs, &Error{Key: k, Source: FromFile, Origin: path,
				Err: fmt.Errorf("unknown key at line %d (known keys: %s)", node.Line, strings.Join(r.keys(), ", "))})
			continue
		}
		if r.sources[k] == FromFlag || r.sources[k] == FromEnv {
			continue // higher precedence already set it
		}
		vals, err := scalarValues(&node)
		if err != nil {
			errs = append(errs, &Error{Key: k, Source: FromFile, Origin: path, Err: fmt.Errorf("line %d: %w", node.Line, err)})
			continue
		}
		if isSlice(f) {
			vals = []string{strings.Join(vals, ",")}
		} else if len(vals) != 1 {
			errs = append(errs, &Error{Key: k, Source: FromFile, Origin: path, Err: fmt.Errorf("line %d: want a single value, got a list", node.Line)})
			continue
		}
		if err := r.fs.Set(k, vals[0]); err != nil {
			errs = append(errs, &Error{Key: k, Source: FromFile, Origin: path, Err: fmt.Errorf("line %d: %w", node.Line, err)})
			continue
		}
		r.sources[k] = FromFile
	}
	return errors.Join(errs...)
}

func isSlice(f *pflag.Flag) bool {
	return strings.HasSuffix(f.Value.Type(), "Slice") || strings.HasSuffix(f.Value.Type(), "Array")
}

func scalarValues(n *yaml.Node) ([]string, error) {
	switch n.Kind {
	case yaml.ScalarNode:
		return []string{n.Value}, nil
	case yaml.SequenceNode:
		out := make([]string, 0, len(n.Content))
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return nil, errors.New("want a list of plain values")
			}
			out = append(out, c.Value)
		}
		return out, nil
	}
	return nil, errors.New("want a plain value or a list of values")
}

func (r *Resolved) keys() []string {
	var out []string
	r.fs.VisitAll(func(f *pflag.Flag) {
		if !r.skip[f.Name] {
			out = append(out, f.Name)
		}
	})
	return out
}

// YAML renders the effective settings as a YAML file that Resolve accepts,
// each line commented with its source and help text.
func (r *Resolved) YAML() string {
	var b bytes.Buffer
	if r.File != "" {
		fmt.Fprintf(&b, "# effective configuration (file: %s)\n", r.File)
	} else {
		b.WriteString("# effective configuration\n")
	}
	r.fs.VisitAll(func(f *pflag.Flag) {
		if r.skip[f.Name] {
			return
		}
		val := &yaml.Node{Kind: yaml.ScalarNode, Value: f.Value.String()}
		switch t := f.Value.Type(); {
		case strings.HasPrefix(t, "int") || strings.HasPrefix(t, "uint"):
			val.Tag = "!!int"
		case t == "bool":
			val.Tag = "!!bool"
		case strings.HasPrefix(t, "float"):
			val.Tag = "!!float"
		}
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			val = &yaml.Node{Kind: yaml.SequenceNode}
			for _, v := range sv.GetSlice() {
				val.Content = append(val.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: v})
			}
		}
		node := &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{{Kind: yaml.ScalarNode, Value: f.Name}, val}}
		out, err := yaml.Marshal(node)
		if err != nil {
			out = []byte(fmt.Sprintf("%s: %q\n", f.Name, f.Value.String()))
		}
		line := strings.TrimRight(string(out), "\n")
		fmt.Fprintf(&b, "# %s [%s, env %s]\n%s\n", f.Usage, r.sources[f.Name], EnvName(f.Name), line)
	})
	return b.String()
}
