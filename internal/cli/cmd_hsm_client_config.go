package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/urfave/cli/v2"
)

// hsmClientConfigOptions are the inputs of `keymig hsm client-config`.
type hsmClientConfigOptions struct {
	Dir        string // the networked cluster
	Out        string // the client directory to write
	ClientCert bool   // issue a client certificate
	ClientCA   string // the CA directory that issues it
	ClientName string // its common name
}

// hsmClientConfigCommand is `keymig hsm client-config`.
func hsmClientConfigCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "client-config",
		Usage: "write a client directory: what a client on another machine needs to reach a networked cluster",
		Description: `The client directory holds the cluster's id, region and lineage, each HSM's
id, zone and address, and the trust anchor; with --client-cert also a client
certificate and key (mode 0600) issued by the CA in --client-ca, which must
be the cluster's registered client trust anchor. It holds no HSM file and no
PIN. Every command that takes --cluster, --source or --target accepts it.

Example:
  keymig hsm client-config --cluster ./prod --out ./app
  KEYMIG_PIN=alice:pw keymig hsm key generate --cluster ./app --type aes-256 --label payments`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "cluster", Aliases: []string{"c"}, Required: true, Usage: "the networked cluster `DIR`ectory"},
			&cli.StringFlag{Name: "out", Required: true, Usage: "the client `DIR`ectory to write"},
			&cli.BoolFlag{Name: "client-cert", Usage: "issue a client certificate (needs --client-ca)"},
			&cli.StringFlag{Name: "client-ca", Usage: "the CA `DIR`ectory that issues the client certificate"},
			&cli.StringFlag{Name: "client-name", Value: "keymig-client", Usage: "the client certificate's common name"},
		},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			return runHSMClientConfig(c.Context, e, hsmClientConfigOptions{Dir: c.String("cluster"), Out: c.String("out"),
				ClientCert: c.Bool("client-cert"), ClientCA: c.String("client-ca"), ClientName: c.String("client-name")})
		},
	}
}

func runHSMClientConfig(_ context.Context, e *env, o hsmClientConfigOptions) error {
	if o.ClientCert != (o.ClientCA != "") {
		return errors.New("--client-cert and --client-ca DIR go together: the CA issues the client certificate")
	}
	if isClientDir(o.Dir) {
		return fmt.Errorf("%s is a client directory; give the cluster's own directory", o.Dir)
	}
	n, err := readNetwork(o.Dir)
	if err != nil {
		return err
	}
	cfgJSON, err := os.ReadFile(filepath.Join(o.Dir, "cluster.json"))
	if err != nil {
		return inCluster(o.Dir, err)
	}
	info, err := clusterInfo(o.Dir)
	if err != nil {
		return err
	}
	anchor, err := os.ReadFile(tlsPath(o.Dir, trustAnchorFile))
	if err != nil {
		return fmt.Errorf("cluster %s has no trust anchor yet: finish its initialisation with keymig hsm init --signed-cert (%w)", o.Dir, err)
	}
	cc := clientConfig{Format: 1, ClusterID: info.ID, Region: info.Region, Lineage: info.Lineage, ClientCert: o.ClientCert}
	for _, h := range info.HSMs {
		addr, ok := n.Addresses[h.ID]
		if !ok {
			return fmt.Errorf("cluster %s: HSM %s has no address in %s", o.Dir, h.ID, networkFile)
		}
		cc.HSMs = append(cc.HSMs, clientHSMInfo{ID: h.ID, AZ: h.AZ, Address: addr})
	}
	var cert pki.KeyPair
	if o.ClientCert {
		ca, err := readCA(o.ClientCA)
		if err != nil {
			return err
		}
		if cert, err = pki.IssueClient(ca, o.ClientName, pki.Options{}); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(o.Out, 0o700); err != nil {
		return fmt.Errorf("client directory %s: %w", o.Out, err)
	}
	write := func(name string, b []byte, perm os.FileMode) error {
		if err := atomicfile.WriteFile(filepath.Join(o.Out, name), b, perm); err != nil {
			return fmt.Errorf("client directory %s: %w", o.Out, err)
		}
		return nil
	}
	if err := write(trustAnchorFile, anchor, 0o644); err != nil {
		return err
	}
	if o.ClientCert {
		if err := write(clientKeyFile, cert.KeyPEM, 0o600); err != nil {
			return err
		}
		if err := write(clientCertFile, cert.CertPEM, 0o644); err != nil {
			return err
		}
	}
	if err := write("cluster.json", cfgJSON, 0o644); err != nil {
		return err
	}
	if err := writeJSONFile(filepath.Join(o.Out, clientFile), cc); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "wrote client directory %s for cluster %s (%d HSMs)\n", o.Out, info.ID, len(cc.HSMs))
	return nil
}
