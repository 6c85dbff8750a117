package remote_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/hsmtest"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
	"github.com/keymig/keymig/hsm/server"
)

const testKDF = 1000

var officer = hsm.Credentials{User: "admin", Password: "officer-password"}

var seq atomic.Int64

// testPKI is a customer CA and a cluster certificate signed from a CSR.
type testPKI struct {
	ca, cluster pki.KeyPair
}

var (
	pkiOnce   sync.Once
	sharedPKI *testPKI
)

func newPKI(t testing.TB) *testPKI {
	t.Helper()
	ca, err := pki.NewCA("test customer CA", pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	csr, key, err := pki.NewCSR("cluster-test")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.SignCSR(ca, csr, pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.CheckClusterCert(cert, ca.CertPEM, key); err != nil {
		t.Fatal(err)
	}
	return &testPKI{ca: ca, cluster: pki.KeyPair{CertPEM: cert, KeyPEM: key}}
}

func thePKI(t testing.TB) *testPKI {
	pkiOnce.Do(func() { sharedPKI = newPKI(t) })
	return sharedPKI
}

// serve serves m on a free loopback port with a certificate for id and
// returns its address.
func (p *testPKI) serve(t testing.TB, m cluster.Member, certID string, o pki.Options, clientAnchor []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	kp, err := pki.IssueHSM(p.cluster, certID, ln.Addr().String(), o)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pki.ServerConfig(pki.ServerTLS{HSM: kp, Enforce: clientAnchor != nil, ClientAnchorPEM: clientAnchor, PeerAnchorPEM: p.ca.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(m, server.Options{TLS: cfg})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	})
	return ln.Addr().String()
}

func (p *testPKI) client(t testing.TB, id, addr string, cert *pki.KeyPair) *remote.Member {
	t.Helper()
	cfg, err := pki.ClientConfig(p.ca.CertPEM, id, addr, cert)
	if err != nil {
		t.Fatal(err)
	}
	m := remote.New(id, addr, cfg)
	t.Cleanup(func() { m.Close() })
	return m
}

func newNode(t testing.TB, o node.Options) *node.Node {
	t.Helper()
	if o.ID == "" {
		o.ID = fmt.Sprintf("hsm-%06d", seq.Add(1))
	}
	if o.Lineage == "" {
		o.Lineage = "lineage-" + o.ID
	}
	if o.LineageSecret == nil {
		o.LineageSecret = make([]byte, 32)
		rand.Read(o.LineageSecret)
	}
	o.KDFIterations = testKDF
	n, err := node.Create(filepath.Join(t.TempDir(), o.ID+".db"), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if err := n.Bootstrap(context.Background(), officer); err != nil {
		t.Fatal(err)
	}
	return n
}

// remoteBackend is a served node seen through a remote client: a Backend
// whose Close closes the client.
type remoteBackend struct {
	*remote.Member
	opts node.Options
}

// TestConformance runs the contract's suite against one HSM reached through
// the server and the client over TLS.
func TestConformance(t *testing.T) {
	p := thePKI(t)
	mk := func(t *testing.T, o node.Options) hsm.Backend {
		n := newNode(t, o)
		addr := p.serve(t, n, n.ID(), pki.Options{}, nil)
		return &remoteBackend{Member: p.client(t, n.ID(), addr, nil), opts: o}
	}
	hsmtest.Run(t, hsmtest.Harness{
		New: func(t *testing.T) (hsm.Backend, hsm.Credentials) {
			o := node.Options{FIPS: true, KeyCapacity: 250, AZ: "eu-west-1a", ID: fmt.Sprintf("hsm-%06d", seq.Add(1))}
			o.LineageSecret = make([]byte, 32)
			rand.Read(o.LineageSecret)
			o.Lineage = "lineage-" + o.ID
			return mk(t, o), officer
		},
		NewClone: func(t *testing.T, b hsm.Backend) (hsm.Backend, hsm.Credentials) {
			o := b.(*remoteBackend).opts
			o.ID = fmt.Sprintf("hsm-%06d", seq.Add(1))
			return mk(t, o), officer
		},
		Capacity: 250,
		FIPS:     true,
	})
}

// servedHSMs is a cluster.Opener for tests: it makes each HSM as a local
// file, serves it on a loopback port, and hands the cluster a remote client
// of it, so the cluster runs over the network end to end.
type servedHSMs struct {
	t     testing.TB
	p     *testPKI
	wrap  func(cluster.Member) cluster.Member // what the server serves; nil: the node
	mu    sync.Mutex
	nodes map[string]*node.Node
	addrs map[string]string
}

func (s *servedHSMs) Create(dir string, spec cluster.MemberSpec) (cluster.Member, error) {
	n, err := node.Create(filepath.Join(dir, spec.ID+".db"), node.Options{
		ID: spec.ID, AZ: spec.AZ, Lineage: spec.Lineage, LineageSecret: spec.LineageSecret,
		FIPS: spec.Policy.FIPS, KeyCapacity: spec.Policy.KeyCapacity, KDFIterations: testKDF,
	})
	if err != nil {
		return nil, err
	}
	s.t.Cleanup(func() { n.Close() })
	var served cluster.Member = n
	if s.wrap != nil {
		served = s.wrap(n)
	}
	addr := s.p.serve(s.t, served, spec.ID, pki.Options{}, nil)
	s.mu.Lock()
	s.nodes[spec.ID], s.addrs[spec.ID] = n, addr
	s.mu.Unlock()
	return s.p.client(s.t, spec.ID, addr, nil), nil
}

func (s *servedHSMs) Open(dir string, spec cluster.MemberSpec, _ time.Duration) (cluster.Member, error) {
	s.mu.Lock()
	addr := s.addrs[spec.ID]
	s.mu.Unlock()
	return s.p.client(s.t, spec.ID, addr, nil), nil
}

func (s *servedHSMs) Remove(dir, id string) error { return nil }

func newServedCluster(t *testing.T, n int, wrap ...func(cluster.Member) cluster.Member) (*cluster.Cluster, *servedHSMs) {
	t.Helper()
	s := &servedHSMs{t: t, p: thePKI(t), nodes: map[string]*node.Node{}, addrs: map[string]string{}}
	if len(wrap) > 0 {
		s.wrap = wrap[0]
	}
	c, err := cluster.Init(context.Background(), cluster.InitOptions{Dir: filepath.Join(t.TempDir(), "c"), HSMs: n, Officer: officer, KDFIterations: testKDF, KeyCapacity: 250, Members: s})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, s
}

// TestClusterConformance runs the suite against a cluster of two remote
// HSMs: balancing, replication, quorum and failover over the network.
func TestClusterConformance(t *testing.T) {
	hsmtest.Run(t, hsmtest.Harness{
		New: func(t *testing.T) (hsm.Backend, hsm.Credentials) {
			c, _ := newServedCluster(t, 2)
			return c, officer
		},
		Capacity: 250,
		FIPS:     true,
	})
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestErrorsSurviveTheWire checks that codes, retryability and the one
// unwrap failure reach the client as the HSM gave them.
func TestErrorsSurviveTheWire(t *testing.T) {
	p := thePKI(t)
	n := newNode(t, node.Options{FIPS: true})
	m := p.client(t, n.ID(), p.serve(t, n, n.ID(), pki.Options{}, nil), nil)
	ctx := ctxT(t)
	s, err := m.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.GetKey(ctx, 0x1234)
	if !errors.Is(err, hsm.ErrNotFound) || hsm.IsRetryable(err) {
		t.Fatalf("get a missing key: %v, want a not-found error that is not retryable", err)
	}
	if _, err := m.Login(ctx, hsm.Credentials{User: "admin", Password: "wrong"}); !errors.Is(err, hsm.ErrPermission) {
		t.Fatalf("wrong password: %v", err)
	}
	n.SetFault(hsm.Fault{Throttle: 1})
	_, err = s.ListKeys(ctx, hsm.Filter{})
	if !errors.Is(err, hsm.ErrThrottled) || !hsm.IsRetryable(err) {
		t.Fatalf("throttled HSM: %v, want a retryable throttled error", err)
	}
	n.SetFault(hsm.Fault{})
	fs := s.(hsm.FullSession)
	if err := fs.CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
		t.Fatal(err)
	}
	alice, err := m.Login(ctx, hsm.Credentials{User: "alice", Password: "correct-horse"})
	if err != nil {
		t.Fatal(err)
	}
	kek, err := alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "kek", Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true, hsm.AttrWrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = alice.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: make([]byte, 40), Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "x"}})
	if !errors.Is(err, hsm.ErrUnwrapFailed) || err.Error() != hsm.ErrUnwrapFailed.Error() {
		t.Fatalf("unwrap of garbage: %v, want exactly %v", err, hsm.ErrUnwrapFailed)
	}
}

