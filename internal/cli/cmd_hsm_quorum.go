package cli

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// `keymig hsm quorum` and `keymig hsm user register-quorum`: M-of-N quorum
// authentication of user management, as CloudHSM CLI's quorum token-sign.
// Officers' private quorum keys stay in files readable by their owner only
// and never enter the HSM: tokens are signed offline by `token sign`.

// hsmQuorumOptions are the inputs of the quorum commands.
type hsmQuorumOptions struct {
	clusterOptions
	Service    hsm.QuorumService
	Value      int      // policy set
	Username   string   // register-quorum
	PublicKey  string   // register-quorum: PEM file
	Token      string   // token file
	Signatures []string // approve: approval files
	Key        string   // sign, keygen: private key file
	PublicOut  string   // keygen
	Out        string   // generate, sign: file to write
	Force      bool
}

// quorumFile is a token or an approval as written to a file.
type quorumFile struct {
	Format   string              `json:"format"`
	Token    *hsm.QuorumToken    `json:"token,omitempty"`
	Approval *hsm.QuorumApproval `json:"approval,omitempty"`
}

const quorumFileFormat = "keymig-quorum-v1"

func serviceFlag() cli.Flag {
	return &cli.StringFlag{Name: "service", Value: string(hsm.ServiceUserManagement), Usage: "the quorum service: user-management"}
}

// hsmQuorumCommand is `keymig hsm quorum`.
func hsmQuorumCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "quorum",
		Usage: "M-of-N quorum authentication of user management (CloudHSM's quorum token-sign)",
		Description: `With a user-management quorum of M > 1, creating or deleting a user, changing
another user's password and changing the quorum itself need a token that M
crypto officers signed offline with their quorum keys (RSA-2048 or more,
PKCS#1 v1.5 with SHA-256, as CloudHSM's quorum keys; openssl dgst -sha256
-sign makes the same signature). Each officer registers its public key with
` + "`keymig hsm user register-quorum`" + `. A token expires 10 minutes after it is made
and is spent by one operation. Keep at least M+1 officers with quorum keys.

Example:
  keymig hsm quorum keygen --out co1.key --public-out co1.pub
  KEYMIG_PIN=co1:pass keymig hsm user register-quorum --cluster ./hsm1 --public-key co1.pub
  keymig hsm quorum policy set --cluster ./hsm1 --service user-management --value 2
  keymig hsm quorum token generate --cluster ./hsm1 --out token.json
  keymig hsm quorum token sign --token token.json --key co1.key --out co1.sig
  keymig hsm quorum token sign --token token.json --key co2.key --out co2.sig
  keymig hsm quorum token approve --cluster ./hsm1 --token token.json --signature co1.sig --signature co2.sig
  keymig hsm user create --cluster ./hsm1 --username dave --role crypto-user`,
		Subcommands: []*cli.Command{
			{
				Name:  "keygen",
				Usage: "make an RSA-2048 quorum key pair: the private key (mode 0600) and its public PEM",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "out", Required: true, Usage: "the private key `FILE` (PKCS#8 PEM, mode 0600)"},
					&cli.StringFlag{Name: "public-out", Required: true, Usage: "the public key `FILE` to register"},
					&cli.BoolFlag{Name: "force", Usage: "replace the files if they exist"},
				},
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					return runQuorumKeygen(e, hsmQuorumOptions{Key: c.String("out"), PublicOut: c.String("public-out"), Force: c.Bool("force")})
				},
			},
			{
				Name:  "policy",
				Usage: "set the quorum policy",
				Subcommands: []*cli.Command{{
					Name:  "set",
					Usage: "set M of a service (crypto officers; 1 turns the quorum off)",
					Flags: append(clusterFlags(true), serviceFlag(),
						&cli.IntFlag{Name: "value", Required: true, Usage: "M, from 1 to the number of officers with quorum keys"}),
					Action: func(c *cli.Context) error {
						o, err := e.quorumOptionsFrom(c, true)
						if err != nil {
							return err
						}
						o.Value = c.Int("value")
						return runQuorumPolicySet(c.Context, e, o)
					},
				}},
			},
			{
				Name:  "token",
				Usage: "generate, sign and approve quorum tokens",
				Subcommands: []*cli.Command{
					{
						Name:  "generate",
						Usage: "make a quorum token for the caller, a crypto officer, valid for 10 minutes",
						Flags: append(clusterFlags(true), serviceFlag(),
							&cli.StringFlag{Name: "out", Required: true, Usage: "the token `FILE` to give the approving officers"},
							&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"}),
						Action: func(c *cli.Context) error {
							o, err := e.quorumOptionsFrom(c, true)
							if err != nil {
								return err
							}
							o.Out, o.Force = c.String("out"), c.Bool("force")
							return runQuorumTokenGenerate(c.Context, e, o)
						},
					},
					{
						Name:  "sign",
						Usage: "sign a token with your private quorum key, offline (no cluster, no PIN)",
						Flags: []cli.Flag{
							&cli.StringFlag{Name: "token", Required: true, Usage: "the token `FILE`"},
							&cli.StringFlag{Name: "key", Required: true, Usage: "your private quorum key `FILE` (mode 0600)"},
							&cli.StringFlag{Name: "out", Required: true, Usage: "the approval `FILE` to write"},
							&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"},
						},
						Action: func(c *cli.Context) error {
							if err := noArgs(c); err != nil {
								return err
							}
							return runQuorumTokenSign(e, hsmQuorumOptions{Token: c.String("token"), Key: c.String("key"), Out: c.String("out"), Force: c.Bool("force")})
						},
					},
					{
						Name:  "approve",
						Usage: "submit the officers' approvals of your token; the next user-management operation spends it",
						Flags: append(clusterFlags(true),
							&cli.StringFlag{Name: "token", Required: true, Usage: "the token `FILE`"},
							&cli.StringSliceFlag{Name: "signature", Required: true, Usage: "an approval `FILE` from token sign (repeatable)"}),
						Action: func(c *cli.Context) error {
							o, err := e.quorumOptionsFrom(c, false)
							if err != nil {
								return err
							}
							o.Token, o.Signatures = c.String("token"), c.StringSlice("signature")
							return runQuorumTokenApprove(c.Context, e, o)
						},
					},
				},
			},
		},
	}
}

