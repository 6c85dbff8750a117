package cli

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/keymig/keymig/wrap"
	"github.com/urfave/cli/v2"
)

// Mechanism names, as the --mechanism flag spells them.
const (
	mechRSAAES  = "rsa-aes"
	mechRSAOAEP = "rsa-oaep"
	mechAESKWP  = "aes-kwp"
	mechAESKW   = "aes-kw"
)

// mechParams are the options shared by wrap and unwrap: the mechanism and its
// parameters, the two files, and how the blob and outputs are written.
type mechParams struct {
	Mechanism string // rsa-aes, rsa-oaep, aes-kwp or aes-kw
	In, Out   string
	Hash      string // OAEP hash name
	MGF1Hash  string // MGF1 hash name; empty = same as Hash
	LabelHex  string // OAEP label, hex
	AESBits   int    // rsa-aes ephemeral key size
	Base64    bool   // the blob is base64 text
	Force     bool   // replace an existing output file
}

// rsaOnlyFlags are the flags that mean nothing for the AES mechanisms.
var rsaOnlyFlags = []string{"hash", "mgf1-hash", "label-hex", "aes-bits"}

func (p *mechParams) isRSA() bool { return p.Mechanism == mechRSAAES || p.Mechanism == mechRSAOAEP }

// mechanismFlag is --mechanism, listed first in help.
func (p *mechParams) mechanismFlag() cli.Flag {
	return &cli.StringFlag{Name: "mechanism", Aliases: []string{"m"}, Required: true, Destination: &p.Mechanism,
		Usage: "rsa-aes, rsa-oaep, aes-kwp or aes-kw"}
}

// flags returns the flags common to wrap and unwrap; aesBitsDefault and
// aesBitsUsage differ between the two.
func (p *mechParams) flags(aesBitsDefault int, aesBitsUsage string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "hash", Value: "sha256", Destination: &p.Hash,
			Usage: "OAEP hash (rsa-aes, rsa-oaep): sha1, sha224, sha256, sha384 or sha512"},
		&cli.StringFlag{Name: "mgf1-hash", Destination: &p.MGF1Hash, DefaultText: "same as --hash",
			Usage: "OAEP MGF1 hash, when the other side uses a different one (e.g. sha1 with --hash sha256)"},
		&cli.StringFlag{Name: "label-hex", Destination: &p.LabelHex, DefaultText: "no label",
			Usage: "OAEP label, in hex"},
		&cli.IntFlag{Name: "aes-bits", Value: aesBitsDefault, Destination: &p.AESBits, Usage: aesBitsUsage},
		&cli.BoolFlag{Name: "base64", Destination: &p.Base64,
			Usage: "the wrapped blob is base64 text, as cloud consoles hand it out"},
		&cli.BoolFlag{Name: "force", Destination: &p.Force,
			Usage: "replace --out if it exists"},
	}
}

// checkFlagsApply refuses RSA-only flags given with an AES mechanism, so a
// user who believes --hash matters there is told it does not.
func (p *mechParams) checkFlagsApply(c *cli.Context) error {
	if p.isRSA() {
		return nil
	}
	for _, f := range rsaOnlyFlags {
		if c.IsSet(f) {
			return fmt.Errorf("--%s applies only to rsa-aes and rsa-oaep, not to %s", f, p.Mechanism)
		}
	}
	return nil
}

// rsaParams turns the flags into the wrap package's parameters.
func (p *mechParams) rsaParams() (wrap.RSAAESParams, error) {
	var r wrap.RSAAESParams
	h, err := wrap.ParseHash(p.Hash)
	if err != nil {
		return r, fmt.Errorf("--hash: %w", err)
	}
	r.OAEP.Hash = h
	r.OAEP.MGF1Hash = h
	if p.MGF1Hash != "" {
		if r.OAEP.MGF1Hash, err = wrap.ParseHash(p.MGF1Hash); err != nil {
			return r, fmt.Errorf("--mgf1-hash: %w", err)
		}
	}
	if p.LabelHex != "" {
		if r.OAEP.Label, err = hex.DecodeString(p.LabelHex); err != nil {
			return r, fmt.Errorf("--label-hex %q is not hex: %w", p.LabelHex, err)
		}
	}
	switch p.AESBits {
	case 0, 128, 192, 256:
		r.AESBits = p.AESBits
	default:
		return r, fmt.Errorf("--aes-bits %d: want 128, 192 or 256", p.AESBits)
	}
	return r, nil
}

