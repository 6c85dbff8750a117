package cli

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmWrapParams are the mechanism flags shared by key wrap and key unwrap.
type hsmWrapParams struct {
	Mechanism hsm.Mechanism
	Params    hsm.Params
	Base64    bool // the blob file is base64 text
}

// hsmWrapFlags are the flags of hsmWrapParams.
func hsmWrapFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "mechanism", Aliases: []string{"m"}, Required: true, Usage: "rsa-aes, rsa-oaep, aes-kwp, aes-kw, or rsa-pkcs (PKCS#1 v1.5; clusters made with --non-fips only)"},
		&cli.StringFlag{Name: "hash", Value: "sha256", Usage: "OAEP hash (rsa-aes, rsa-oaep): sha1, sha224, sha256, sha384 or sha512"},
		&cli.StringFlag{Name: "mgf1-hash", DefaultText: "same as --hash", Usage: "OAEP MGF1 hash (rsa-aes, rsa-oaep)"},
		&cli.StringFlag{Name: "label-hex", DefaultText: "no label", Usage: "OAEP label in hex (rsa-aes, rsa-oaep)"},
		&cli.BoolFlag{Name: "base64", Usage: "the blob file is base64 text instead of binary"},
	}
}

// hsmWrapParamsFrom reads and checks the mechanism flags.
func hsmWrapParamsFrom(c *cli.Context) (hsmWrapParams, error) {
	m, err := hsm.ParseMechanism(c.String("mechanism"))
	if err != nil {
		return hsmWrapParams{}, fmt.Errorf("--mechanism: %w", err)
	}
	p := hsmWrapParams{Mechanism: m, Base64: c.Bool("base64")}
	rsaFlags := []string{"hash", "mgf1-hash", "label-hex", "aes-bits"}
	switch m {
	case hsm.MechRSAAES, hsm.MechRSAOAEP:
		p.Params.Hash = strings.ToLower(c.String("hash"))
		p.Params.MGF1Hash = strings.ToLower(c.String("mgf1-hash"))
		if l := c.String("label-hex"); l != "" {
			if p.Params.Label, err = hex.DecodeString(l); err != nil {
				return hsmWrapParams{}, fmt.Errorf("--label-hex %q is not hex", l)
			}
		}
		if m == hsm.MechRSAAES {
			switch b := c.Int("aes-bits"); b {
			case 0, 128, 192, 256:
				p.Params.AESBits = b
			default:
				return hsmWrapParams{}, fmt.Errorf("--aes-bits %d: want 128, 192 or 256", b)
			}
		} else if c.IsSet("aes-bits") {
			return hsmWrapParams{}, errors.New("--aes-bits applies only to rsa-aes")
		}
	case hsm.MechAESKWP, hsm.MechAESKW, hsm.MechRSAPKCS:
		for _, f := range rsaFlags {
			if c.IsSet(f) {
				return hsmWrapParams{}, fmt.Errorf("--%s applies only to rsa-aes and rsa-oaep, not to %s; leave it out", f, m)
			}
		}
	default:
		return hsmWrapParams{}, fmt.Errorf("--mechanism %s cannot wrap keys: want rsa-aes, rsa-oaep, aes-kwp, aes-kw or rsa-pkcs", m)
	}
	return p, nil
}

// describe names the mechanism and its parameters for messages.
func (p hsmWrapParams) describe() string {
	s := string(p.Mechanism)
	if p.Mechanism == hsm.MechRSAAES || p.Mechanism == hsm.MechRSAOAEP {
		h := p.Params.Hash
		if h == "" {
			h = "sha256"
		}
		s += " " + h
		if p.Params.MGF1Hash != "" && p.Params.MGF1Hash != h {
			s += ", mgf1 " + p.Params.MGF1Hash
		}
		if p.Mechanism == hsm.MechRSAAES && p.Params.AESBits != 0 {
			s += fmt.Sprintf(", AES-%d ephemeral key", p.Params.AESBits)
		}
	}
	return s
}

// hsmKeyWrapOptions are the inputs of `keymig hsm key wrap`.
type hsmKeyWrapOptions struct {
	clusterOptions
	hsmWrapParams
	Payload  hsm.Filter
	Wrapping hsm.Filter
	Out      string
	Force    bool
}

