package event_test

import (
	"testing"

	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/event"
)

// FuzzDecode feeds arbitrary bytes to the decoders of the plane's wire
// messages: they return a value or an error, never panic, and what decodes
// re-encodes.
func FuzzDecode(f *testing.F) {
	for _, m := range []proto.Message{
		&triplanev1.EventProbe{Seq: 1, Text: "x", Body: []byte{1, 2}},
		&triplanev1.LoadReport{InstanceId: "w1", ActiveRequests: 3, KvBlocksTotal: 100, CacheHitRate: 0.5},
	} {
		data, _ := proto.Marshal(m)
		f.Add(data)
	}
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		if p, err := event.Decode[*triplanev1.EventProbe](data); err == nil {
			if _, err := proto.Marshal(p); err != nil {
				t.Fatalf("decoded probe does not encode: %v", err)
			}
		}
		if r, err := event.Decode[*triplanev1.LoadReport](data); err == nil {
			if _, err := proto.Marshal(r); err != nil {
				t.Fatalf("decoded load report does not encode: %v", err)
			}
		}
	})
}