// validate checks what can be checked before any file is read.
func (p *mechParams) validate() error {
	switch p.Mechanism {
	case mechRSAAES, mechRSAOAEP, mechAESKWP, mechAESKW:
	default:
		return fmt.Errorf("--mechanism %q: want rsa-aes, rsa-oaep, aes-kwp or aes-kw", p.Mechanism)
	}
	if p.In == "" || p.Out == "" {
		return errors.New("--in and --out are both required")
	}
	if filepath.Clean(p.In) == filepath.Clean(p.Out) {
		return fmt.Errorf("--in and --out are the same file %s; write to a new file", p.Out)
	}
	if p.isRSA() {
		if _, err := p.rsaParams(); err != nil {
			return err
		}
	}
	return nil
}

// describe says which mechanism and parameters were used, for the summary.
func (p *mechParams) describe(r wrap.RSAAESParams, keyBits int) string {
	switch p.Mechanism {
	case mechRSAOAEP, mechRSAAES:
		s := fmt.Sprintf("%s, RSA-%d, %s", p.Mechanism, keyBits, wrap.HashName(r.OAEP.Hash))
		if r.OAEP.MGF1Hash != r.OAEP.Hash {
			s += ", mgf1 " + wrap.HashName(r.OAEP.MGF1Hash)
		}
		if len(r.OAEP.Label) > 0 {
			s += fmt.Sprintf(", %d-byte label", len(r.OAEP.Label))
		}
		if p.Mechanism == mechRSAAES && r.AESBits != 0 {
			s += fmt.Sprintf(", AES-%d ephemeral key", r.AESBits)
		}
		return s
	default:
		return fmt.Sprintf("%s, AES-%d", p.Mechanism, keyBits)
	}
}

// refuseExisting fails early, before any work, if --out exists and --force
// was not given; writeFileAtomic checks again when it writes.
func (p *mechParams) refuseExisting() error {
	if p.Force {
		return nil
	}
	if _, err := os.Lstat(p.Out); err == nil {
		return fmt.Errorf("output %s already exists; pass --force to replace it", p.Out)
	}
	return nil
}

// writeOutput writes data to --out with mode 0600.
func (p *mechParams) writeOutput(data []byte) error {
	if err := writeFileAtomic(p.Out, data, 0o600, p.Force); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("output %s already exists; pass --force to replace it", p.Out)
		}
		return err
	}
	return nil
}

// wrapOptions are the inputs of `keymig wrap`.
type wrapOptions struct {
	mechParams
	WrappingKey string // RSA public key (rsa-*) or raw AES key (aes-*)
}