// hsmUserRegisterQuorumCommand is `keymig hsm user register-quorum`.
func hsmUserRegisterQuorumCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "register-quorum",
		Usage: "register the caller's quorum public key (RSA-2048 or more), used to approve quorum tokens",
		Flags: append(clusterFlags(true),
			&cli.StringFlag{Name: "username", Aliases: []string{"u"}, Usage: "the user whose key it is; a user registers its own key only", DefaultText: "the caller"},
			&cli.StringFlag{Name: "public-key", Required: true, Usage: "the public key PEM `FILE`"}),
		Action: func(c *cli.Context) error {
			o, err := e.quorumOptionsFrom(c, false)
			if err != nil {
				return err
			}
			o.Username, o.PublicKey = c.String("username"), c.String("public-key")
			if o.Username == "" {
				o.Username = o.Creds.User
			}
			return runQuorumRegister(c.Context, e, o)
		},
	}
}

// quorumOptionsFrom reads the cluster flags, the PIN and, if service, --service.
func (e *env) quorumOptionsFrom(c *cli.Context, service bool) (hsmQuorumOptions, error) {
	co, err := e.clusterOptionsFrom(c, true)
	if err != nil {
		return hsmQuorumOptions{}, err
	}
	o := hsmQuorumOptions{clusterOptions: co}
	if service {
		if o.Service = hsm.QuorumService(c.String("service")); o.Service != hsm.ServiceUserManagement {
			return o, fmt.Errorf("--service %q: the quorum service is user-management", o.Service)
		}
	}
	return o, nil
}

// withQuorum runs fn with the session's quorum capability.
func withQuorum(ctx context.Context, o hsmQuorumOptions, fn func(s hsm.Session, q hsm.Quorum) error) error {
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		q, err := capable[hsm.Quorum](o.Dir, s, "authenticate by quorum")
		if err != nil {
			return err
		}
		return fn(s, q)
	})
}

func runQuorumKeygen(e *env, o hsmQuorumOptions) error {
	for _, p := range []string{o.Key, o.PublicOut} {
		if err := refuseExistingOutput(p, o.Force); err != nil {
			return err
		}
	}
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	priv, _ := x509.MarshalPKCS8PrivateKey(k)
	pub, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err := writeOutputFile(o.Key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: priv}), 0o600, o.Force); err != nil {
		return err
	}
	if err := writeOutputFile(o.PublicOut, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644, o.Force); err != nil {
		return err
	}
	_, err = fmt.Fprintf(e.stdout, "wrote the quorum key %s (mode 0600) and its public key %s\n", o.Key, o.PublicOut)
	return err
}

func runQuorumRegister(ctx context.Context, e *env, o hsmQuorumOptions) error {
	data, err := readBounded("public key", o.PublicKey, maxKeyFile)
	if err != nil {
		return err
	}
	return withQuorum(ctx, o, func(s hsm.Session, q hsm.Quorum) error {
		if err := q.RegisterQuorumKey(ctx, o.Username, data); err != nil {
			return inCluster(o.Dir, fmt.Errorf("register the quorum key of %s: %w", o.Username, err))
		}
		_, err := fmt.Fprintf(e.stdout, "registered the quorum key of %s from %s\n", o.Username, o.PublicKey)
		return err
	})
}

