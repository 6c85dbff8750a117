package cli

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmKeyExportPublicOptions are the inputs of `keymig hsm key export-public`.
type hsmKeyExportPublicOptions struct {
	clusterOptions
	Filter hsm.Filter
	Out    string
	Force  bool
}

// hsmKeyExportPublicCommand is `keymig hsm key export-public`.
func hsmKeyExportPublicCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "export-public",
		Usage: "write the public half of a key pair as a PEM file",
		Description: `The filter may select either half of an RSA or EC key pair; the file is a
PEM SubjectPublicKeyInfo that openssl reads ("openssl pkey -pubin -in FILE").

Example:
  keymig hsm key export-public --cluster ./hsm1 --filter attr.label=transport --filter attr.class=public-key --out transport.pem`,
		Flags: append(clusterFlags(true),
			filterFlag("filter", "the key pair"),
			&cli.StringFlag{Name: "out", Required: true, Usage: "the PEM `FILE` to write"},
			&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"}),
		Action: func(c *cli.Context) error {
			f, err := parseFilterFlag("filter", c.StringSlice("filter"))
			if err != nil {
				return err
			}
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			return runHSMKeyExportPublic(c.Context, e, hsmKeyExportPublicOptions{clusterOptions: co, Filter: f,
				Out: c.String("out"), Force: c.Bool("force")})
		},
	}
}

// runHSMKeyExportPublic writes the selected key pair's public key to o.Out.
func runHSMKeyExportPublic(ctx context.Context, e *env, o hsmKeyExportPublicOptions) error {
	stdout := e.stdout
	if err := refuseExistingOutput(o.Out, o.Force); err != nil {
		return err
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		k, err := selectKey(ctx, s, o.Filter, "export-public")
		if err != nil {
			return inCluster(o.Dir, err)
		}
		if k.Class == hsm.ClassSecret {
			return inCluster(o.Dir, fmt.Errorf("export-public: %s is a secret key and has no public half", keyName(k)))
		}
		pem, err := s.ExportPublicKey(ctx, k.Ref)
		if err != nil {
			return inCluster(o.Dir, explainKeyError("export-public", k, s.User().Name, err))
		}
		if err := writeOutputFile(o.Out, pem, 0o644, o.Force); err != nil {
			return err
		}
		if o.Output == outputJSON {
			return writeJSON(stdout, struct {
				Cluster string      `json:"cluster"`
				Key     hsm.KeyInfo `json:"key"`
				Out     string      `json:"out"`
			}{o.Dir, jsonKey(k), o.Out})
		}
		_, err = fmt.Fprintf(stdout, "wrote the public key of %s to %s\n", keyName(k), o.Out)
		return err
	})
}

// hsmKeyImportPublicOptions are the inputs of `keymig hsm key import-public`.
type hsmKeyImportPublicOptions struct {
	clusterOptions
	In       string
	Template hsm.Template
}

// hsmKeyImportPublicCommand is `keymig hsm key import-public`.
func hsmKeyImportPublicCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "import-public",
		Usage: "store a PEM public key (RSA or EC) as a public-key object",
		Description: `An imported RSA public key with wrap=true can wrap extractable keys out of
the HSM (keymig hsm key wrap --mechanism rsa-aes|rsa-oaep), to be unwrapped
by whoever holds the private key. To wrap wrap-with-trusted keys, a crypto
officer must also set trusted=true on it.

Example:
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out priv.pem
  openssl pkey -in priv.pem -pubout -out pub.pem
  keymig hsm key import-public --cluster ./hsm1 --in pub.pem --label partner --attr wrap=true`,
		Flags: append(clusterFlags(true),
			&cli.StringFlag{Name: "in", Required: true, Usage: "the PEM `FILE` (PUBLIC KEY)"},
			&cli.StringFlag{Name: "label", Aliases: []string{"l"}, Required: true, Usage: "the key's label"},
			&cli.StringFlag{Name: "id", Usage: "the key's id, in hex"},
			&cli.StringSliceFlag{Name: "attr", Usage: "NAME=VALUE attribute, e.g. wrap=true (repeatable)"}),
		Action: func(c *cli.Context) error {
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			o := hsmKeyImportPublicOptions{clusterOptions: co, In: c.String("in"), Template: hsm.Template{Label: c.String("label")}}
			if id := c.String("id"); id != "" {
				if o.Template.ID, err = hex.DecodeString(strings.TrimPrefix(id, "0x")); err != nil {
					return fmt.Errorf("--id %q: want hex, e.g. 0a0b", id)
				}
			}
			if o.Template.Attrs, err = hsm.ParseAttrAssignments(c.StringSlice("attr")); err != nil {
				return fmt.Errorf("--attr: %w", err)
			}
			return runHSMKeyImportPublic(c.Context, e, o)
		},
	}
}

// runHSMKeyImportPublic imports o.In and prints the new key.
func runHSMKeyImportPublic(ctx context.Context, e *env, o hsmKeyImportPublicOptions) error {
	stdout, stderr := e.stdout, e.stderr
	data, err := readBounded("public key", o.In, maxKeyFile)
	if err != nil {
		return err
	}
	if !isPEM(data) {
		return fmt.Errorf("public key %s is not PEM; convert it with `openssl pkey -pubin -inform DER -in %s -out key.pem`", o.In, o.In)
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		k, err := s.ImportPublicKey(ctx, data, o.Template)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("import-public %s as %q: %w", o.In, o.Template.Label, err))
		}
		warnCoverage(stderr, o.Dir, []hsm.KeyInfo{k})
		return printKeys(stdout, o.Output, o.Dir, []hsm.KeyInfo{k}, false)
	})
}

// refuseExistingOutput fails before any work if path exists and force is
// not set; writeOutputFile checks again when it writes.
func refuseExistingOutput(path string, force bool) error {
	if path == "" {
		return errors.New("--out is required")
	}
	if force {
		return nil
	}
	if fileExists(path) {
		return fmt.Errorf("output %s already exists; pass --force to replace it", path)
	}
	return nil
}

// writeOutputFile writes data to path atomically with mode perm, never
// replacing an existing file unless force.
func writeOutputFile(path string, data []byte, perm fs.FileMode, force bool) error {
	if err := writeFileAtomic(path, data, perm, force); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("output %s already exists; pass --force to replace it", path)
		}
		return err
	}
	return nil
}

// fileExists reports whether path names anything, even a dangling symlink.
func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