func wrapCommand(e *env) *cli.Command {
	var opts wrapOptions
	flags := []cli.Flag{opts.mechanismFlag(),
		&cli.StringFlag{Name: "wrapping-key", Aliases: []string{"k"}, Required: true, Destination: &opts.WrappingKey,
			Usage: "`FILE` with the RSA public key (rsa-aes, rsa-oaep) or the raw AES key (aes-kwp, aes-kw)"},
		&cli.StringFlag{Name: "in", Required: true, Destination: &opts.In,
			Usage: "`KEYFILE` to wrap: raw secret key bytes, or a private key (PEM or DER; wrapped as DER PKCS#8)"},
		&cli.StringFlag{Name: "out", Required: true, Destination: &opts.Out,
			Usage: "`BLOB` file to create (mode 0600)"},
	}
	flags = append(flags, opts.flags(256, "size of the ephemeral AES key (rsa-aes): 128, 192 or 256")...)
	return &cli.Command{
		Name:  "wrap",
		Usage: "wrap a key file offline, for import into an HSM or a cloud KMS",
		UsageText: `keymig wrap --mechanism rsa-aes|rsa-oaep|aes-kwp|aes-kw --wrapping-key FILE --in KEYFILE --out BLOB [options]

Examples:
  # Wrap an AES-256 key for a cloud KMS import (RSA_AES_KEY_WRAP_SHA_256):
  keymig wrap --mechanism rsa-aes --wrapping-key import-public.pem --in aes256.bin --out blob.bin

  # The same for a console that wants base64 and SHA-1 (RSA_AES_KEY_WRAP_SHA_1):
  keymig wrap --mechanism rsa-aes --hash sha1 --wrapping-key pub.der --in aes256.bin --out blob.b64 --base64

  # Wrap a small key with plain RSA-OAEP, SHA-256 with MGF1-SHA-1 (the PKCS#11 default on many HSMs):
  keymig wrap --mechanism rsa-oaep --hash sha256 --mgf1-hash sha1 --wrapping-key cert.pem --in aes128.bin --out blob.bin

  # Wrap an RSA private key under an AES key-encryption key (RFC 5649):
  keymig wrap --mechanism aes-kwp --wrapping-key kek.bin --in rsa.pem --out rsa.kwp`,
		Description: `wrap encrypts a key under a wrapping key so that only the holder of the
unwrapping key can recover it. It reads and writes local files only.

Mechanisms:
  rsa-aes   RSA-OAEP of a fresh AES key, then AES-KWP (RFC 5649) of the payload
            under it (PKCS#11 CKM_RSA_AES_KEY_WRAP, AWS KMS RSA_AES_KEY_WRAP_SHA_*,
            Google Cloud KMS RSA_OAEP_*_SHA*_AES). Wraps keys of any size.
  rsa-oaep  RSA-OAEP of the payload itself (CKM_RSA_PKCS_OAEP); only small keys
            fit: at most modulus bytes - 2 * hash bytes - 2 (190 bytes for
            RSA-2048 with SHA-256).
  aes-kwp   AES key wrap with padding (RFC 5649, CKM_AES_KEY_WRAP_KWP), any length.
  aes-kw    AES key wrap (RFC 3394, CKM_AES_KEY_WRAP), multiples of 8 bytes, at least 16.

Key files are detected, not declared: an RSA wrapping key may be a
SubjectPublicKeyInfo or PKCS#1 public key, an X.509 certificate or a private
key, PEM or DER; an AES wrapping key is the raw 16, 24 or 32 bytes. A private
key given as --in (PEM or DER, PKCS#1, SEC 1 or PKCS#8) is wrapped as DER
PKCS#8, the form HSMs import; any other file is wrapped byte for byte.

The output is created with mode 0600 and never replaces an existing file
unless --force is given. The summary on stdout shows the payload's key check
value (KCV) as CloudHSM computes it, to compare after import.`,
		Flags: flags,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return fmt.Errorf("unexpected argument %q: wrap takes flags only (see keymig wrap --help)", c.Args().First())
			}
			if err := opts.checkFlagsApply(c); err != nil {
				return err
			}
			return runWrap(c.Context, e, opts)
		},
	}
}