func runQuorumPolicySet(ctx context.Context, e *env, o hsmQuorumOptions) error {
	return withQuorum(ctx, o, func(s hsm.Session, q hsm.Quorum) error {
		if err := q.SetQuorumPolicy(ctx, o.Service, o.Value); err != nil {
			return inCluster(o.Dir, fmt.Errorf("set the %s quorum to %d: %w", o.Service, o.Value, err))
		}
		_, err := fmt.Fprintf(e.stdout, "%s quorum of cluster %s: %d\n", o.Service, o.Dir, o.Value)
		return err
	})
}

func runQuorumTokenGenerate(ctx context.Context, e *env, o hsmQuorumOptions) error {
	if err := refuseExistingOutput(o.Out, o.Force); err != nil {
		return err
	}
	return withQuorum(ctx, o, func(s hsm.Session, q hsm.Quorum) error {
		tok, err := q.GenerateQuorumToken(ctx, o.Service)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("generate a %s quorum token: %w", o.Service, err))
		}
		if err := writeQuorumFile(o.Out, quorumFile{Token: &tok}, o.Force); err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "quorum token %s for %s written to %s; it expires at %s\n", tok.ID, tok.User, o.Out, tok.Expires.UTC().Format("15:04:05Z"))
		return err
	})
}

func runQuorumTokenSign(e *env, o hsmQuorumOptions) error {
	tok, err := readQuorumToken(o.Token)
	if err != nil {
		return err
	}
	if err := refuseExistingOutput(o.Out, o.Force); err != nil {
		return err
	}
	st, err := os.Stat(o.Key)
	if err != nil {
		return fmt.Errorf("quorum key %s: %w", o.Key, err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("quorum key %s can be read or written by others (mode %04o): run `chmod 600 %s`", o.Key, perm, o.Key)
	}
	k, err := loadRSAPrivateKey("quorum key", o.Key, "quorum token signing")
	if err != nil {
		return err
	}
	a, err := hsm.SignQuorumToken(tok, k)
	if err != nil {
		return err
	}
	if err := writeQuorumFile(o.Out, quorumFile{Approval: &a}, o.Force); err != nil {
		return err
	}
	_, err = fmt.Fprintf(e.stdout, "signed quorum token %s: approval written to %s\n", tok.ID, o.Out)
	return err
}

func runQuorumTokenApprove(ctx context.Context, e *env, o hsmQuorumOptions) error {
	tok, err := readQuorumToken(o.Token)
	if err != nil {
		return err
	}
	var approvals []hsm.QuorumApproval
	for _, p := range o.Signatures {
		f, err := readQuorumFile(p)
		if err != nil {
			return err
		}
		if f.Approval == nil {
			return fmt.Errorf("--signature %s holds no approval; make one with `keymig hsm quorum token sign`", p)
		}
		approvals = append(approvals, *f.Approval)
	}
	return withQuorum(ctx, o, func(s hsm.Session, q hsm.Quorum) error {
		if err := q.ApproveQuorumToken(ctx, tok.ID, approvals); err != nil {
			return inCluster(o.Dir, fmt.Errorf("approve quorum token %s: %w", tok.ID, err))
		}
		_, err := fmt.Fprintf(e.stdout, "approved quorum token %s with %d approvals; the next user-management operation of %s spends it\n", tok.ID, len(approvals), tok.User)
		return err
	})
}

func writeQuorumFile(path string, f quorumFile, force bool) error {
	f.Format = quorumFileFormat
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return writeOutputFile(path, append(b, '\n'), 0o600, force)
}

func readQuorumFile(path string) (quorumFile, error) {
	data, err := readBounded("quorum file", path, maxKeyFile)
	if err != nil {
		return quorumFile{}, err
	}
	var f quorumFile
	if err := json.Unmarshal(data, &f); err != nil || f.Format != quorumFileFormat {
		return quorumFile{}, fmt.Errorf("%s is not a keymig quorum token or approval", path)
	}
	return f, nil
}

func readQuorumToken(path string) (hsm.QuorumToken, error) {
	f, err := readQuorumFile(path)
	if err != nil {
		return hsm.QuorumToken{}, err
	}
	if f.Token == nil {
		return hsm.QuorumToken{}, errors.New(path + " holds no quorum token; make one with `keymig hsm quorum token generate`")
	}
	return *f.Token, nil
}
