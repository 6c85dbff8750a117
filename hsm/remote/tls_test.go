package remote_test

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
)

// wantRefused logs in through m and checks the handshake was refused with
// a permission error that says which check failed.
func wantRefused(t *testing.T, m *remote.Member, parts ...string) {
	t.Helper()
	_, err := m.Login(ctxT(t), officer)
	if err == nil {
		t.Fatal("login succeeded, want the TLS handshake refused")
	}
	if hsm.CodeOf(err) != hsm.CodePermission || hsm.IsRetryable(err) {
		t.Errorf("refusal %q: code %q, want a permission error that is not retried", err, hsm.CodeOf(err))
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("refusal %q does not say %q", err, p)
		}
	}
}

func TestTLSRefusals(t *testing.T) {
	p := thePKI(t)
	clientCA, err := pki.NewCA("client CA", pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := pki.NewCA("other client CA", pki.Options{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("ServerFromAnotherCA", func(t *testing.T) {
		other := newPKI(t)
		n := newNode(t, node.Options{})
		addr := other.serve(t, n, n.ID(), pki.Options{}, nil)
		wantRefused(t, p.client(t, n.ID(), addr, nil), "not issued by the trust anchor", n.ID(), addr)
	})
	t.Run("ServerExpired", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{NotBefore: time.Now().Add(-48 * time.Hour), ValidFor: 24 * time.Hour}, nil)
		wantRefused(t, p.client(t, n.ID(), addr, nil), "expired on", n.ID())
	})
	t.Run("WrongHSMID", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, "hsm-impostor", pki.Options{}, nil)
		wantRefused(t, p.client(t, n.ID(), addr, nil), "certificate of HSM hsm-impostor, not of HSM "+n.ID())
	})
	t.Run("NoClientCertUnderEnforcement", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{}, clientCA.CertPEM)
		wantRefused(t, p.client(t, n.ID(), addr, nil), "requires a client certificate", "enforcement is on")
	})
	t.Run("ClientCertFromAnotherCA", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{}, clientCA.CertPEM)
		cert, err := pki.IssueClient(otherCA, "mallory", pki.Options{})
		if err != nil {
			t.Fatal(err)
		}
		wantRefused(t, p.client(t, n.ID(), addr, &cert), "refused this client's certificate", "client trust anchor")
	})
	t.Run("ClientCertFromTheAnchor", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{}, clientCA.CertPEM)
		cert, err := pki.IssueClient(clientCA, "app-1", pki.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.client(t, n.ID(), addr, &cert).Login(ctxT(t), officer); err != nil {
			t.Fatalf("a client certificate from the registered anchor was refused: %v", err)
		}
	})
	t.Run("PeerHSMUnderEnforcement", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{}, clientCA.CertPEM)
		peer, err := pki.IssueHSM(p.cluster, "hsm-peer", "127.0.0.1:1", pki.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.client(t, n.ID(), addr, &peer).Login(ctxT(t), officer); err != nil {
			t.Fatalf("another HSM of the cluster, with its own certificate, was refused: %v", err)
		}
		foreign, err := pki.IssueHSM(newPKI(t).cluster, "hsm-peer", "127.0.0.1:1", pki.Options{})
		if err != nil {
			t.Fatal(err)
		}
		wantRefused(t, p.client(t, n.ID(), addr, &foreign), "refused this client's certificate")
	})
	t.Run("TLS12Refused", func(t *testing.T) {
		n := newNode(t, node.Options{})
		addr := p.serve(t, n, n.ID(), pki.Options{}, nil)
		cfg, err := pki.ClientConfig(p.ca.CertPEM, n.ID(), addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
		m := remote.New(n.ID(), addr, cfg)
		t.Cleanup(func() { m.Close() })
		wantRefused(t, m, "TLS 1.3 only")
	})
}

func TestKeyFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsm.key")
	if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := pki.ReadKeyFile(path)
	if err == nil || !strings.Contains(err.Error(), "chmod 600") || !strings.Contains(err.Error(), path) {
		t.Fatalf("a key file readable by others: %v, want a refusal naming the file and the fix", err)
	}
	os.Chmod(path, 0o600)
	if _, err := pki.ReadKeyFile(path); err != nil {
		t.Fatal(err)
	}
}
