package replay

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"html/template"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/triplane-dev/triplane/actors"
)

// DefaultLimit bounds the events per actor of a timeline.
const DefaultLimit = 1000

// Lane is one actor of a timeline.
type Lane struct {
	Kind, ID string
	// Highest is the actor's highest sequence in the journal.
	Highest uint64
	// Shown counts the events of the actor in the timeline.
	Shown int
	// Truncated: more events matched than the limit; the timeline holds
	// the first Shown of them, up to seq LastSeq.
	Truncated bool
	LastSeq   uint64
}

// Actor is the lane's actor as "kind/id".
func (l *Lane) Actor() string { return l.Kind + "/" + l.ID }

// Timeline is the events of several actors, merged in time order.
type Timeline struct {
	Lanes []Lane
	// Events of every lane, by command time; ties keep lane order, then
	// sequence order.
	Events []*Event
	// Lane[i] is the lane index of Events[i].
	Lane       []int
	Start, End time.Time
	Limit      int
}

// Truncated says whether any lane was cut at the limit.
func (t *Timeline) Truncated() bool {
	for _, l := range t.Lanes {
		if l.Truncated {
			return true
		}
	}
	return false
}

// Timeline reads the events of the given actors selected by f, at most
// limit per actor (limit <= 0: DefaultLimit), and merges them by time.
func (r *Replayer) Timeline(ctx context.Context, addrs []actors.Address, f Filter, limit int) (*Timeline, error) {
	if len(addrs) == 0 {
		return nil, errors.New("replay: timeline: no actors given")
	}
	if limit <= 0 {
		limit = DefaultLimit
	}
	t := &Timeline{Limit: limit}
	seen := map[actors.Address]bool{}
	type laneEvent struct {
		ev   *Event
		lane int
	}
	var all []laneEvent
	for _, a := range addrs {
		if seen[a] {
			continue
		}
		seen[a] = true
		pos, err := r.highest(ctx, a.Kind, a.ID)
		if err != nil {
			return nil, err
		}
		lane := Lane{Kind: a.Kind, ID: a.ID, Highest: pos.Seq}
		idx := len(t.Lanes)
		err = r.Events(ctx, a.Kind, a.ID, f, func(e *Event) error {
			if lane.Shown == limit {
				lane.Truncated = true
				return errStop
			}
			lane.Shown++
			lane.LastSeq = e.Seq
			all = append(all, laneEvent{e, idx})
			return nil
		})
		if err != nil {
			return nil, err
		}
		t.Lanes = append(t.Lanes, lane)
	}
	sort.SliceStable(all, func(i, j int) bool {
		a, b := all[i], all[j]
		if !a.ev.Time.Equal(b.ev.Time) {
			return a.ev.Time.Before(b.ev.Time)
		}
		if a.lane != b.lane {
			return a.lane < b.lane
		}
		return a.ev.Seq < b.ev.Seq
	})
	for _, le := range all {
		t.Events = append(t.Events, le.ev)
		t.Lane = append(t.Lane, le.lane)
	}
	if len(all) > 0 {
		t.Start, t.End = all[0].ev.Time, all[len(all)-1].ev.Time
	}
	return t, nil
}

// maxNoteFields bounds the fields shown in a Mermaid note.
const maxNoteFields = 120

