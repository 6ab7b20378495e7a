package kvevents

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
)

// fitsSurely's bound is never below the exact size: whenever it says a
// list of events fits a budget, their encoded fields in a batch do, down to
// the largest ids and hashes (ten-byte varints); and an event with unknown
// fields is never judged by the bound.
func TestFitsSurelyIsAnUpperBound(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	value := func() uint64 {
		switch rng.IntN(3) {
		case 0:
			return math.MaxUint64 - rng.Uint64N(1000)
		case 1:
			return rng.Uint64N(200)
		}
		return rng.Uint64()
	}
	for range 2000 {
		var events []*triplanev1.KvEvent
		for range 1 + rng.IntN(6) {
			e := &triplanev1.KvEvent{EventId: value()}
			hashes := make([]uint64, rng.IntN(40))
			for i := range hashes {
				hashes[i] = value()
			}
			switch rng.IntN(3) {
			case 0:
				st := &triplanev1.KvBlocksStored{BlockHashes: hashes}
				if rng.IntN(2) == 0 {
					p := value()
					st.ParentHash = &p
				}
				e.Kind = &triplanev1.KvEvent_Stored{Stored: st}
			case 1:
				e.Kind = &triplanev1.KvEvent_Removed{Removed: &triplanev1.KvBlocksRemoved{BlockHashes: hashes}}
			default:
				e.Kind = &triplanev1.KvEvent_Cleared{Cleared: &triplanev1.KvAllCleared{}}
			}
			events = append(events, e)
		}
		exact := 0
		for _, e := range events {
			exact += eventFieldSize(proto.Size(e))
		}
		for _, budget := range []int{exact - 1, exact, exact + 50, 1 << 20} {
			if fitsSurely(events, budget) && exact > budget {
				t.Fatalf("bound says %d events fit %d bytes; they take %d", len(events), budget, exact)
			}
		}
		if !fitsSurely(events, 1<<20) {
			t.Fatalf("%d small events judged not to fit 1 MiB", len(events))
		}
	}
	// Unknown fields (a decoded event from a newer worker) have no bound.
	e := &triplanev1.KvEvent{EventId: 1}
	e.ProtoReflect().SetUnknown(protowire.AppendTag(nil, 99, protowire.VarintType))
	if fitsSurely([]*triplanev1.KvEvent{e}, 1<<20) {
		t.Fatal("an event with unknown fields judged by the bound")
	}
}

// A Publisher keeps a frozen dump at least dumpKeep (10 s) after its last
// page whatever its heartbeat interval, and never for fewer heartbeats than
// the Log's default: the n-th heartbeat drops it, n-1 intervals at least.
func TestDumpIdleForKeepsTheCopyTenSeconds(t *testing.T) {
	for _, c := range []struct {
		every time.Duration
		want  int
	}{
		{time.Second, 11},
		{10 * time.Millisecond, 1001},
		{3 * time.Second, 5}, // ceil(10/3)+1
		{time.Hour, 5},
	} {
		got := dumpIdleFor(c.every)
		if got != c.want || time.Duration(got-1)*c.every < dumpKeep {
			t.Errorf("dumpIdleFor(%v) = %d, want %d", c.every, got, c.want)
		}
	}
}