// TestUnreachable: a daemon that is not there is an unavailable error that
// names the HSM and its address, so the cluster fails over.
func TestUnreachable(t *testing.T) {
	p := thePKI(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	m := p.client(t, "hsm-gone", addr, nil)
	_, err = m.Login(ctxT(t), officer)
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "hsm-gone") || !strings.Contains(err.Error(), addr) {
		t.Fatalf("login on a closed port: %v, want unavailable naming hsm-gone and %s", err, addr)
	}
}

// TestDeadlineTravels: the server gives up at the caller's deadline.
func TestDeadlineTravels(t *testing.T) {
	p := thePKI(t)
	n := newNode(t, node.Options{})
	m := p.client(t, n.ID(), p.serve(t, n, n.ID(), pki.Options{}, nil), nil)
	s, err := m.Login(ctxT(t), officer)
	if err != nil {
		t.Fatal(err)
	}
	n.SetFault(hsm.Fault{Latency: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = s.ListKeys(ctx, hsm.Filter{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call past its deadline: %v, want context.DeadlineExceeded", err)
	}
	if got := n.InFlight(); got != 0 {
		t.Errorf("%d operations still in flight on the HSM after the deadline", got)
	}
}

// TestSessionKeysDieWithTheConnection: closing the client's connection ends
// its sessions on the HSM, and their session keys with them.
func TestSessionKeysDieWithTheConnection(t *testing.T) {
	p := thePKI(t)
	n := newNode(t, node.Options{})
	addr := p.serve(t, n, n.ID(), pki.Options{}, nil)
	ctx := ctxT(t)
	m1 := p.client(t, n.ID(), addr, nil)
	s1, err := m1.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.(hsm.FullSession).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
		t.Fatal(err)
	}
	alice := hsm.Credentials{User: "alice", Password: "correct-horse"}
	a1, err := m1.Login(ctx, alice)
	if err != nil {
		t.Fatal(err)
	}
	k, err := a1.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "ephemeral", Session: true}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a1.GetKey(ctx, k.Ref); err != nil {
		t.Fatalf("the session key is not there in its own session: %v", err)
	}
	// Another client's session of the same user does not see it.
	m2 := p.client(t, n.ID(), addr, nil)
	a2, err := m2.Login(ctx, alice)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a2.GetKey(ctx, k.Ref); !errors.Is(err, hsm.ErrNotFound) {
		t.Fatalf("another client's session sees the session key: %v", err)
	}
	m1.Close()
	// The same session object logs in again on a new connection; the key is gone.
	_, err = a1.GetKey(ctx, k.Ref)
	if !errors.Is(err, hsm.ErrNotFound) {
		t.Fatalf("session key after its connection closed: %v, want not-found", err)
	}
}

// manyKeys is an HSM whose peer listing holds n keys, made up: what is
// tested is the stream, not the HSM.
type manyKeys struct {
	cluster.Member
	n int
}

func (m manyKeys) PeerListKeys(ctx context.Context) ([]hsm.KeyInfo, error) {
	keys := make([]hsm.KeyInfo, m.n)
	for i := range keys {
		keys[i] = hsm.KeyInfo{Ref: hsm.KeyRef(i + 1), Label: fmt.Sprint("k", i), ID: hsm.Bytes(fmt.Sprintf("%06d", i)),
			Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 256, KCV: hsm.Bytes{1, 2, 3}, Owner: "alice",
			Attrs: hsm.Attributes{Token: true, Encrypt: true}, Coverage: hsm.Coverage{HSMs: []string{m.ID()}}}
	}
	return keys, nil
}

// TestListingStreams lists 16,666 keys through the stream and checks
// every key arrives once, in handle order, intact.
func TestListingStreams(t *testing.T) {
	p := thePKI(t)
	const keys = 16666
	n := newNode(t, node.Options{})
	m := p.client(t, n.ID(), p.serve(t, manyKeys{Member: n, n: keys}, n.ID(), pki.Options{}, nil), nil)
	got, err := m.PeerListKeys(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != keys {
		t.Fatalf("listed %d keys, want %d", len(got), keys)
	}
	for i, k := range got {
		if k.Ref != hsm.KeyRef(i+1) || k.Label != fmt.Sprint("k", i) || k.KCV.String() != "010203" || !k.Attrs.Token {
			t.Fatalf("key %d arrived as %+v", i, k)
		}
	}
}

// exportCounter counts the masked exports the cluster asks of an HSM.
type exportCounter struct {
	cluster.Member
	n *atomic.Int64
}

func (e exportCounter) PeerExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	e.n.Add(1)
	return e.Member.PeerExportMasked(ctx, ref)
}

// TestNewKeysComeWithTheirMaskedCopies checks that a remote HSM answers a
// call that makes token keys with their masked objects, so that the
// cluster copies them to its other HSM with no export call, and that the
// copies are the keys as made.
func TestNewKeysComeWithTheirMaskedCopies(t *testing.T) {
	ctx := ctxT(t)
	var exports atomic.Int64
	c, _ := newServedCluster(t, 2, func(m cluster.Member) cluster.Member { return exportCounter{m, &exports} })
	co, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	defer co.Logout(ctx)
	if err := co.(hsm.Users).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
		t.Fatal(err)
	}
	bs, err := c.Login(ctx, hsm.Credentials{User: "alice", Password: "correct-horse"})
	if err != nil {
		t.Fatal(err)
	}
	s := bs.(hsm.FullSession)
	defer s.Logout(ctx)
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "kek", Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	payload, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Label: "payload", Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true}}})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: payload.Ref})
	if err != nil {
		t.Fatal(err)
	}
	unwrapped, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "unwrapped"}})
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
	if err != nil {
		t.Fatal(err)
	}
	if n := exports.Load(); n != 0 {
		t.Errorf("the cluster asked its HSMs for %d masked exports to copy new keys, want none", n)
	}
	for _, k := range []hsm.KeyInfo{kek, payload, unwrapped, pub, priv} {
		got, err := s.GetKey(ctx, k.Ref)
		if err != nil {
			t.Fatal(err)
		}
		if got.Coverage.Count() != 2 || len(got.Coverage.Inconsistent) > 0 || !bytes.Equal(got.KCV, k.KCV) {
			t.Errorf("key %s (%s): coverage %s, KCV %s; want the same key on both HSMs, KCV %s", k.Ref, k.Label, got.Coverage, got.KCV, k.KCV)
		}
	}
}
