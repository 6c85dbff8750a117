package cli

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/internal/atomicfile"
)

// networkInitOptions are the flags of hsm init that make a networked
// cluster, CloudHSM's way: the cluster's CSR, signed offline by the
// customer's CA, then the HSMs' certificates issued from it.
type networkInitOptions struct {
	Addresses   []string // HOST:PORT of each HSM, in order
	CSROut      string   // write the cluster's CSR here
	SignedCert  string   // finish: the signed cluster certificate
	TrustAnchor string   // finish: the customer CA's certificate
	CustomerCA  string   // a CA directory: sign and finish in the same step
}

func (o networkInitOptions) validate(hsms int) error {
	if o.SignedCert != "" || o.TrustAnchor != "" {
		if o.SignedCert == "" || o.TrustAnchor == "" {
			return errors.New("--signed-cert and --trust-anchor go together: they finish the initialisation of a cluster made with --csr-out")
		}
		if len(o.Addresses) > 0 || o.CSROut != "" || o.CustomerCA != "" {
			return errors.New("--signed-cert finishes a cluster made earlier; give it with --dir, --trust-anchor and nothing else")
		}
		return nil
	}
	if len(o.Addresses) == 0 {
		if o.CSROut != "" || o.CustomerCA != "" {
			return errors.New("--csr-out and --customer-ca need --addresses HOST:PORT,... (one per HSM)")
		}
		return nil
	}
	if len(o.Addresses) != hsms {
		return fmt.Errorf("--addresses gives %d addresses for --hsms %d: give one HOST:PORT per HSM", len(o.Addresses), hsms)
	}
	for _, a := range o.Addresses {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("--addresses %q: want HOST:PORT (port 0 picks a free port when the HSM is first served)", a)
		}
	}
	if o.CSROut == "" && o.CustomerCA == "" {
		return errors.New("--addresses needs --csr-out FILE (then sign it: keymig hsm ca sign) or --customer-ca DIR (a rehearsal CA that signs at once)")
	}
	return nil
}

// networked reports whether the options make a networked cluster.
func (o networkInitOptions) networked() bool { return len(o.Addresses) > 0 }

// startNetworkInit records the HSMs' addresses of a cluster just made and
// writes its key and CSR; with a customer CA it finishes at once.
func startNetworkInit(e *env, dir string, info hsm.ClusterInfo, o networkInitOptions) error {
	n := &networkConfig{Addresses: map[string]string{}}
	for i, h := range info.HSMs {
		n.Addresses[h.ID] = o.Addresses[i]
	}
	if err := os.MkdirAll(filepath.Join(dir, tlsDir), 0o700); err != nil {
		return err
	}
	if err := writeNetwork(dir, n); err != nil {
		return err
	}
	csr, key, err := pki.NewCSR(info.ID)
	if err != nil {
		return err
	}
	if err := atomicfile.CreateFile(tlsPath(dir, clusterKeyFile), key, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(tlsPath(dir, clusterCSRFile), csr, 0o644); err != nil {
		return err
	}
	if o.CSROut != "" {
		if err := atomicfile.WriteFile(o.CSROut, csr, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "wrote the cluster's CSR to %s: sign it with the customer CA (keymig hsm ca sign), then run keymig hsm init --dir %s --signed-cert FILE --trust-anchor CA.pem\n", o.CSROut, dir)
	}
	if o.CustomerCA == "" {
		return nil
	}
	ca, err := readCA(o.CustomerCA)
	if err != nil {
		return err
	}
	cert, err := pki.SignCSR(ca, csr, pki.Options{})
	if err != nil {
		return err
	}
	return finishNetworkInit(e.stderr, dir, cert, ca.CertPEM)
}

// runNetworkInitFinish is hsm init --signed-cert: install the cluster
// certificate and issue every HSM's.
func runNetworkInitFinish(e *env, dir string, o networkInitOptions) error {
	cert, err := os.ReadFile(o.SignedCert)
	if err != nil {
		return fmt.Errorf("signed cluster certificate: %w", err)
	}
	anchor, err := os.ReadFile(o.TrustAnchor)
	if err != nil {
		return fmt.Errorf("trust anchor: %w", err)
	}
	return inCluster(dir, finishNetworkInit(e.stdout, dir, cert, anchor))
}

func finishNetworkInit(w io.Writer, dir string, certPEM, anchorPEM []byte) error {
	n, err := readNetwork(dir)
	if err != nil {
		return err
	}
	key, err := pki.ReadKeyFile(tlsPath(dir, clusterKeyFile))
	if err != nil {
		return fmt.Errorf("the cluster's key (made with its CSR by keymig hsm init --csr-out): %w", err)
	}
	if err := pki.CheckClusterCert(certPEM, anchorPEM, key); err != nil {
		return err
	}
	clusterKP := pki.KeyPair{CertPEM: certPEM, KeyPEM: key}
	for _, id := range n.hsmIDs() {
		kp, err := pki.IssueHSM(clusterKP, id, n.Addresses[id], pki.Options{})
		if err != nil {
			return err
		}
		if err := atomicfile.WriteFile(tlsPath(dir, id+".key"), kp.KeyPEM, 0o600); err != nil {
			return err
		}
		if err := atomicfile.WriteFile(tlsPath(dir, id+".crt"), kp.CertPEM, 0o644); err != nil {
			return err
		}
	}
	if err := atomicfile.WriteFile(tlsPath(dir, clusterCertFile), certPEM, 0o644); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(tlsPath(dir, trustAnchorFile), anchorPEM, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(w, "initialised networked cluster %s: cluster certificate installed, %d HSM certificates issued; serve it with keymig hsm serve --dir %s\n", dir, len(n.Addresses), dir)
	return nil
}