// hsmKeyWrapCommand is `keymig hsm key wrap`.
func hsmKeyWrapCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "wrap",
		Usage: "export a key you own, encrypted under a wrapping key, to a file",
		Description: `As in CloudHSM, only the owner of the payload key may wrap it; the payload
must be extractable, the wrapping key must have wrap=true, and a
wrap-with-trusted payload needs a trusted wrapping key. The blob is written
with mode 0600 and never replaces a file without --force.

Blobs are the standard formats: rsa-oaep is PKCS#1 OAEP; rsa-aes is PKCS#11
CKM_RSA_AES_KEY_WRAP (the OAEP-encrypted ephemeral AES key, then the payload
under AES-KWP, RFC 5649); aes-kwp and aes-kw are RFC 5649 and RFC 3394;
rsa-pkcs is PKCS#1 v1.5, refused in FIPS mode (the default; see hsm init
--non-fips). So
` + "`keymig unwrap`" + ` or openssl can unwrap them outside with the private key.

Example:
  keymig hsm key import-public --cluster ./hsm1 --in partner.pem --label partner --attr wrap=true
  keymig hsm key wrap --cluster ./hsm1 --mechanism rsa-aes --hash sha256 \
    --payload-filter attr.label=payments --wrapping-filter attr.label=partner --out payments.blob
  keymig unwrap --mechanism rsa-aes --unwrapping-key partner-priv.pem --in payments.blob --out payments.key`,
		Flags: append(append(clusterFlags(true), hsmWrapFlags()...),
			&cli.IntFlag{Name: "aes-bits", Value: 256, Usage: "rsa-aes: size of the ephemeral AES key, 128, 192 or 256"},
			filterFlag("payload-filter", "the key to wrap"),
			filterFlag("wrapping-filter", "the wrapping key"),
			&cli.StringFlag{Name: "out", Required: true, Usage: "the blob `FILE` to write (mode 0600)"},
			&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"}),
		Action: func(c *cli.Context) error {
			p, err := hsmWrapParamsFrom(c)
			if err != nil {
				return err
			}
			payload, err := parseFilterFlag("payload-filter", c.StringSlice("payload-filter"))
			if err != nil {
				return err
			}
			wrapping, err := parseFilterFlag("wrapping-filter", c.StringSlice("wrapping-filter"))
			if err != nil {
				return err
			}
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			return runHSMKeyWrap(c.Context, e, hsmKeyWrapOptions{clusterOptions: co, hsmWrapParams: p,
				Payload: payload, Wrapping: wrapping, Out: c.String("out"), Force: c.Bool("force")})
		},
	}
}

// keyWrapResult is what key wrap prints as JSON.
type keyWrapResult struct {
	Cluster     string        `json:"cluster"`
	Payload     hsm.KeyInfo   `json:"payload"`
	WrappingKey hsm.KeyInfo   `json:"wrapping-key"`
	Mechanism   hsm.Mechanism `json:"mechanism"`
	Params      hsm.Params    `json:"params"`
	Out         string        `json:"out"`
	Bytes       int           `json:"bytes"`
	Base64      bool          `json:"base64"`
}

// runHSMKeyWrap wraps the payload key under the wrapping key into o.Out.
func runHSMKeyWrap(ctx context.Context, e *env, o hsmKeyWrapOptions) error {
	stdout := e.stdout
	if err := refuseExistingOutput(o.Out, o.Force); err != nil {
		return err
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		keys, err := s.ListKeys(ctx, hsm.Filter{})
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("list keys: %w", err))
		}
		payload, err := hsm.SelectOne(keys, o.Payload)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("--payload-filter: %w", err))
		}
		wrapping, err := hsm.SelectOne(keys, o.Wrapping)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("--wrapping-filter: %w", err))
		}
		if payload.Ref == wrapping.Ref {
			return inCluster(o.Dir, fmt.Errorf("wrap: %s cannot wrap itself; choose another --wrapping-filter", keyName(payload)))
		}
		blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: o.Mechanism, Params: o.Params, WrappingKey: wrapping.Ref, Payload: payload.Ref})
		if err != nil {
			return inCluster(o.Dir, wrapError(payload, wrapping, s.User().Name, o.hsmWrapParams, err))
		}
		data := blob
		if o.Base64 {
			data = []byte(base64.StdEncoding.EncodeToString(blob) + "\n")
		}
		if err := writeOutputFile(o.Out, data, 0o600, o.Force); err != nil {
			return err
		}
		if o.Output == outputJSON {
			return writeJSON(stdout, keyWrapResult{Cluster: o.Dir, Payload: jsonKey(payload), WrappingKey: jsonKey(wrapping),
				Mechanism: o.Mechanism, Params: o.Params, Out: o.Out, Bytes: len(blob), Base64: o.Base64})
		}
		_, err = fmt.Fprintf(stdout, "wrapped %s with %s using %s: %d bytes to %s (check value of the key: %s)\n",
			keyName(payload), keyName(wrapping), o.describe(), len(blob), o.Out, hexOrDash(payload.KCV))
		return err
	})
}

