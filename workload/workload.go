// Package workload reads request traces in the Mooncake format (one JSON
// object per line: timestamp in ms, input_length, output_length, hash_ids of
// the prompt's 512-token blocks) and turns them into prompts whose chained
// block hashes share prefixes exactly where the trace's hash ids do.
package workload

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/cespare/xxhash/v2"
)

// TraceBlockSize is the number of tokens behind one hash id in the trace.
const TraceBlockSize = 512

// Record is one request of a trace.
type Record struct {
	Timestamp    int64   `json:"timestamp"` // ms since the trace's start
	InputLength  int     `json:"input_length"`
	OutputLength int     `json:"output_length"`
	HashIDs      []int64 `json:"hash_ids"`
}

// MaxLine bounds one trace line.
const MaxLine = 1 << 20

// Bounds of one record, far above any real request (the production trace
// peaks at 126k prompt and 2k output tokens), so that a mistyped number
// is an error rather than a prompt of gigabytes, a generation that never
// ends, or an arrival time past what a time.Duration holds.
const (
	MaxInputLength  = 1 << 22
	MaxOutputLength = 1 << 20
	MaxTimestamp    = 1 << 40 // ms: about 35 years
)

// Read parses a trace. A malformed line is an error naming its number.
// limit > 0 stops after that many records.
func Read(r io.Reader, limit int) ([]Record, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), MaxLine)
	var out []Record
	line := 0
	for sc.Scan() {
		line++
		if len(sc.Bytes()) == 0 {
			continue
		}
		var rec Record
		dec := json.NewDecoder(bytesReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rec); err != nil {
			return nil, fmt.Errorf("workload: line %d: %w", line, err)
		}
		if _, err := dec.Token(); !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("workload: line %d: more after the record's closing brace (one JSON object a line)", line)
		}
		if err := rec.Validate(); err != nil {
			return nil, fmt.Errorf("workload: line %d: %w", line, err)
		}
		out = append(out, rec)
		if limit > 0 && len(out) == limit {
			break
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("workload: line %d: %w", line+1, err)
	}
	return out, nil
}

// Validate says what is wrong with a record, as Read checks each one
// (callers building records in memory check them the same way).
func (r *Record) Validate() error {
	switch {
	case r.Timestamp < 0:
		return fmt.Errorf("negative timestamp %d", r.Timestamp)
	case r.Timestamp > MaxTimestamp:
		return fmt.Errorf("timestamp %d ms is past the limit of %d", r.Timestamp, int64(MaxTimestamp))
	case r.InputLength < 1 || r.OutputLength < 1:
		return fmt.Errorf("input_length %d and output_length %d must be positive", r.InputLength, r.OutputLength)
	case r.InputLength > MaxInputLength || r.OutputLength > MaxOutputLength:
		return fmt.Errorf("input_length %d or output_length %d is past the limits (%d, %d)", r.InputLength, r.OutputLength, MaxInputLength, MaxOutputLength)
	case len(r.HashIDs) == 0:
		return errors.New("no hash_ids")
	case (r.InputLength+TraceBlockSize-1)/TraceBlockSize != len(r.HashIDs):
		return fmt.Errorf("%d hash_ids do not cover input_length %d in blocks of %d", len(r.HashIDs), r.InputLength, TraceBlockSize)
	}
	return nil
}

// Tokens returns the prompt of a record: each hash id expands to the same
// 512 tokens wherever it appears, so prompts share prefixes exactly as the
// trace says. The prompt is cut to InputLength.
func (r *Record) Tokens(vocab uint32) []uint32 {
	out := make([]uint32, 0, len(r.HashIDs)*TraceBlockSize)
	var b [16]byte
	for _, h := range r.HashIDs {
		binary.LittleEndian.PutUint64(b[:8], uint64(h))
		for k := range TraceBlockSize {
			binary.LittleEndian.PutUint64(b[8:], uint64(k))
			out = append(out, uint32(xxhash.Sum64(b[:])%uint64(vocab)))
		}
	}
	return out[:r.InputLength]
}

type byteReader struct {
	b []byte
	i int
}

func bytesReader(b []byte) *byteReader { return &byteReader{b: b} }

func (r *byteReader) Read(p []byte) (int, error) {
	if r.i >= len(r.b) {
		return 0, io.EOF
	}
	n := copy(p, r.b[r.i:])
	r.i += n
	return n, nil
}
