// Package pki makes and checks the certificates of a networked cluster, the
// way AWS CloudHSM does it: the customer owns a CA (CustomerCA) and signs
// the cluster's certificate request with it; each HSM's TLS certificate is
// issued by the cluster certificate, names the HSM id and its address, and
// so chains to the customer's CA, the only trust anchor clients hold.
// Client certificates are issued by a client trust anchor the cluster
// registers; the HSMs require them when mutual TLS enforcement is on.
//
// Keys are ECDSA P-256; TLS is 1.3 only. Only crypto/x509 and crypto/tls
// are used. Private keys are PEM files readable by their owner only:
// ReadKeyFile refuses any other.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"time"
)

// hsmURIPrefix starts the URI SAN that names an HSM: urn:keymig:hsm:HSM-ID.
const hsmURIPrefix = "urn:keymig:hsm:"

// Validity periods of what this package issues.
const (
	CAValidity      = 10 * 365 * 24 * time.Hour
	ClusterValidity = 5 * 365 * 24 * time.Hour
	LeafValidity    = 2 * 365 * 24 * time.Hour
)

// Options tune issuance; the zero value issues from now for the default
// validity. Tests set them to make certificates that have expired.
type Options struct {
	NotBefore time.Time     // zero: now, less a minute of clock skew
	ValidFor  time.Duration // zero: the default of what is issued
}

func (o Options) window(def time.Duration) (time.Time, time.Time) {
	nb := o.NotBefore
	if nb.IsZero() {
		nb = time.Now().Add(-time.Minute)
	}
	v := o.ValidFor
	if v == 0 {
		v = def
	}
	return nb, nb.Add(v)
}

// KeyPair is a certificate and its private key, both PEM.
type KeyPair struct {
	CertPEM []byte
	KeyPEM  []byte
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n.Add(n, big.NewInt(1))
}

func keyID(pub crypto.PublicKey) []byte {
	der, _ := x509.MarshalPKIXPublicKey(pub)
	h := sha256.Sum256(der)
	return h[:20]
}

// NewCA makes a self-signed CA, such as a customer's CA for rehearsals or a
// client trust anchor.
func NewCA(name string, o Options) (KeyPair, error) {
	k, keyPEM, err := newKey()
	if err != nil {
		return KeyPair{}, err
	}
	nb, na := o.window(CAValidity)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"keymig customer CA"}},
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          keyID(&k.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return KeyPair{}, fmt.Errorf("make CA %s: %w", name, err)
	}
	return KeyPair{CertPEM: pemCert(der), KeyPEM: keyPEM}, nil
}

// NewCSR makes the cluster's key and its certificate signing request, whose
// subject names the cluster.
func NewCSR(clusterID string) (csrPEM, keyPEM []byte, err error) {
	k, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: clusterID, Organization: []string{"keymig cluster"}},
	}, k)
	if err != nil {
		return nil, nil, fmt.Errorf("make CSR of cluster %s: %w", clusterID, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), keyPEM, nil
}