// wrapError says why the HSM refused to wrap payload with wrapping, in
// CloudHSM's terms, and what to do instead.
func wrapError(payload, wrapping hsm.KeyInfo, user string, p hsmWrapParams, err error) error {
	pn, wn := keyName(payload), keyName(wrapping)
	switch hsm.CodeOf(err) {
	case hsm.CodeNotExtractable:
		return &explainedError{fmt.Sprintf("%s is not extractable: it cannot be wrapped; sync it to a clone (masked copy) or rotate its data keys", pn), err}
	case hsm.CodePermission:
		switch {
		case payload.Owner != "" && payload.Owner != user && slices.Contains(payload.SharedWith, user):
			return &explainedError{fmt.Sprintf("%s is owned by %s and only shared with %s: only the owner of a key may wrap it; log in as %s", pn, payload.Owner, user, payload.Owner), err}
		case payload.Owner != "" && payload.Owner != user:
			return &explainedError{fmt.Sprintf("%s is owned by %s: only the owner of a key may wrap it; log in as %s", pn, payload.Owner, payload.Owner), err}
		case payload.Attrs.WrapWithTrusted && !wrapping.Attrs.Trusted:
			return &explainedError{fmt.Sprintf("%s is wrap-with-trusted and wrapping %s is not trusted: a crypto officer must set trusted=true on the wrapping key (keymig hsm key set-attribute --filter key-reference=%s --name trusted --value true), or wrap with a trusted key", pn, wn, wrapping.Ref), err}
		case !wrapping.Attrs.Wrap:
			return &explainedError{fmt.Sprintf("wrapping %s does not have wrap=true: it cannot wrap keys; import or generate a wrapping key with --attr wrap=true", wn), err}
		case !payload.Attrs.Extractable:
			return &explainedError{fmt.Sprintf("%s is not extractable: it cannot be wrapped; sync it to a clone (masked copy) or rotate its data keys", pn), err}
		}
	case hsm.CodeUnsupportedMechanism, hsm.CodeInvalidInput:
		return &explainedError{fmt.Sprintf("wrap %s with %s using %s: %s", pn, wn, p.describe(), hsmMsg(err)), err}
	case hsm.CodeQuorum:
		return &explainedError{fmt.Sprintf("wrap %s with %s: %s; bring the missing HSM back up (`keymig hsm fault --up`): the key reaches it at the next command", pn, wn, hsmMsg(err)), err}
	}
	return &explainedError{fmt.Sprintf("wrap %s with %s: %s", pn, wn, hsmMsg(err)), err}
}

// hsmKeyUnwrapOptions are the inputs of `keymig hsm key unwrap`.
type hsmKeyUnwrapOptions struct {
	clusterOptions
	hsmWrapParams
	Unwrapping hsm.Filter
	In         string
	Class      hsm.Class
	Type       hsm.KeyType
	Template   hsm.Template
}

// unwrapKeyTypes are the --key-type values of key unwrap.
var unwrapKeyTypes = map[string]struct {
	class hsm.Class
	typ   hsm.KeyType
}{
	"aes":            {hsm.ClassSecret, hsm.TypeAES},
	"generic-secret": {hsm.ClassSecret, hsm.TypeGeneric},
	"rsa-private":    {hsm.ClassPrivate, hsm.TypeRSA},
	"ec-private":     {hsm.ClassPrivate, hsm.TypeEC},
}

