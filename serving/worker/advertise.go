package worker

import (
	"fmt"
	"net"
	"strings"
)

// advertiseHost decides the host peers are told to reach the worker's
// listeners at. An explicit advertise host wins; a specific listen host is
// its own answer; a listen host that means every interface (0.0.0.0, ::)
// cannot be dialled from elsewhere, so the machine's first non-loopback
// address stands in for it.
func advertiseHost(listen, advertise string, addrs func() ([]net.Addr, error)) (string, error) {
	if advertise != "" {
		if err := CheckHost(advertise); err != nil {
			return "", fmt.Errorf("worker: advertise host %q: %w", advertise, err)
		}
		// JoinHostPort adds the brackets an IPv6 address needs.
		return strings.TrimSuffix(strings.TrimPrefix(advertise, "["), "]"), nil
	}
	if ip := net.ParseIP(listen); ip == nil || !ip.IsUnspecified() {
		return listen, nil
	}
	as, err := addrs()
	if err != nil {
		return "", fmt.Errorf("worker: listening on %s (every interface) and no advertise host set; reading this machine's addresses: %w", listen, err)
	}
	var v6 string
	for _, a := range as {
		n, ok := a.(*net.IPNet)
		if !ok || !n.IP.IsGlobalUnicast() {
			continue
		}
		if n.IP.To4() != nil {
			return n.IP.String(), nil
		}
		if v6 == "" {
			v6 = n.IP.String()
		}
	}
	if v6 != "" {
		return v6, nil
	}
	return "", fmt.Errorf("worker: listening on %s (every interface) but this machine has no routable address to advertise; set the advertise host", listen)
}

// CheckHost accepts an IP address (IPv6 with or without brackets) or a
// host name peers can dial: not an address that means every interface, no
// port, nothing but letters, digits, '-', '_' and '.' in a name.
func CheckHost(h string) error {
	bare := h
	if strings.HasPrefix(h, "[") || strings.HasSuffix(h, "]") {
		if !strings.HasPrefix(h, "[") || !strings.HasSuffix(h, "]") {
			return fmt.Errorf("unbalanced brackets")
		}
		bare = h[1 : len(h)-1]
		if net.ParseIP(bare) == nil {
			return fmt.Errorf("brackets hold an IPv6 address (without a zone)")
		}
	}
	ip := net.ParseIP(bare)
	if ip != nil {
		if ip.IsUnspecified() {
			return fmt.Errorf("means every interface, which no peer can dial")
		}
		return nil
	}
	if h == "" || len(h) > 253 {
		return fmt.Errorf("want an IP address or a host name of 1 to 253 characters")
	}
	if strings.Contains(h, ":") {
		return fmt.Errorf("want an IP address or a host name, without a port")
	}
	for _, r := range h {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("%q is not allowed in a host name", r)
		}
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || strings.HasPrefix(label, "-") || strings.HasSuffix(label, "-") {
			return fmt.Errorf("label %q: host name labels are not empty and neither start nor end with '-'", label)
		}
	}
	return nil
}

// advertised is addr (a listener's host:port) with the advertised host.
func (w *Worker) advertised(addr string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return net.JoinHostPort(w.cfg.AdvertiseHost, port)
}
