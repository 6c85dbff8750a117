package cli

// A networked cluster on disk, and the client directory that reaches it.
//
// The cluster directory keeps, beside cluster.json and the HSM files:
//
//	network.json       each HSM's address; whether mutual TLS is enforced
//	tls/cluster.key    the cluster's private key (0600), made with its CSR
//	tls/cluster.csr    the CSR, to be signed offline by the customer's CA
//	tls/cluster.crt    the cluster certificate, signed by the customer's CA
//	tls/ca.pem         the trust anchor: the customer's CA certificate
//	tls/HSM-ID.crt     each HSM's TLS certificate chain, issued by the cluster certificate
//	tls/HSM-ID.key     its private key (0600)
//	tls/client-ca.pem  the registered client trust anchor, if any
//
// A client directory holds what a client on another machine needs and no
// HSM file: client.json (cluster id, region, lineage, each HSM's id, zone
// and address), ca.pem (the trust anchor), client.crt and client.key if a
// client certificate was issued, and cluster.json, the cluster's
// description the cluster client keeps its own state in.

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
	"github.com/keymig/keymig/internal/atomicfile"
)

// Files of a networked cluster and of a client directory.
const (
	networkFile      = "network.json"
	tlsDir           = "tls"
	clusterKeyFile   = "cluster.key"
	clusterCSRFile   = "cluster.csr"
	clusterCertFile  = "cluster.crt"
	trustAnchorFile  = "ca.pem"
	clientAnchorFile = "client-ca.pem"
	clientFile       = "client.json"
	clientCertFile   = "client.crt"
	clientKeyFile    = "client.key"
)

// networkConfig is network.json of a cluster directory.
type networkConfig struct {
	Addresses map[string]string `json:"addresses"` // HSM id → HOST:PORT
	// MTLSEnforcement makes the HSMs require client certificates issued by
	// the registered client trust anchor.
	MTLSEnforcement bool `json:"mtls-enforcement"`
}

func readNetwork(dir string) (*networkConfig, error) {
	b, err := os.ReadFile(filepath.Join(dir, networkFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("cluster %s is not networked (no %s): make it with keymig hsm init --addresses", dir, networkFile)
	}
	if err != nil {
		return nil, err
	}
	var n networkConfig
	if err := json.Unmarshal(b, &n); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, networkFile), err)
	}
	return &n, nil
}

func writeNetwork(dir string, n *networkConfig) error {
	b, err := json.MarshalIndent(n, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, networkFile), append(b, '\n'), 0o644)
}

// tlsPath is a file of the cluster's tls directory.
func tlsPath(dir, name string) string { return filepath.Join(dir, tlsDir, name) }

// clientConfig is client.json of a client directory.
type clientConfig struct {
	Format    int             `json:"format"`
	ClusterID string          `json:"cluster-id"`
	Region    string          `json:"region"`
	Lineage   string          `json:"lineage"`
	HSMs      []clientHSMInfo `json:"hsms"`
	// ClientCert says client.crt and client.key are there.
	ClientCert bool `json:"client-certificate,omitempty"`
}

// clientHSMInfo is one HSM as a client reaches it.
type clientHSMInfo struct {
	ID      string `json:"hsm-id"`
	AZ      string `json:"availability-zone"`
	Address string `json:"address"`
}

// isClientDir reports whether dir is a client directory.
func isClientDir(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, clientFile))
	return err == nil
}

func readClientConfig(dir string) (*clientConfig, error) {
	b, err := os.ReadFile(filepath.Join(dir, clientFile))
	if err != nil {
		return nil, fmt.Errorf("client directory %s: %w", dir, err)
	}
	var c clientConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, clientFile), err)
	}
	return &c, nil
}

// clusterMembers is the opener of the HSMs behind dir: nil (the HSM files
// in the directory) for a cluster directory, the daemons at the addresses
// of client.json for a client directory.
func clusterMembers(dir string) (cluster.Opener, error) {
	if !isClientDir(dir) {
		return nil, refuseIfServed(dir)
	}
	cc, err := readClientConfig(dir)
	if err != nil {
		return nil, err
	}
	anchor, err := os.ReadFile(filepath.Join(dir, trustAnchorFile))
	if err != nil {
		return nil, fmt.Errorf("client directory %s: trust anchor: %w", dir, err)
	}
	var cert *pki.KeyPair
	if cc.ClientCert {
		kp, err := pki.ReadKeyPair(filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile))
		if err != nil {
			return nil, fmt.Errorf("client directory %s: %w", dir, err)
		}
		cert = &kp
	}
	addrs := map[string]string{}
	for _, h := range cc.HSMs {
		addrs[h.ID] = h.Address
	}
	return &remote.Opener{Addrs: addrs, TLS: func(id, addr string) (*tls.Config, error) {
		return pki.ClientConfig(anchor, id, addr, cert)
	}}, nil
}

// hsmIDs are the ids of a network config's HSMs, sorted.
func (n *networkConfig) hsmIDs() []string {
	ids := make([]string, 0, len(n.Addresses))
	for id := range n.Addresses {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// clusterInfo reads the description of the cluster at dir.
func clusterInfo(dir string) (hsm.ClusterInfo, error) {
	info, err := cluster.ReadInfo(dir)
	return info, inCluster(dir, err)
}

// writeJSONFile writes v as indented JSON, atomically.
func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o644)
}

// refuseIfServed refuses to open the HSM files of a cluster directory
// that keymig hsm serve holds, naming the daemon, rather than wait for
// their locks: such a cluster is reached through a client directory.
func refuseIfServed(dir string) error {
	paths, _ := filepath.Glob(filepath.Join(dir, "*.serve"))
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		f.Close() // closing releases a lock we took
		if errors.Is(err, syscall.EWOULDBLOCK) {
			holder := "a keymig hsm serve daemon"
			if h, ok := readServeHolder(p); ok {
				holder = fmt.Sprintf("keymig hsm serve, pid %d on %s at %s", h.PID, h.Host, h.Addr)
			}
			return fmt.Errorf("cluster %s: HSM %s is served by %s; reach the cluster through a client directory (keymig hsm client-config --cluster %s --out DIR)",
				dir, strings.TrimSuffix(filepath.Base(p), ".serve"), holder, dir)
		}
	}
	return nil
}
