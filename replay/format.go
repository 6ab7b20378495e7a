package replay

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// WriteActors writes actors as an aligned table, or with asJSON as one
// JSON object per line.
func WriteActors(w io.Writer, list []Actor, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		for _, a := range list {
			if err := enc.Encode(a); err != nil {
				return fmt.Errorf("replay: write actors: %w", err)
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tID\tHIGHEST SEQ\tLAST EVENT\tSNAPSHOT")
	for _, a := range list {
		snap := "-"
		highest, last := strconv.FormatUint(a.Highest, 10), FormatTime(a.LastEvent)
		if a.Err != nil {
			highest, last = "unreadable", "-"
		}
		switch {
		case a.SnapshotErr != nil:
			snap = "unreadable"
		case a.SnapshotSeq > 0:
			snap = "seq " + strconv.FormatUint(a.SnapshotSeq, 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", a.Kind, a.ID, highest, last, snap)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("replay: write actors: %w", err)
	}
	return nil
}

// WriteEvent writes one event as a text line (seq, time, short type,
// fields, command), or with asJSON as one JSON object on a line.
func WriteEvent(w io.Writer, e *Event, asJSON bool) error {
	if asJSON {
		b, err := json.Marshal(e)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	cmd := ""
	if e.CommandID != "" {
		cmd = "  command=" + e.CommandID
	}
	_, err := fmt.Fprintf(w, "%-6d %-30s %-24s %s%s\n", e.Seq, FormatTime(e.Time), e.ShortType(), e.Fields(), cmd)
	return err
}

// WriteState writes a state: a header line with the sequence and time it
// reflects, then the state as indented protojson; with asJSON one JSON
// object on a line.
func WriteState(w io.Writer, s *State, asJSON bool) error {
	if asJSON {
		b, err := json.Marshal(s)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	body, err := IndentJSON(s.Msg)
	if err != nil {
		return err
	}
	typ := s.Msg.ProtoReflect().Descriptor().FullName()
	var head string
	if s.Seq == 0 {
		head = fmt.Sprintf("%s/%s at seq 0 (no events applied: the initial state; the journal has %d): %s", s.Kind, s.ID, s.Highest, typ)
	} else {
		head = fmt.Sprintf("%s/%s at seq %d of %d, command time %s: %s", s.Kind, s.ID, s.Seq, s.Highest, FormatTime(s.Time), typ)
	}
	_, err = fmt.Fprintf(w, "%s\n%s\n", head, body)
	return err
}

// WriteText writes the report: one line per actor with its status and
// explanation, field diffs indented below, then a summary line.
func (r *VerifyReport) WriteText(w io.Writer) error {
	var b strings.Builder
	width := 0
	for _, c := range r.Checks {
		width = max(width, len(c.Actor()))
	}
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-*s  %-12s ", width, c.Actor(), strings.ToUpper(string(c.Status)))
		for i, n := range c.Notes {
			if i > 0 {
				fmt.Fprintf(&b, "%*s  %-12s ", width, "", "")
			}
			b.WriteString(n + "\n")
		}
		if len(c.Notes) == 0 {
			b.WriteString("\n")
		}
		for _, d := range c.Diff {
			fmt.Fprintf(&b, "%*s  %-12s   %s\n", width, "", "", d)
		}
	}
	fmt.Fprintf(&b, "verify: %d actors, %d events replayed, %d snapshots checked: ", len(r.Checks), r.Events, r.Snapshots)
	if r.OK() {
		b.WriteString("no divergence\n")
	} else {
		fmt.Fprintf(&b, "%d actor(s) with problems\n", r.Faults)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
