package cli

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/schollz/progressbar/v3"
	"github.com/sourcegraph/conc/pool"
	"github.com/urfave/cli/v2"
)

// generateConcurrency bounds the key generations in flight: each is a round
// trip to an HSM, so throughput comes from running several at once, but not
// so many that the HSMs answer "throttled".
const generateConcurrency = 16

// progressThreshold is the --count from which generate shows a progress bar.
const progressThreshold = 50

// keyTypes are the --type values of key generate.
var keyTypes = map[string]struct {
	typ   hsm.KeyType
	bits  int
	curve string
}{
	"aes-128":  {hsm.TypeAES, 128, ""},
	"aes-192":  {hsm.TypeAES, 192, ""},
	"aes-256":  {hsm.TypeAES, 256, ""},
	"rsa-2048": {hsm.TypeRSA, 2048, ""},
	"rsa-3072": {hsm.TypeRSA, 3072, ""},
	"rsa-4096": {hsm.TypeRSA, 4096, ""},
	"ec-p256":  {hsm.TypeEC, 256, "P-256"},
	"ec-p384":  {hsm.TypeEC, 384, "P-384"},
}

// keyTypeNames lists keyTypes in a stable order, for help and errors.
func keyTypeNames() string {
	names := make([]string, 0, len(keyTypes))
	for n := range keyTypes {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// hsmKeyGenerateOptions are the inputs of `keymig hsm key generate`.
type hsmKeyGenerateOptions struct {
	clusterOptions
	Type        string            // aes-256, rsa-2048, ec-p256, ...
	Label       string            // every key made gets this label
	ID          hsm.Bytes         // optional; with Count > 1 key i gets ID+i
	Attrs       map[hsm.Attr]bool // the secret key, or the private half
	PublicAttrs map[hsm.Attr]bool // the public half of a key pair
	Session     bool
	Count       int
}

// hsmKeyGenerateCommand is `keymig hsm key generate`.
func hsmKeyGenerateCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "generate",
		Usage: "generate AES keys or RSA/EC key pairs inside the HSM",
		Description: `generate makes keys owned by the caller, with CloudHSM's default attributes
unless --attr overrides them. For a key pair, --label, --id and --attr apply to
the private half; the public half gets the same label and id, CloudHSM's
public-key defaults, and --public-attr. Token keys are replicated to every HSM
before the command returns; --session keys live on one HSM and die with the
session (that is, when this command ends).

--count N makes N keys with the same label, several at a time; with --id the
i-th key gets id+i so that ids stay unique.

Examples:
  keymig hsm key generate --cluster ./hsm1 --type aes-256 --label payments --attr extractable=true
  keymig hsm key generate --cluster ./hsm1 --type rsa-2048 --label transport --public-attr wrap=true --attr unwrap=true
  keymig hsm key generate --cluster ./hsm1 --type aes-128 --label load --id 0100 --count 500`,
		Flags: append(clusterFlags(true),
			&cli.StringFlag{Name: "type", Aliases: []string{"t"}, Required: true, Usage: keyTypeNames()},
			&cli.StringFlag{Name: "label", Aliases: []string{"l"}, Required: true, Usage: "the key's label (not unique)"},
			&cli.StringFlag{Name: "id", Usage: "the key's id, in hex (unique per owner)"},
			&cli.StringSliceFlag{Name: "attr", Usage: "NAME=VALUE attribute of the key (the private half of a pair), e.g. extractable=false (repeatable)"},
			&cli.StringSliceFlag{Name: "public-attr", Usage: "NAME=VALUE attribute of the public half of a key pair (repeatable)"},
			&cli.BoolFlag{Name: "session", Usage: "make session keys instead of token keys"},
			&cli.IntFlag{Name: "count", Value: 1, Usage: "how many keys (or key pairs) to make"}),
		Action: func(c *cli.Context) error {
			if n := c.Int("count"); n < 1 {
				return fmt.Errorf("--count %d: want at least 1", n)
			}
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			o := hsmKeyGenerateOptions{clusterOptions: co, Type: c.String("type"), Label: c.String("label"),
				Session: c.Bool("session"), Count: c.Int("count")}
			if id := c.String("id"); id != "" {
				if o.ID, err = hex.DecodeString(strings.TrimPrefix(id, "0x")); err != nil {
					return fmt.Errorf("--id %q: want hex, e.g. 0a0b", id)
				}
			}
			if o.Attrs, err = hsm.ParseAttrAssignments(c.StringSlice("attr")); err != nil {
				return fmt.Errorf("--attr: %w", err)
			}
			if o.PublicAttrs, err = hsm.ParseAttrAssignments(c.StringSlice("public-attr")); err != nil {
				return fmt.Errorf("--public-attr: %w", err)
			}
			return runHSMKeyGenerate(c.Context, e, o)
		},
	}
}