// runWrap wraps the key in opts.In under opts.WrappingKey and writes the blob
// to opts.Out.
func runWrap(ctx context.Context, e *env, opts wrapOptions) error {
	stdout := e.stdout
	if err := opts.validate(); err != nil {
		return err
	}
	if err := opts.refuseExisting(); err != nil {
		return err
	}
	payload, what, err := readPayload(opts.In)
	if err != nil {
		return err
	}
	defer clear(payload)
	kcv := payloadKCV(payload)

	var blob []byte
	var params wrap.RSAAESParams
	var keyBits int
	switch opts.Mechanism {
	case mechRSAAES, mechRSAOAEP:
		if params, err = opts.rsaParams(); err != nil {
			return err
		}
		pub, err := loadRSAPublicKey("wrapping key", opts.WrappingKey, opts.Mechanism)
		if err != nil {
			return err
		}
		keyBits = pub.N.BitLen()
		if opts.Mechanism == mechRSAAES {
			blob, err = wrap.WrapRSAAES(pub, payload, params)
		} else {
			blob, err = wrap.WrapOAEP(pub, payload, params.OAEP)
		}
		if err != nil {
			return fmt.Errorf("cannot wrap %s with wrapping key %s: %w", opts.In, opts.WrappingKey, err)
		}
	case mechAESKWP, mechAESKW:
		kek, err := loadAESKey("wrapping key", opts.WrappingKey, opts.Mechanism)
		if err != nil {
			return err
		}
		defer clear(kek)
		keyBits = 8 * len(kek)
		if opts.Mechanism == mechAESKWP {
			blob, err = wrap.KeyWrapPad(kek, payload)
		} else {
			blob, err = wrap.KeyWrap(kek, payload)
		}
		if err != nil {
			return fmt.Errorf("cannot wrap %s with wrapping key %s: %w", opts.In, opts.WrappingKey, err)
		}
	}

	out := blob
	if opts.Base64 {
		out = []byte(base64.StdEncoding.EncodeToString(blob) + "\n")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := opts.writeOutput(out); err != nil {
		return err
	}
	enc := ""
	if opts.Base64 {
		enc = ", base64"
	}
	fmt.Fprintf(stdout, "wrapped %s from %s into %s (%d bytes%s) with %s\n",
		what, opts.In, opts.Out, len(blob), enc, opts.describe(params, keyBits))
	if kcv != "" {
		fmt.Fprintf(stdout, "kcv %s\n", kcv)
	}
	return nil
}

// readPayload reads the key to wrap. A private key file (PEM or DER) becomes
// DER PKCS#8, the form HSMs and KMSs import; anything else is taken byte for
// byte. what describes the payload for the summary.
func readPayload(path string) (payload []byte, what string, err error) {
	data, err := readBounded("key file", path, maxPayloadFile)
	if err != nil {
		return nil, "", err
	}
	if !isPEM(data) {
		if k, err := x509.ParsePKCS1PrivateKey(data); err == nil {
			return toPKCS8(path, k, data)
		}
		if k, err := x509.ParseECPrivateKey(data); err == nil {
			return toPKCS8(path, k, data)
		}
		if _, err := x509.ParsePKCS8PrivateKey(data); err == nil {
			return data, fmt.Sprintf("a %d-byte PKCS#8 private key", len(data)), nil
		}
		if pk, err := parseAsymmetricKey(data); err == nil {
			return nil, "", fmt.Errorf("key file %s is %s (%s): there is nothing secret to wrap; --in takes a secret or private key", path, describeKey(pk.key), pk.format)
		}
		return data, fmt.Sprintf("%d bytes", len(data)), nil
	}
	defer clear(data)
	pk, err := parseAsymmetricKey(data)
	if err != nil {
		return nil, "", fmt.Errorf("key file %s %w", path, err)
	}
	switch k := pk.key.(type) {
	case *rsa.PrivateKey:
		return toPKCS8(path, k, nil)
	case *ecdsa.PrivateKey:
		return toPKCS8(path, k, nil)
	default:
		return nil, "", fmt.Errorf("key file %s is %s (%s): there is nothing secret to wrap; --in takes a secret or private key", path, describeKey(k), pk.format)
	}
}

func toPKCS8(path string, k crypto.Signer, orig []byte) ([]byte, string, error) {
	clear(orig)
	der, err := wrap.MarshalPKCS8(k)
	if err != nil {
		return nil, "", fmt.Errorf("key file %s: %w", path, err)
	}
	return der, fmt.Sprintf("%s as %d bytes of DER PKCS#8", describeKey(k), len(der)), nil
}

// payloadKCV returns the CloudHSM KCV of a payload in hex when it is an AES
// key or a PKCS#8 private key, and "" otherwise.
func payloadKCV(payload []byte) string {
	var kcv []byte
	switch len(payload) {
	case 16, 24, 32:
		kcv, _ = wrap.KCVSecret(payload)
	default:
		if k, err := wrap.ParsePKCS8(payload); err == nil {
			kcv, _ = wrap.KCVPublic(k.Public())
		}
	}
	if kcv == nil {
		return ""
	}
	return hex.EncodeToString(kcv)
}

// decodeBlob turns the blob file's bytes into the wrapped blob. With --base64
// it decodes base64 (standard or URL alphabet, white space ignored); without
// it, a blob that is all base64 text is refused with a hint, since the
// unwrap failure that would follow could not say why.
func decodeBlob(path string, data []byte, isBase64 bool) ([]byte, error) {
	text := strings.Join(strings.Fields(string(data)), "")
	if isBase64 {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
			if b, err := enc.DecodeString(text); err == nil && len(b) > 0 {
				return b, nil
			}
		}
		return nil, fmt.Errorf("blob %s is not base64 text; drop --base64 if it is binary", path)
	}
	// Binary ciphertext is all base64 alphabet with negligible probability.
	if len(text) >= 24 {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			if _, err := enc.DecodeString(text); err == nil {
				return nil, fmt.Errorf("blob %s is base64 text; pass --base64", path)
			}
		}
	}
	return data, nil
}
