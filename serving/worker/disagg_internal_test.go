package worker

import (
	"slices"
	"testing"

	"github.com/triplane-dev/triplane/engine"
	"github.com/triplane-dev/triplane/engine/mocker"
)

// A decode worker imports the prompt's full blocks but the one holding the
// last token, which its engine computes anyway: every imported block is
// then taken by the request, none is left marked as imported (which would
// count the next request's reuse of it as a miss).
func TestImportBlocksAreTheOnesTheEngineTakes(t *testing.T) {
	const bs = 4
	e, err := mocker.New(mocker.Config{BlockSize: bs, NumBlocks: 64, BlockBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{0, 1, 4, 5, 16, 17} {
		toks := make([]uint32, n)
		for i := range toks {
			toks[i] = uint32(100*n + i)
		}
		got := importBlocks(toks, bs)
		want := max(n-1, 0) / bs
		if len(got) != want || !slices.Equal(got, mocker.BlockHashes(toks, bs)[:want]) {
			t.Fatalf("%d tokens: %d blocks to import, want the first %d", n, len(got), want)
		}
		if n == 0 {
			continue
		}
		// Imported, then the request admitted: it finds all of them cached.
		id := "r" + string(rune('a'+n))
		res, err := e.ReserveImport(id, got)
		if err != nil {
			t.Fatal(err)
		}
		src := func(i int) []byte {
			b := make([]byte, 64)
			mocker.Fill(b, got[res.Cached+i])
			return b
		}
		if _, err := e.CommitImportFrom(id, src); err != nil {
			t.Fatal(err)
		}
		if err := e.Add(engine.Request{ID: id, Tokens: toks, MaxTokens: 1}); err != nil {
			t.Fatal(err)
		}
		st := e.Step()
		if len(st.Outputs) != 1 || st.Outputs[0].CachedTokens != want*bs {
			t.Fatalf("%d tokens: outputs %+v, want %d cached tokens", n, st.Outputs, want*bs)
		}
	}
}
