package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/urfave/cli/v2"
)

// hsmMTLSCommand is `keymig hsm mtls`: client certificates, CloudHSM's way.
func hsmMTLSCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "mtls",
		Usage: "mutual TLS of a networked cluster: the client trust anchor and its enforcement",
		Description: `With enforcement on, the HSMs accept only clients whose certificate is issued
by the registered client trust anchor; a client without one, or with one from
another CA, is refused at the TLS handshake. Changes take effect when the
HSMs are next served (restart keymig hsm serve).

Examples:
  keymig hsm ca create --dir ./client-ca
  keymig hsm mtls register-trust-anchor --dir ./prod --anchor ./client-ca/ca.pem
  keymig hsm mtls enforcement --dir ./prod --on
  keymig hsm client-config --cluster ./prod --out ./app --client-cert --client-ca ./client-ca`,
		Subcommands: []*cli.Command{
			{
				Name:  "register-trust-anchor",
				Usage: "register the CA that issues client certificates",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Required: true, Usage: "the networked cluster `DIR`ectory"},
					&cli.StringFlag{Name: "anchor", Required: true, Usage: "the client CA's certificate `FILE` (PEM)"},
				},
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					return runMTLSRegister(c.Context, e, c.String("dir"), c.String("anchor"))
				},
			},
			{
				Name:  "enforcement",
				Usage: "require client certificates (--on) or not (--off)",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Required: true, Usage: "the networked cluster `DIR`ectory"},
					&cli.BoolFlag{Name: "on", Usage: "require client certificates"},
					&cli.BoolFlag{Name: "off", Usage: "stop requiring them"},
				},
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					if c.Bool("on") == c.Bool("off") {
						return errors.New("give --on or --off")
					}
					return runMTLSEnforcement(c.Context, e, c.String("dir"), c.Bool("on"))
				},
			},
		},
	}
}

func runMTLSRegister(_ context.Context, e *env, dir, anchor string) error {
	if _, err := readNetwork(dir); err != nil {
		return err
	}
	b, err := os.ReadFile(anchor)
	if err != nil {
		return fmt.Errorf("client trust anchor: %w", err)
	}
	cert, err := pki.ParseCert(b)
	if err != nil {
		return fmt.Errorf("client trust anchor %s: %w", anchor, err)
	}
	if !cert.IsCA {
		return fmt.Errorf("client trust anchor %s is not a CA certificate", anchor)
	}
	if err := atomicfile.WriteFile(tlsPath(dir, clientAnchorFile), b, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "registered client trust anchor %q for cluster %s; turn enforcement on with keymig hsm mtls enforcement --dir %s --on\n", cert.Subject.CommonName, dir, dir)
	return nil
}

func runMTLSEnforcement(_ context.Context, e *env, dir string, on bool) error {
	n, err := readNetwork(dir)
	if err != nil {
		return err
	}
	if on {
		if _, err := os.Stat(tlsPath(dir, clientAnchorFile)); err != nil {
			return fmt.Errorf("cluster %s has no client trust anchor: register one first with keymig hsm mtls register-trust-anchor", dir)
		}
	}
	n.MTLSEnforcement = on
	if err := writeNetwork(dir, n); err != nil {
		return err
	}
	state := "off"
	if on {
		state = "on"
	}
	fmt.Fprintf(e.stdout, "mutual TLS enforcement of cluster %s is %s; restart keymig hsm serve for it to take effect\n", dir, state)
	return nil
}
