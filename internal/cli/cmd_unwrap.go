package cli

import (
	"context"
	"fmt"

	"github.com/keymig/keymig/wrap"
	"github.com/urfave/cli/v2"
)

// unwrapOptions are the inputs of `keymig unwrap`.
type unwrapOptions struct {
	mechParams
	UnwrappingKey string // RSA private key (rsa-*) or raw AES key (aes-*)
}

func unwrapCommand(e *env) *cli.Command {
	var opts unwrapOptions
	flags := []cli.Flag{opts.mechanismFlag(),
		&cli.StringFlag{Name: "unwrapping-key", Aliases: []string{"k"}, Required: true, Destination: &opts.UnwrappingKey,
			Usage: "`FILE` with the RSA private key (rsa-aes, rsa-oaep; PKCS#8 or PKCS#1, PEM or DER) or the raw AES key (aes-kwp, aes-kw)"},
		&cli.StringFlag{Name: "in", Required: true, Destination: &opts.In,
			Usage: "wrapped `BLOB` to read"},
		&cli.StringFlag{Name: "out", Required: true, Destination: &opts.Out,
			Usage: "`KEYFILE` to create (mode 0600): the key as it was wrapped (raw bytes, or DER PKCS#8 for a private key)"},
	}
	flags = append(flags, opts.flags(0, "require an ephemeral AES key of this size (rsa-aes): 128, 192 or 256 (default: accept any of them)")...)
	return &cli.Command{
		Name:  "unwrap",
		Usage: "unwrap a wrapped key blob offline, to check it or to recover the key",
		UsageText: `keymig unwrap --mechanism rsa-aes|rsa-oaep|aes-kwp|aes-kw --unwrapping-key FILE --in BLOB --out KEYFILE [options]

Examples:
  # Check a blob made by keymig wrap, openssl or a KMS export:
  keymig unwrap --mechanism rsa-aes --unwrapping-key private.pem --in blob.bin --out key.bin

  # A base64 blob wrapped with OAEP SHA-256 and MGF1-SHA-1:
  keymig unwrap --mechanism rsa-oaep --hash sha256 --mgf1-hash sha1 --unwrapping-key private.der --in blob.b64 --base64 --out key.bin

  # An RFC 5649 blob under an AES key-encryption key:
  keymig unwrap --mechanism aes-kwp --unwrapping-key kek.bin --in rsa.kwp --out rsa.p8.der`,
		Description: `unwrap reverses keymig wrap (and openssl, PKCS#11 or cloud KMS wrapping with
the same mechanism and parameters); see keymig wrap --help for the mechanisms
and key file formats. It reads and writes local files only.

Whatever goes wrong while unwrapping — the wrong unwrapping key, hash, MGF1
hash, label or mechanism, or a damaged blob — keymig prints one message and
exits with status 1: telling these apart would help an attacker decrypt
blobs without the key. Check each parameter against what the wrapping side
used.

The recovered key is written with mode 0600 and never replaces an existing
file unless --force is given. The summary on stdout shows its key check value
(KCV) as CloudHSM computes it.`,
		Flags: flags,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return fmt.Errorf("unexpected argument %q: unwrap takes flags only (see keymig unwrap --help)", c.Args().First())
			}
			if err := opts.checkFlagsApply(c); err != nil {
				return err
			}
			return runUnwrap(c.Context, e, opts)
		},
	}
}

// runUnwrap unwraps the blob in opts.In with opts.UnwrappingKey and writes
// the key to opts.Out. Every cryptographic failure is wrap.ErrUnwrap, returned
// as is so that the message never varies.
func runUnwrap(ctx context.Context, e *env, opts unwrapOptions) error {
	stdout := e.stdout
	if err := opts.validate(); err != nil {
		return err
	}
	if err := opts.refuseExisting(); err != nil {
		return err
	}
	raw, err := readBounded("blob", opts.In, maxPayloadFile)
	if err != nil {
		return err
	}
	blob, err := decodeBlob(opts.In, raw, opts.Base64)
	if err != nil {
		return err
	}

	var key []byte
	var params wrap.RSAAESParams
	var keyBits int
	switch opts.Mechanism {
	case mechRSAAES, mechRSAOAEP:
		if params, err = opts.rsaParams(); err != nil {
			return err
		}
		priv, err := loadRSAPrivateKey("unwrapping key", opts.UnwrappingKey, opts.Mechanism)
		if err != nil {
			return err
		}
		keyBits = priv.N.BitLen()
		if opts.Mechanism == mechRSAAES {
			key, err = wrap.UnwrapRSAAES(priv, blob, params)
		} else {
			key, err = wrap.UnwrapOAEP(priv, blob, params.OAEP)
		}
		if err != nil {
			return wrap.ErrUnwrap
		}
	case mechAESKWP, mechAESKW:
		kek, err := loadAESKey("unwrapping key", opts.UnwrappingKey, opts.Mechanism)
		if err != nil {
			return err
		}
		defer clear(kek)
		keyBits = 8 * len(kek)
		if opts.Mechanism == mechAESKWP {
			key, err = wrap.KeyUnwrapPad(kek, blob)
		} else {
			key, err = wrap.KeyUnwrap(kek, blob)
		}
		if err != nil {
			return wrap.ErrUnwrap
		}
	}
	defer clear(key)

	if err := ctx.Err(); err != nil {
		return err
	}
	if err := opts.writeOutput(key); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "unwrapped %d bytes from %s into %s with %s\n",
		len(key), opts.In, opts.Out, opts.describe(params, keyBits))
	if kcv := payloadKCV(key); kcv != "" {
		fmt.Fprintf(stdout, "kcv %s\n", kcv)
	}
	return nil
}
