package replay

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"

	"google.golang.org/protobuf/proto"
)

// DiffStates compares two states field by field through their protojson
// form (zero-valued fields included) and lists the fields that differ,
// sorted by path. Paths look like "balance", "limits.max" or "items[2].id".
func DiffStates(snapshot, journal proto.Message) ([]FieldDiff, error) {
	a, err := flatten(snapshot)
	if err != nil {
		return nil, fmt.Errorf("replay: diff: snapshot state: %w", err)
	}
	b, err := flatten(journal)
	if err != nil {
		return nil, fmt.Errorf("replay: diff: journal state: %w", err)
	}
	paths := map[string]bool{}
	for p := range a {
		paths[p] = true
	}
	for p := range b {
		paths[p] = true
	}
	var out []FieldDiff
	for p := range paths {
		if a[p] != b[p] {
			out = append(out, FieldDiff{Path: p, Snapshot: a[p], Journal: b[p]})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

// flatten maps each leaf of m's protojson to its JSON text. Empty objects
// and lists are leaves too, so "no items" differs from "one item".
func flatten(m proto.Message) (map[string]string, error) {
	raw, err := marshalProto(m, true)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	out := map[string]string{}
	var walk func(path string, v any) error
	walk = func(path string, v any) error {
		switch x := v.(type) {
		case map[string]any:
			if len(x) == 0 {
				out[path] = "{}"
			}
			for k, e := range x {
				p := k
				if path != "" {
					p = path + "." + k
				}
				if err := walk(p, e); err != nil {
					return err
				}
			}
		case []any:
			if len(x) == 0 {
				out[path] = "[]"
			}
			for i, e := range x {
				if err := walk(path+"["+strconv.Itoa(i)+"]", e); err != nil {
					return err
				}
			}
		default:
			b, err := json.Marshal(x)
			if err != nil {
				return err
			}
			out[path] = string(b)
		}
		return nil
	}
	if err := walk("", v); err != nil {
		return nil, err
	}
	return out, nil
}
