package worker

import (
	"errors"
	"net"
	"strings"
	"testing"
)

func TestAdvertiseHost(t *testing.T) {
	addrs := func(ips ...string) func() ([]net.Addr, error) {
		return func() ([]net.Addr, error) {
			var out []net.Addr
			for _, ip := range ips {
				out = append(out, &net.IPNet{IP: net.ParseIP(ip), Mask: net.CIDRMask(24, 32)})
			}
			return out, nil
		}
	}
	for _, c := range []struct {
		listen, advertise string
		ips               []string
		want, err         string
	}{
		{listen: "127.0.0.1", want: "127.0.0.1"},
		{listen: "10.1.2.3", want: "10.1.2.3"},
		{listen: "0.0.0.0", ips: []string{"127.0.0.1", "fe80::1", "10.1.2.3"}, want: "10.1.2.3"},
		{listen: "::", ips: []string{"127.0.0.1", "2001:db8::5"}, want: "2001:db8::5"},
		{listen: "0.0.0.0", advertise: "node-7.example", want: "node-7.example"},
		{listen: "::", advertise: "[2001:db8::1]", want: "2001:db8::1"},
		{listen: "::", advertise: "2001:db8::1", want: "2001:db8::1"},
		// Bad beside good: nothing dialable, an unspecified or port-carrying
		// advertise host.
		{listen: "0.0.0.0", ips: []string{"127.0.0.1"}, err: "no routable address"},
		{listen: "0.0.0.0", advertise: "0.0.0.0", err: "every interface"},
		{listen: "127.0.0.1", advertise: "host:80", err: "without a port"},
		{listen: "127.0.0.1", advertise: "user@host", err: "not allowed"},
		{listen: "127.0.0.1", advertise: "ho%st", err: "not allowed"},
		{listen: "127.0.0.1", advertise: "[::]", err: "every interface"},
		{listen: "127.0.0.1", advertise: "[::1", err: "unbalanced"},
		{listen: "127.0.0.1", advertise: "a..b", err: "label"},
		{listen: "127.0.0.1", advertise: "-a.example", err: "label"},
	} {
		got, err := advertiseHost(c.listen, c.advertise, addrs(c.ips...))
		switch {
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%+v: err %v, want %q", c, err, c.err)
		case c.err == "" && (err != nil || got != c.want):
			t.Errorf("%+v: %q, %v; want %q", c, got, err, c.want)
		}
	}
	if _, err := advertiseHost("0.0.0.0", "", func() ([]net.Addr, error) { return nil, errors.New("no netlink") }); err == nil {
		t.Error("an unreadable interface list should be an error")
	}
}
