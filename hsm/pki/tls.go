package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// VerifyError is a refused handshake: which check failed, on which HSM and
// address, and what to do about it.
type VerifyError struct {
	Msg string
}

// Error is the message.
func (e *VerifyError) Error() string { return e.Msg }

func refuse(format string, args ...any) error {
	return &VerifyError{Msg: fmt.Sprintf(format, args...)}
}

// ClientConfig is the TLS configuration of a client of HSM hsmID at addr:
// TLS 1.3, trusting only the anchor, and checking that the server's
// certificate names hsmID and addr's host. client, if not nil, is the
// client certificate presented when the HSM asks for one. The chain is
// verified in VerifyConnection so that a refusal says which check failed.
func ClientConfig(anchorPEM []byte, hsmID, addr string, client *KeyPair) (*tls.Config, error) {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(anchorPEM) {
		return nil, errors.New("the trust anchor holds no PEM certificate")
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("HSM %s: address %q: want HOST:PORT", hsmID, addr)
	}
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		ServerName:         host,
		InsecureSkipVerify: true, // verified below, with errors that name the check
		NextProtos:         []string{"h2"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyServer(cs, roots, hsmID, addr, host, time.Now())
		},
	}
	if client != nil {
		c, err := tls.X509KeyPair(client.CertPEM, client.KeyPEM)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}

func verifyServer(cs tls.ConnectionState, roots *x509.CertPool, hsmID, addr, host string, now time.Time) error {
	if len(cs.PeerCertificates) == 0 {
		return refuse("HSM %s at %s presented no certificate", hsmID, addr)
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	for _, c := range cs.PeerCertificates {
		if now.After(c.NotAfter) {
			return refuse("the certificate %q presented by HSM %s at %s expired on %s: renew the HSM's certificate", c.Subject.CommonName, hsmID, addr, c.NotAfter.UTC().Format(time.RFC3339))
		}
		if now.Before(c.NotBefore) {
			return refuse("the certificate %q presented by HSM %s at %s is not valid before %s: check the clocks", c.Subject.CommonName, hsmID, addr, c.NotBefore.UTC().Format(time.RFC3339))
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return refuse("the certificate presented by HSM %s at %s is not issued by the trust anchor (it chains to %q): the address may be another cluster's, or the client directory's trust anchor is not this cluster's customer CA", hsmID, addr, issuerOf(cs.PeerCertificates))
		}
		return refuse("the certificate presented by HSM %s at %s does not verify: %v", hsmID, addr, err)
	}
	if got := HSMIDOf(leaf); got != hsmID {
		if got == "" {
			got = "no HSM"
		} else {
			got = "HSM " + got
		}
		return refuse("the server at %s presented a certificate of %s, not of HSM %s: the address belongs to another HSM; check the addresses in the client directory", addr, got, hsmID)
	}
	if err := leaf.VerifyHostname(host); err != nil {
		return refuse("the certificate of HSM %s does not name the address %s it was reached at: %v", hsmID, addr, err)
	}
	return nil
}

func issuerOf(chain []*x509.Certificate) string {
	return chain[len(chain)-1].Issuer.CommonName
}

// ServerTLS says how an HSM daemon serves TLS.
type ServerTLS struct {
	HSM KeyPair // the HSM's certificate chain and key (IssueHSM)
	// Enforce requires client certificates, issued by ClientAnchorPEM, or
	// by PeerAnchorPEM for the cluster's other HSMs.
	Enforce         bool
	ClientAnchorPEM []byte
	// PeerAnchorPEM is the customer CA: another HSM of the cluster, which
	// syncs keys with this one, presents its own certificate, which chains
	// to it and names an HSM id.
	PeerAnchorPEM []byte
}

// ServerConfig is the TLS configuration of an HSM daemon: TLS 1.3, its
// certificate chain, and, when enforcement is on, client certificates
// required and verified.
func ServerConfig(o ServerTLS) (*tls.Config, error) {
	c, err := tls.X509KeyPair(o.HSM.CertPEM, o.HSM.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("HSM certificate: %w", err)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c},
		NextProtos:   []string{"h2"},
	}
	if !o.Enforce {
		return cfg, nil
	}
	clients := x509.NewCertPool()
	if !clients.AppendCertsFromPEM(o.ClientAnchorPEM) {
		return nil, errors.New("mutual TLS enforcement is on but no client trust anchor is registered: run keymig hsm mtls register-trust-anchor")
	}
	peers := x509.NewCertPool()
	hasPeers := peers.AppendCertsFromPEM(o.PeerAnchorPEM)
	cfg.ClientAuth = tls.RequireAnyClientCert
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return refuse("client sent no certificate and mutual TLS enforcement is on")
		}
		leaf := cs.PeerCertificates[0]
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		_, err := leaf.Verify(x509.VerifyOptions{Roots: clients, Intermediates: inter, KeyUsages: usage})
		if err == nil {
			return nil
		}
		if hasPeers && HSMIDOf(leaf) != "" {
			if _, perr := leaf.Verify(x509.VerifyOptions{Roots: peers, Intermediates: inter, KeyUsages: usage}); perr == nil {
				return nil
			}
		}
		return refuse("client certificate %q is not issued by the registered client trust anchor: %v", leaf.Subject.CommonName, err)
	}
	return cfg, nil
}

// ExplainRemote turns the TLS alert a server sent into the refusal it
// stands for, or returns "" if err is no such alert. In TLS 1.3 a client
// learns that its certificate was refused only when it next reads.
func ExplainRemote(err error, hsmID, addr string) string {
	if err == nil {
		return ""
	}
	s := err.Error()
	switch {
	case strings.Contains(s, "tls: certificate required"):
		return fmt.Sprintf("HSM %s at %s requires a client certificate (mutual TLS enforcement is on): make the client directory with keymig hsm client-config --client-cert", hsmID, addr)
	case strings.Contains(s, "remote error: tls: bad certificate"), strings.Contains(s, "remote error: tls: unknown certificate authority"):
		return fmt.Sprintf("HSM %s at %s refused this client's certificate: it is not issued by the cluster's registered client trust anchor", hsmID, addr)
	case strings.Contains(s, "remote error: tls: protocol version not supported"):
		return fmt.Sprintf("HSM %s at %s accepts TLS 1.3 only", hsmID, addr)
	}
	return ""
}
