package control_test

import (
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	triplanev1 "github.com/triplane-dev/triplane/messages/triplane/v1"
	"github.com/triplane-dev/triplane/planes/control"
	"github.com/triplane-dev/triplane/planetest"
)

func newInstance() *triplanev1.InstanceInfo { return &triplanev1.InstanceInfo{} }

// FuzzDecodeInstance: whatever bytes sit under an instance key, decoding
// returns a value or an error, never panics, and what decodes round-trips.
func FuzzDecodeInstance(f *testing.F) {
	good, _ := protojson.Marshal(instance("w1"))
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"instance_id":1}`))
	f.Add([]byte(`{"health":{"state":"HEALTH_STATE_NOPE"}}`))
	f.Add([]byte("\x00\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := control.Decode(b, newInstance)
		if err != nil {
			return
		}
		again, err := protojson.Marshal(v)
		if err != nil {
			t.Fatalf("decoded value does not marshal: %v", err)
		}
		w, err := control.Decode(again, newInstance)
		if err != nil || !proto.Equal(v, w) {
			t.Fatalf("round trip: %v\n%v\n%v", err, v, w)
		}
	})
}

// A record from a newer version, with a field this one does not know,
// decodes (rolling upgrades); a known field of the wrong type does not.
func TestDecodeIgnoresUnknownFields(t *testing.T) {
	good, _ := protojson.Marshal(instance("w1"))
	newer := append([]byte(`{"fieldFromANewerVersion":{"x":[1,2]},`), good[1:]...)
	v, err := control.Decode(newer, newInstance)
	if err != nil || !proto.Equal(v, instance("w1")) {
		t.Fatalf("a newer record: %v %v", v, err)
	}
	if _, err := control.Decode([]byte(`{"instanceId":7}`), newInstance); err == nil {
		t.Fatal("a known field of the wrong type decoded")
	}
}

// A value that does not decode is ignored and counted; the good ones next
// to it are served.
func TestBadValueIsIgnoredAndCounted(t *testing.T) {
	e := planetest.StartEtcd(t)
	ctx := ctxT(t)
	cli := e.Client(t)
	good, _ := protojson.Marshal(instance("good"))
	if _, err := cli.Put(ctx, "/triplane/test/instances/worker/generate/good", string(good)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "/triplane/test/instances/worker/generate/bad", "not json {"); err != nil {
		t.Fatal(err)
	}
	// Records that decode but do not name their own key: no instance id,
	// and another record's id (a router would refuse a decision with
	// either among its candidates, failing every request).
	for key, in := range map[string]*triplanev1.InstanceInfo{"noid": instance(""), "dup": instance("good")} {
		b, _ := protojson.Marshal(in)
		if _, err := cli.Put(ctx, "/triplane/test/instances/worker/generate/"+key, string(b)); err != nil {
			t.Fatal(err)
		}
	}
	m := control.NewMetrics(nil)
	d, err := control.NewDiscovery(cli, control.DiscoveryConfig{Namespace: "test", Component: "worker", Endpoint: "generate",
		Cache: control.CacheConfig{Metrics: m}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	planetest.EventuallyWithin(t, 5*time.Second, "good instance listed", func() bool { return ids(d.Instances()) == "good" })
	if !d.Has("good") || d.Has("noid") || d.Has("dup") || d.Has("bad") {
		t.Fatal("Has does not match the instances listed")
	}
	if n := planetest.CounterValue(t, m.DecodeErrors); n != 3 {
		t.Fatalf("decode_errors_total = %v, want 3", n)
	}
	if _, err := control.NewDiscovery(cli, control.DiscoveryConfig{Namespace: "test", Component: "a/b"}); err == nil {
		t.Fatal("component with a slash accepted")
	}
}
