package testcluster

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
	"github.com/keymig/keymig/hsm/server"
)

// Served is a cluster.Opener for tests and benchmarks of networked
// clusters in one process: each HSM is a file in the cluster directory,
// served over TLS 1.3 on a free loopback port, and the cluster gets a
// remote client of it, so every call crosses the whole network stack.
// Servers and files are closed at the end of the test.
type Served struct {
	t           testing.TB
	ca, cluster pki.KeyPair

	mu    sync.Mutex
	addrs map[string]string
}

// NewServed makes a customer CA and a cluster certificate for the HSMs a
// Served opener will serve.
func NewServed(t testing.TB) *Served {
	t.Helper()
	ca, err := pki.NewCA("test customer CA", pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	csr, key, err := pki.NewCSR("test-cluster")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.SignCSR(ca, csr, pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &Served{t: t, ca: ca, cluster: pki.KeyPair{CertPEM: cert, KeyPEM: key}, addrs: map[string]string{}}
}

// Create makes the HSM's file, serves it and returns a client of it.
func (s *Served) Create(dir string, spec cluster.MemberSpec) (cluster.Member, error) {
	n, err := node.Create(filepath.Join(dir, spec.ID+".db"), node.Options{
		ID: spec.ID, AZ: spec.AZ, Lineage: spec.Lineage, LineageSecret: spec.LineageSecret, FIPS: spec.Policy.FIPS,
		KeyCapacity: spec.Policy.KeyCapacity, MaxConcurrentOps: spec.Policy.MaxConcurrentOps, KDFIterations: spec.Policy.KDFIterations,
	})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		n.Close()
		return nil, err
	}
	kp, err := pki.IssueHSM(s.cluster, spec.ID, ln.Addr().String(), pki.Options{})
	if err != nil {
		return nil, err
	}
	cfg, err := pki.ServerConfig(pki.ServerTLS{HSM: kp})
	if err != nil {
		return nil, err
	}
	srv := server.New(n, server.Options{TLS: cfg})
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		n.Close()
	})
	s.mu.Lock()
	s.addrs[spec.ID] = ln.Addr().String()
	s.mu.Unlock()
	return s.Open(dir, spec, 0)
}

// Open returns a new client of a served HSM.
func (s *Served) Open(dir string, spec cluster.MemberSpec, _ time.Duration) (cluster.Member, error) {
	s.mu.Lock()
	addr := s.addrs[spec.ID]
	s.mu.Unlock()
	cfg, err := pki.ClientConfig(s.ca.CertPEM, spec.ID, addr, nil)
	if err != nil {
		return nil, err
	}
	return remote.New(spec.ID, addr, cfg), nil
}

// Remove does nothing: the files go with the test's directory.
func (s *Served) Remove(dir, id string) error { return nil }