// SignCSR signs a cluster's CSR with the CA: the cluster certificate, a CA
// that may issue only leaf certificates (its HSMs').
func SignCSR(ca KeyPair, csrPEM []byte, o Options) ([]byte, error) {
	caCert, caKey, err := ca.parse()
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(csrPEM)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("the CSR is not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("the CSR's signature does not verify: %w", err)
	}
	nb, na := o.window(ClusterValidity)
	if na.After(caCert.NotAfter) {
		na = caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               csr.Subject,
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		SubjectKeyId:          keyID(csr.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, csr.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("sign the CSR of %s: %w", csr.Subject.CommonName, err)
	}
	return pemCert(der), nil
}

// CheckClusterCert checks that a signed cluster certificate chains to the
// anchor and is for the key of the cluster's CSR.
func CheckClusterCert(certPEM, anchorPEM, clusterKeyPEM []byte) error {
	cert, err := ParseCert(certPEM)
	if err != nil {
		return fmt.Errorf("signed cluster certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(anchorPEM) {
		return errors.New("the trust anchor holds no PEM certificate")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("the signed cluster certificate does not chain to the trust anchor: %w", err)
	}
	key, err := parseKey(clusterKeyPEM)
	if err != nil {
		return err
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return errors.New("the signed certificate is not for this cluster's key: sign the CSR this cluster made")
	}
	return nil
}

// IssueHSM issues an HSM's TLS certificate with the cluster certificate and
// key: the HSM id as a URI SAN (urn:keymig:hsm:ID) and the address's host
// as an IP or DNS SAN. It serves TLS and, for daemons syncing with their
// peers, authenticates as a client too. CertPEM holds the leaf followed by
// the cluster certificate, the chain a server presents.
func IssueHSM(cluster KeyPair, hsmID, addr string, o Options) (KeyPair, error) {
	cCert, cKey, err := cluster.parse()
	if err != nil {
		return KeyPair{}, err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return KeyPair{}, fmt.Errorf("HSM %s: address %q: want HOST:PORT", hsmID, addr)
	}
	k, keyPEM, err := newKey()
	if err != nil {
		return KeyPair{}, err
	}
	nb, na := o.window(LeafValidity)
	if na.After(cCert.NotAfter) && o.ValidFor == 0 {
		na = cCert.NotAfter
	}
	u, _ := url.Parse(hsmURIPrefix + hsmID)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hsmID, Organization: []string{cCert.Subject.CommonName}},
		NotBefore:    nb,
		NotAfter:     na,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, cCert, &k.PublicKey, cKey)
	if err != nil {
		return KeyPair{}, fmt.Errorf("issue the certificate of HSM %s: %w", hsmID, err)
	}
	return KeyPair{CertPEM: append(pemCert(der), pemCert(cCert.Raw)...), KeyPEM: keyPEM}, nil
}

// IssueClient issues a client certificate with a client trust anchor's CA.
func IssueClient(ca KeyPair, name string, o Options) (KeyPair, error) {
	caCert, caKey, err := ca.parse()
	if err != nil {
		return KeyPair{}, err
	}
	k, keyPEM, err := newKey()
	if err != nil {
		return KeyPair{}, err
	}
	nb, na := o.window(LeafValidity)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"keymig client"}},
		NotBefore:    nb,
		NotAfter:     na,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
	if err != nil {
		return KeyPair{}, fmt.Errorf("issue client certificate %s: %w", name, err)
	}
	return KeyPair{CertPEM: pemCert(der), KeyPEM: keyPEM}, nil
}

// HSMIDOf returns the HSM id a certificate names in its URI SAN, or "".
func HSMIDOf(c *x509.Certificate) string {
	for _, u := range c.URIs {
		if s := u.String(); len(s) > len(hsmURIPrefix) && s[:len(hsmURIPrefix)] == hsmURIPrefix {
			return s[len(hsmURIPrefix):]
		}
	}
	return ""
}

// ParseCert parses the first PEM certificate of b.
func ParseCert(b []byte) (*x509.Certificate, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errors.New("no PEM certificate found")
		}
		if blk.Type == "CERTIFICATE" {
			return x509.ParseCertificate(blk.Bytes)
		}
	}
}

func (kp KeyPair) parse() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cert, err := ParseCert(kp.CertPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA certificate: %w", err)
	}
	key, err := parseKey(kp.KeyPEM)
	if err != nil {
		return nil, nil, err
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, nil, errors.New("the CA key does not belong to the CA certificate")
	}
	return cert, key, nil
}

func parseKey(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("the key is not a PEM PRIVATE KEY")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("the private key is not ECDSA")
	}
	return ek, nil
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// ReadKeyFile reads a private key file, refusing one that anyone but its
// owner may read or write.
func ReadKeyFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("private key %s: %w", path, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("private key %s is readable by others (mode %04o): run chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	return os.ReadFile(path)
}

// ReadKeyPair reads a certificate file and its private key file (checked
// with ReadKeyFile).
func ReadKeyPair(certPath, keyPath string) (KeyPair, error) {
	c, err := os.ReadFile(certPath)
	if err != nil {
		return KeyPair{}, fmt.Errorf("certificate %s: %w", certPath, err)
	}
	k, err := ReadKeyFile(keyPath)
	if err != nil {
		return KeyPair{}, err
	}
	return KeyPair{CertPEM: c, KeyPEM: k}, nil
}