// runHSMKeyGenerate makes o.Count keys or key pairs, bounded concurrency,
// and prints every key made, even when some failed.
func runHSMKeyGenerate(ctx context.Context, e *env, o hsmKeyGenerateOptions) error {
	stdout, stderr := e.stdout, e.stderr
	kt, ok := keyTypes[strings.ToLower(o.Type)]
	if !ok {
		return fmt.Errorf("--type %q: want one of %s", o.Type, keyTypeNames())
	}
	if o.Count == 0 {
		o.Count = 1 // the zero options make one key
	}
	if o.Count < 1 {
		return fmt.Errorf("--count %d: want at least 1", o.Count)
	}
	if kt.typ == hsm.TypeAES && len(o.PublicAttrs) > 0 {
		return errors.New("--public-attr applies to key pairs (rsa-*, ec-*), not to AES keys")
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		var (
			mu   sync.Mutex
			made []hsm.KeyInfo
		)
		var bar *progressbar.ProgressBar
		if _, tty := terminalFd(stderr); tty && o.Count >= progressThreshold {
			bar = progressbar.NewOptions(o.Count, progressbar.OptionSetWriter(stderr),
				progressbar.OptionSetDescription("generating keys"), progressbar.OptionShowCount(),
				progressbar.OptionThrottle(200*time.Millisecond), progressbar.OptionClearOnFinish())
		}
		p := pool.New().WithContext(ctx).WithCancelOnError().WithFirstError().WithMaxGoroutines(generateConcurrency)
		for i := range o.Count {
			p.Go(func(ctx context.Context) error {
				keys, err := generateOne(ctx, s, o, kt.typ, kt.bits, kt.curve, i)
				if err != nil {
					return err
				}
				mu.Lock()
				made = append(made, keys...)
				mu.Unlock()
				if bar != nil {
					bar.Add(1)
				}
				return nil
			})
		}
		err := p.Wait()
		if bar != nil {
			bar.Finish()
		}
		sort.Slice(made, func(i, j int) bool { return made[i].Ref < made[j].Ref })
		if len(made) > 0 || err == nil {
			if perr := printKeys(stdout, o.Output, o.Dir, made, false); perr != nil && err == nil {
				err = perr
			}
		}
		warnCoverage(stderr, o.Dir, made)
		if o.Session && len(made) > 0 {
			fmt.Fprintln(stderr, "note: session keys die with the session that made them: they were destroyed when this command logged out")
		}
		if err != nil {
			if o.Count > 1 {
				err = fmt.Errorf("made %d of %d: %w", countMade(made, kt.typ), o.Count, err)
			}
			return inCluster(o.Dir, err)
		}
		return nil
	})
}

// generateOne makes the i-th key (or key pair) of a generate run.
func generateOne(ctx context.Context, s hsm.Session, o hsmKeyGenerateOptions, typ hsm.KeyType, bits int, curve string, i int) ([]hsm.KeyInfo, error) {
	id := o.ID
	if len(id) > 0 && i > 0 {
		id = addToID(id, i)
	}
	what := fmt.Sprintf("generate %s key with label %q", o.Type, o.Label)
	if len(id) > 0 {
		what += " and id 0x" + hex.EncodeToString(id)
	}
	if typ == hsm.TypeAES {
		k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: typ, Bits: bits,
			Template: hsm.Template{Label: o.Label, ID: id, Session: o.Session, Attrs: o.Attrs}})
		if err != nil {
			return nil, generateError(what, err)
		}
		return []hsm.KeyInfo{k}, nil
	}
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: typ, Bits: bits, Curve: curve,
		Public:  hsm.Template{Label: o.Label, ID: id, Session: o.Session, Attrs: o.PublicAttrs},
		Private: hsm.Template{Label: o.Label, ID: id, Session: o.Session, Attrs: o.Attrs}})
	if err != nil {
		return nil, generateError(what, err)
	}
	return []hsm.KeyInfo{pub, priv}, nil
}

// generateError says what could not be generated and what to do.
func generateError(what string, err error) error {
	switch hsm.CodeOf(err) {
	case hsm.CodeExists:
		return fmt.Errorf("%s: %w; ids are unique per owner: choose another --id", what, err)
	case hsm.CodeCapacity:
		return fmt.Errorf("%s: %w; delete keys, or move to a cluster with a larger --key-capacity", what, err)
	case hsm.CodePermission:
		return fmt.Errorf("%s: %w (crypto users create keys; crypto officers manage users)", what, err)
	case hsm.CodeQuorum:
		return fmt.Errorf("%s: %w; bring the HSM back up (`keymig hsm fault --up`) and try again", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// addToID adds n to id read as a big-endian number, keeping its length (it
// grows only on overflow).
func addToID(id []byte, n int) hsm.Bytes {
	v := new(big.Int).SetBytes(id)
	v.Add(v, big.NewInt(int64(n)))
	b := v.Bytes()
	if len(b) < len(id) {
		b = append(make([]byte, len(id)-len(b)), b...)
	}
	return b
}

// countMade is how many keys or key pairs made holds.
func countMade(made []hsm.KeyInfo, typ hsm.KeyType) int {
	if typ == hsm.TypeAES {
		return len(made)
	}
	return len(made) / 2
}