// hsmKeyUnwrapCommand is `keymig hsm key unwrap`.
func hsmKeyUnwrapCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "unwrap",
		Usage: "import a wrapped key from a file, decrypted inside the HSM by an unwrapping key",
		Description: `The unwrapping key (selected by --filter) must have unwrap=true and be usable
by the caller; the new key is owned by the caller. Any failure to decrypt
gives one message, whatever the cause (no padding oracle). A private key
inside an rsa-aes or rsa-oaep blob is PKCS#8; an AES key is its raw bytes.

Example:
  keymig wrap --mechanism rsa-aes --wrapping-key transport.pem --in payments.key --out payments.blob
  keymig hsm key unwrap --cluster ./hsm1 --mechanism rsa-aes --filter attr.label=transport --filter attr.class=private-key \
    --in payments.blob --label payments --key-type aes --attr extractable=false`,
		Flags: append(append(clusterFlags(true), hsmWrapFlags()...),
			&cli.IntFlag{Name: "aes-bits", Usage: "rsa-aes: accepted for symmetry with wrap; the blob says its size"},
			filterFlag("filter", "the unwrapping key"),
			&cli.StringFlag{Name: "in", Required: true, Usage: "the blob `FILE`"},
			&cli.StringFlag{Name: "label", Aliases: []string{"l"}, Required: true, Usage: "the new key's label"},
			&cli.StringFlag{Name: "id", Usage: "the new key's id, in hex"},
			&cli.StringFlag{Name: "key-type", Required: true, Usage: "what the blob holds: aes, generic-secret, rsa-private or ec-private"},
			&cli.StringSliceFlag{Name: "attr", Usage: "NAME=VALUE attribute of the new key (repeatable)"},
			&cli.BoolFlag{Name: "session", Usage: "make a session key instead of a token key"}),
		Action: func(c *cli.Context) error {
			p, err := hsmWrapParamsFrom(c)
			if err != nil {
				return err
			}
			f, err := parseFilterFlag("filter", c.StringSlice("filter"))
			if err != nil {
				return err
			}
			kt, ok := unwrapKeyTypes[strings.ToLower(c.String("key-type"))]
			if !ok {
				return fmt.Errorf("--key-type %q: want aes, generic-secret, rsa-private or ec-private", c.String("key-type"))
			}
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			o := hsmKeyUnwrapOptions{clusterOptions: co, hsmWrapParams: p, Unwrapping: f, In: c.String("in"),
				Class: kt.class, Type: kt.typ, Template: hsm.Template{Label: c.String("label"), Session: c.Bool("session")}}
			if id := c.String("id"); id != "" {
				if o.Template.ID, err = hex.DecodeString(strings.TrimPrefix(id, "0x")); err != nil {
					return fmt.Errorf("--id %q: want hex, e.g. 0a0b", id)
				}
			}
			if o.Template.Attrs, err = hsm.ParseAttrAssignments(c.StringSlice("attr")); err != nil {
				return fmt.Errorf("--attr: %w", err)
			}
			return runHSMKeyUnwrap(c.Context, e, o)
		},
	}
}

// runHSMKeyUnwrap imports the blob in o.In as a new key.
func runHSMKeyUnwrap(ctx context.Context, e *env, o hsmKeyUnwrapOptions) error {
	stdout, stderr := e.stdout, e.stderr
	data, err := readBounded("blob", o.In, maxPayloadFile)
	if err != nil {
		return err
	}
	blob, err := decodeBlob(o.In, data, o.Base64)
	if err != nil {
		return err
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		k, err := selectKey(ctx, s, o.Unwrapping, "--filter (the unwrapping key)")
		if err != nil {
			return inCluster(o.Dir, err)
		}
		nk, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: o.Mechanism, Params: o.Params, UnwrappingKey: k.Ref,
			Blob: blob, Class: o.Class, Type: o.Type, Template: o.Template})
		if err != nil {
			if errors.Is(err, hsm.ErrUnwrapFailed) {
				return inCluster(o.Dir, &explainedError{fmt.Sprintf("unwrap %s with %s using %s: %s", o.In, keyName(k), o.describe(), hsm.UnwrapFailedMessage), err})
			}
			return inCluster(o.Dir, explainKeyError("unwrap "+o.In+" with", k, s.User().Name, err))
		}
		warnCoverage(stderr, o.Dir, []hsm.KeyInfo{nk})
		if o.Output == outputJSON {
			return printKeys(stdout, o.Output, o.Dir, []hsm.KeyInfo{nk}, false)
		}
		_, err = fmt.Fprintf(stdout, "unwrapped %s with %s: new %s, check value %s\n", o.In, keyName(k), keyName(nk), hexOrDash(nk.KCV))
		return err
	})
}
