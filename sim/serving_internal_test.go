package sim

import (
	"slices"
	"strconv"
	"testing"

	"github.com/triplane-dev/triplane/engine/mocker"
)

// A prompt's hashes from its prefix's are those of hashing it whole.
func TestPromptPrefixHashes(t *testing.T) {
	for sys := range 4 {
		for _, conv := range []int{0, 1, 2, 3, 17, 39} {
			p := newPromptPrefix(sys, conv)
			for tail := range 40 {
				prompt := append(slices.Clone(p.tokens), make([]uint32, tail)...)
				for j := range tail {
					prompt[len(p.tokens)+j] = uint32(7*j + tail)
				}
				if got, want := p.blockHashes(prompt), mocker.BlockHashes(prompt, servingBlockSize); !slices.Equal(got, want) {
					t.Fatalf("sys %d conv %d tail %d: %x, want %x", sys, conv, tail, got, want)
				}
			}
		}
	}
	// A prefix not made of whole blocks: hashed whole.
	odd := &promptPrefix{tokens: []uint32{1, 2, 3}, hashes: []uint64{9}}
	prompt := make([]uint32, 40)
	if got, want := odd.blockHashes(prompt), mocker.BlockHashes(prompt, servingBlockSize); !slices.Equal(got, want) {
		t.Fatalf("odd prefix: %x, want %x", got, want)
	}
}

// request finds a request by its id and nothing by any other spelling.
func TestServingRequestByID(t *testing.T) {
	s := &servingRun{}
	for i := range 120 {
		s.reqs = append(s.reqs, &simRequest{id: "q" + strconv.Itoa(i)})
	}
	for i, r := range s.reqs {
		if s.request(r.id) != r {
			t.Fatalf("request %d not found by %q", i, r.id)
		}
	}
	for _, id := range []string{"", "q", "x1", "q-1", "q+1", "q01", "q00", "q120", "q1a", "q99999999999999999999999", "1"} {
		if r := s.request(id); r != nil {
			t.Fatalf("%q found %s", id, r.id)
		}
	}
}