// mermaidText escapes s for the text of a Mermaid note or participant:
// Mermaid ends a statement at ';' or a newline, reads '#' as the start of
// an entity code, and would render '<' '>' as markup.
func mermaidText(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '#':
			b.WriteString("#35;")
		case ';':
			b.WriteString("#59;")
		case '<':
			b.WriteString("#lt;")
		case '>':
			b.WriteString("#gt;")
		case '\n', '\r', '\t':
			b.WriteByte(' ')
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8Start(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

func utf8Start(b byte) bool { return b&0xC0 != 0x80 }

// WriteMermaid writes the timeline as a Mermaid sequence diagram: one
// participant per actor, one note per event (sequence, time, type and
// compact fields), in time order, with a note spanning every actor
// whenever the date changes.
func (t *Timeline) WriteMermaid(w io.Writer) error {
	var b strings.Builder
	b.WriteString("sequenceDiagram\n")
	fmt.Fprintf(&b, "    %%%% triplane replay timeline: %d events of %d actors, %s to %s\n",
		len(t.Events), len(t.Lanes), FormatTime(t.Start), FormatTime(t.End))
	for i, l := range t.Lanes {
		fmt.Fprintf(&b, "    participant A%d as %s\n", i, mermaidText(l.Actor()))
	}
	span := "A0"
	if len(t.Lanes) > 1 {
		span = fmt.Sprintf("A0,A%d", len(t.Lanes)-1)
	}
	day := ""
	for i, e := range t.Events {
		ts := e.Time.UTC()
		if d := ts.Format("2006-01-02"); d != day {
			day = d
			fmt.Fprintf(&b, "    Note over %s: %s (UTC)\n", span, d)
		}
		fmt.Fprintf(&b, "    Note over A%d: %s\n", t.Lane[i], mermaidText(fmt.Sprintf("seq %d, %s, %s %s",
			e.Seq, ts.Format("15:04:05.000"), e.ShortType(), clip(e.Fields(), maxNoteFields))))
	}
	for i, l := range t.Lanes {
		if l.Truncated {
			fmt.Fprintf(&b, "    Note over A%d: %s\n", i, mermaidText(fmt.Sprintf(
				"truncated: the first %d events (up to seq %d of %d), narrow with --from/--since or raise --limit",
				l.Shown, l.LastSeq, l.Highest)))
		}
	}
	if len(t.Events) == 0 {
		fmt.Fprintf(&b, "    Note over %s: no events match\n", span)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// htmlMark is one event as the HTML page shows it.
type htmlMark struct {
	Anchor          string
	Lane            int
	Actor           string
	Seq             uint64
	Time            string
	Type, ShortType string
	Color           int
	Command         string
	Fields, Pretty  string
	Left            string // percent of the lane's width
	Top             int    // px: stacks events at the same place
	StreamSeq       uint64
}

type htmlLane struct {
	Lane
	Marks []htmlMark
}

type htmlTick struct {
	Left  string
	Label string
	Class string // " first", " last" or ""
}

type htmlType struct {
	Name  string
	Color int
	Count int
}

type htmlPage struct {
	Title  string
	Start  string
	End    string
	Events int
	Lanes  []htmlLane
	Rows   []htmlMark
	Ticks  []htmlTick
	Types  []htmlType
	Limit  int
}

const palette = 8

func typeColor(name string) int {
	h := fnv.New32a()
	h.Write([]byte(name))
	return int(h.Sum32() % palette)
}

// WriteHTML writes the timeline as one self-contained HTML page (no
// scripts, no external resources): a lane per actor with each event placed
// by its time, its details on hover and in a table below.
func (t *Timeline) WriteHTML(w io.Writer) error {
	page := htmlPage{
		Start: FormatTime(t.Start), End: FormatTime(t.End), Events: len(t.Events), Limit: t.Limit,
	}
	names := make([]string, len(t.Lanes))
	for i, l := range t.Lanes {
		names[i] = l.Actor()
		page.Lanes = append(page.Lanes, htmlLane{Lane: l})
	}
	page.Title = strings.Join(names, ", ")
	span := t.End.Sub(t.Start)
	pos := func(at time.Time) float64 {
		if span <= 0 {
			return 50
		}
		return 100 * float64(at.Sub(t.Start)) / float64(span)
	}
	types := map[string]*htmlType{}
	stack := map[string]int{} // lane/left -> events already there
	for i, e := range t.Events {
		lane := t.Lane[i]
		left := strconv.FormatFloat(pos(e.Time), 'f', 3, 64)
		key := strconv.Itoa(lane) + "/" + left
		top := 4 + 10*(stack[key]%4)
		stack[key]++
		pretty, err := IndentJSON(e.Msg)
		if err != nil {
			pretty = err.Error()
		}
		color := typeColor(e.Type)
		m := htmlMark{
			Anchor: fmt.Sprintf("ev-%d-%d", lane, e.Seq), Lane: lane, Actor: e.Actor(), Seq: e.Seq,
			Time: FormatTime(e.Time), Type: e.Type, ShortType: e.ShortType(), Color: color,
			Command: e.CommandID, Fields: clip(e.Fields(), 300), Pretty: pretty,
			Left: left, Top: top, StreamSeq: e.StreamSeq,
		}
		page.Lanes[lane].Marks = append(page.Lanes[lane].Marks, m)
		page.Rows = append(page.Rows, m)
		if types[e.Type] == nil {
			types[e.Type] = &htmlType{Name: e.Type, Color: color}
		}
		types[e.Type].Count++
	}
	for _, ty := range types {
		page.Types = append(page.Types, *ty)
	}
	sort.Slice(page.Types, func(i, j int) bool { return page.Types[i].Name < page.Types[j].Name })
	if len(t.Events) > 0 {
		for _, f := range []float64{0, 0.25, 0.5, 0.75, 1} {
			at := t.Start.Add(time.Duration(f * float64(span)))
			label := at.UTC().Format("15:04:05.000")
			if f == 0 || f == 1 {
				label = FormatTime(at)
			}
			if span <= 0 && f != 0.5 {
				continue
			}
			tick := htmlTick{Left: strconv.FormatFloat(pos(at), 'f', 3, 64), Label: label}
			switch {
			case span > 0 && f == 0:
				tick.Class = " first"
			case span > 0 && f == 1:
				tick.Class = " last"
			}
			page.Ticks = append(page.Ticks, tick)
		}
	}
	if err := timelineHTML.Execute(w, page); err != nil {
		return fmt.Errorf("replay: write HTML timeline: %w", err)
	}
	return nil
}

var timelineHTML = template.Must(template.New("timeline").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Triplane timeline: {{.Title}}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
.meta { color: #555; margin: 0 0 1em; }
.warn { background: #fff4d6; border: 1px solid #e0b84c; padding: .4em .7em; }
.chart { border: 1px solid #ccc; padding: .5em 1em 0 1em; margin-bottom: 1.5em; }
.row { display: flex; align-items: stretch; border-bottom: 1px solid #eee; }
.label { width: 14em; flex: none; padding: .6em .5em .6em 0; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.track { position: relative; flex: 1; height: 48px; margin: 0 1em; }
.track::before { content: ""; position: absolute; left: 0; right: 0; top: 24px; border-top: 1px dashed #bbb; }
.axis .track { height: 2.2em; }
.axis .track::before { display: none; }
.tick { position: absolute; top: 0; transform: translateX(-50%); font-size: 11px; color: #666; white-space: nowrap; }
.tick::after { content: ""; position: absolute; left: 50%; top: 1.6em; height: .5em; border-left: 1px solid #999; }
.ev { position: absolute; width: 12px; height: 12px; margin-left: -6px; border-radius: 50%; border: 1px solid #333; display: block; }
.ev:hover, .ev:focus { outline: 2px solid #000; z-index: 2; }
.tip { display: none; position: absolute; left: 14px; top: -4px; z-index: 3; background: #fff; border: 1px solid #888;
  box-shadow: 0 2px 6px rgba(0,0,0,.2); padding: .4em .6em; min-width: 16em; max-width: 36em; color: #222; font-size: 12px; }
.tip code { white-space: pre-wrap; overflow-wrap: anywhere; }
.ev:hover .tip, .ev:focus .tip { display: block; }
.c0 { background: #4e79a7; } .c1 { background: #f28e2b; } .c2 { background: #e15759; } .c3 { background: #76b7b2; }
.c4 { background: #59a14f; } .c5 { background: #edc948; } .c6 { background: #b07aa1; } .c7 { background: #ff9da7; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 50%; border: 1px solid #333; margin-right: .3em; }
.legend .sw { margin-left: 1em; }
.tick.first { transform: none; } .tick.first::after { left: 0; }
.tick.last { transform: translateX(-100%); } .tick.last::after { left: 100%; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: .25em .6em; border-bottom: 1px solid #eee; }
td.mono, td pre, summary code { font-family: ui-monospace, monospace; font-size: 12px; }
td pre { margin: .3em 0; white-space: pre-wrap; overflow-wrap: anywhere; }
tr:target { background: #fff4d6; }
</style>
</head>
<body>
<h1>Triplane timeline</h1>
<p class="meta">{{.Events}} events of {{len .Lanes}} actors ({{.Title}}), from {{.Start}} to {{.End}}. Times are command times in UTC. Hover over an event for its fields; click it for its row below.</p>
{{range .Lanes}}{{if .Truncated}}<p class="warn">{{.Actor}}: truncated to the first {{.Shown}} events (up to seq {{.LastSeq}} of {{.Highest}}); narrow with --from/--since or raise --limit (now {{$.Limit}}).</p>
{{end}}{{end}}{{if not .Events}}<p class="warn">No events match.</p>
{{end}}<div class="chart">
<div class="row axis"><div class="label"></div><div class="track">{{range .Ticks}}<span class="tick{{.Class}}" style="left: {{.Left}}%">{{.Label}}</span>{{end}}</div></div>
{{range .Lanes}}<div class="row"><div class="label">{{.Actor}}<br><small>events shown: {{.Shown}}, highest seq {{.Highest}}</small></div><div class="track">
{{range .Marks}}<a class="ev c{{.Color}}" href="#{{.Anchor}}" style="left: {{.Left}}%; top: {{.Top}}px" aria-label="{{.Actor}} seq {{.Seq}} {{.ShortType}}"><span class="tip"><b>{{.Actor}} #{{.Seq}}</b> {{.Type}}<br>{{.Time}}{{if .Command}}<br>command {{.Command}}{{end}}<br><code>{{.Fields}}</code></span></a>
{{end}}</div></div>
{{end}}<p class="legend">{{range .Types}}<span class="sw c{{.Color}}"></span>{{.Name}} ({{.Count}}){{end}}</p>
</div>
<table>
<thead><tr><th>time (UTC)</th><th>actor</th><th>seq</th><th>type</th><th>command</th><th>fields</th></tr></thead>
<tbody>
{{range .Rows}}<tr id="{{.Anchor}}"><td class="mono">{{.Time}}</td><td class="mono">{{.Actor}}</td><td>{{.Seq}}</td><td><span class="sw c{{.Color}}"></span>{{.ShortType}}</td><td class="mono">{{.Command}}</td><td><details><summary><code>{{.Fields}}</code></summary><pre>{{.Pretty}}</pre><small>{{.Type}}, stream seq {{.StreamSeq}}</small></details></td></tr>
{{end}}</tbody>
</table>
</body>
</html>
`))
