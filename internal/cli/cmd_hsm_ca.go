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

// Files of a CA directory (keymig hsm ca create).
const (
	caCertFile = "ca.pem"
	caKeyFile  = "ca.key"
)

// hsmCACommand is `keymig hsm ca`: a customer CA for rehearsals.
func hsmCACommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "ca",
		Usage: "a customer CA for rehearsals: create it, sign a cluster's CSR with it",
		Description: `In CloudHSM you sign the cluster's certificate with a key pair you own
(CustomerCA); a real one lives offline. These commands make one for
rehearsals and sign with it:

  keymig hsm ca create --dir ./ca
  keymig hsm init --dir ./prod --hsms 2 --addresses 10.0.0.1:2225,10.0.1.1:2225 --csr-out cluster.csr
  keymig hsm ca sign --ca ./ca --csr cluster.csr --out cluster.crt
  keymig hsm init --dir ./prod --signed-cert cluster.crt --trust-anchor ./ca/ca.pem

The same CA can issue client certificates (keymig hsm client-config
--client-cert --client-ca ./ca) once it is registered as the client trust
anchor (keymig hsm mtls register-trust-anchor).`,
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "make a CA: DIR/ca.pem and DIR/ca.key (mode 0600)",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Required: true, Usage: "the new CA `DIR`ectory"},
					&cli.StringFlag{Name: "name", Value: "keymig customer CA", Usage: "the CA's common name"},
				},
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					return runHSMCACreate(c.Context, e, c.String("dir"), c.String("name"))
				},
			},
			{
				Name:  "sign",
				Usage: "sign a cluster's CSR: the cluster certificate",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "ca", Required: true, Usage: "the CA `DIR`ectory"},
					&cli.StringFlag{Name: "csr", Required: true, Usage: "the cluster's CSR `FILE` (keymig hsm init --csr-out)"},
					&cli.StringFlag{Name: "out", Required: true, Usage: "write the signed cluster certificate to `FILE`"},
				},
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					return runHSMCASign(c.Context, e, c.String("ca"), c.String("csr"), c.String("out"))
				},
			},
		},
	}
}

// runHSMCACreate makes a CA directory.
func runHSMCACreate(_ context.Context, e *env, dir, name string) error {
	if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err == nil {
		return fmt.Errorf("CA %s exists already (%s); choose another directory", dir, filepath.Join(dir, caKeyFile))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("CA %s: %w", dir, err)
	}
	ca, err := pki.NewCA(name, pki.Options{})
	if err != nil {
		return err
	}
	if err := atomicfile.CreateFile(filepath.Join(dir, caKeyFile), ca.KeyPEM, 0o600); err != nil {
		return fmt.Errorf("CA %s: %w", dir, err)
	}
	if err := atomicfile.CreateFile(filepath.Join(dir, caCertFile), ca.CertPEM, 0o644); err != nil {
		return fmt.Errorf("CA %s: %w", dir, err)
	}
	fmt.Fprintf(e.stdout, "created CA %q in %s: certificate %s, key %s (mode 0600; keep it offline)\n", name, dir, filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile))
	return nil
}

// readCA reads a CA directory, refusing a key others can read.
func readCA(dir string) (pki.KeyPair, error) {
	kp, err := pki.ReadKeyPair(filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile))
	if err != nil {
		return pki.KeyPair{}, fmt.Errorf("CA %s: %w", dir, err)
	}
	return kp, nil
}

// runHSMCASign signs a cluster CSR.
func runHSMCASign(_ context.Context, e *env, caDir, csrPath, out string) error {
	if out == "" {
		return errors.New("--out FILE is required")
	}
	ca, err := readCA(caDir)
	if err != nil {
		return err
	}
	csr, err := os.ReadFile(csrPath)
	if err != nil {
		return fmt.Errorf("CSR: %w", err)
	}
	cert, err := pki.SignCSR(ca, csr, pki.Options{})
	if err != nil {
		return fmt.Errorf("sign %s with CA %s: %w", csrPath, caDir, err)
	}
	if err := atomicfile.WriteFile(out, cert, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "signed %s with CA %s: %s\n", csrPath, caDir, out)
	return nil
}
