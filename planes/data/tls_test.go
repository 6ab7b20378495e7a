package data

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/triplane-dev/triplane/planetest"
)

// testPKI is a CA with one server and one client certificate.
type testPKI struct {
	pool           *x509.CertPool
	server, client tls.Certificate
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, usage x509.ExtKeyUsage) tls.Certificate {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "leaf"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
	}
	p := &testPKI{pool: x509.NewCertPool(), server: leaf(2, x509.ExtKeyUsageServerAuth), client: leaf(3, x509.ExtKeyUsageClientAuth)}
	p.pool.AddCert(ca)
	return p
}

func TestTokenRefusesUnauthenticatedPeer(t *testing.T) {
	ctx := ctxT(t)
	r := newReceiver(t, 4096, 2, func(c *ServerConfig) { c.Token = "s3cret" })
	src, ops := source(r, 5)
	for _, tok := range []string{"", "wrong"} {
		tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1, Token: tok}).Dial(ctx, r.peer())
		if err == nil {
			err = tr.Write(ctx, ops)
			tr.Close()
		}
		if err == nil {
			t.Fatalf("token %q accepted", tok)
		}
	}
	// The client can see the refusal before the receiver has counted it:
	// wait for the count, with a deadline.
	rejected := func() float64 { return r.metrics.RejectedCount("tcp", "auth") }
	planetest.Poll(t, 10*time.Second, time.Millisecond, func() bool { return rejected() == 2 },
		func() string { return fmt.Sprintf("auth rejections %v, want 2", rejected()) })
	if r.region.Bytes()[0] != 0 {
		t.Fatal("unauthenticated bytes landed")
	}
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 2, Token: "s3cret"}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if err := tr.Write(ctx, ops); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(src.Bytes(), r.region.Bytes()) {
		t.Fatal("regions differ")
	}
}

func TestMutualTLS(t *testing.T) {
	ctx := ctxT(t)
	pki := newPKI(t)
	r := newReceiver(t, 64<<10, 4, func(c *ServerConfig) {
		c.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}, ClientCAs: pki.pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}
	})
	src, ops := source(r, 6)
	// No client certificate: refused.
	tr, err := NewDialer(DialOptions{Prefer: "tcp", Lanes: 1, TLS: &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS13}}).Dial(ctx, r.peer())
	if err == nil {
		err = tr.Write(ctx, ops)
		tr.Close()
	}
	if err == nil {
		t.Fatal("peer without a client certificate accepted")
	}
	tr, err = NewDialer(DialOptions{Prefer: "tcp", Lanes: 2, TLS: &tls.Config{RootCAs: pki.pool, Certificates: []tls.Certificate{pki.client}, MinVersion: tls.VersionTLS13}}).Dial(ctx, r.peer())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if err := tr.Write(ctx, ops); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(src.Bytes(), r.region.Bytes()) {
		t.Fatal("regions differ")
	}
}
