package cli

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmKeyCommand is `keymig hsm key`, the group of key commands.
func hsmKeyCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "key",
		Usage: "generate, list, share, change, delete, import, export, wrap and unwrap keys",
		Description: `Keys follow CloudHSM: a 64-bit key reference (the same on every HSM of the
cluster and of its clones), a label (not unique), an id, a class, a type and
CloudHSM's attributes. Commands that act on one key select it with --filter,
as CloudHSM CLI does: key-reference=0x..., attr.label=..., attr.id=HEX,
attr.class=secret-key|private-key|public-key, attr.key-type=aes|rsa|ec, or
attr.NAME=true|false; several --filter flags are ANDed.`,
		Subcommands: []*cli.Command{
			hsmKeyGenerateCommand(e),
			hsmKeyListCommand(e),
			hsmKeyShareCommand(e, true),
			hsmKeyShareCommand(e, false),
			hsmKeySetAttributeCommand(e),
			hsmKeyDeleteCommand(e),
			hsmKeyExportPublicCommand(e),
			hsmKeyImportPublicCommand(e),
			hsmKeyWrapCommand(e),
			hsmKeyUnwrapCommand(e),
		},
	}
}

// filterFlag is a repeatable --filter-style flag.
func filterFlag(name, usage string) cli.Flag {
	return &cli.StringSliceFlag{Name: name, Usage: usage + " (repeatable, ANDed): key-reference=0x..., attr.label=L, attr.id=HEX, attr.class=C, attr.NAME=true|false"}
}

// hsmKeyListOptions are the inputs of `keymig hsm key list`.
type hsmKeyListOptions struct {
	clusterOptions
	Filter  hsm.Filter
	Verbose bool
}

// hsmKeyListCommand is `keymig hsm key list`.
func hsmKeyListCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list the keys the caller can see",
		Description: `A crypto user sees the keys it owns and those shared with it; a crypto
officer sees every key. --verbose shows every attribute, the check value
(KCV) as hex, the owner, the users the key is shared with and its coverage:
"full" when every HSM holds an identical copy, otherwise the HSMs that lack
it and the attributes that differ between HSMs (run ` + "`keymig hsm sync`" + `).

Examples:
  keymig hsm key list --cluster ./hsm1
  keymig hsm key list --cluster ./hsm1 --filter attr.label=payments --verbose
  keymig hsm key list --cluster ./hsm1 --filter attr.class=secret-key --filter attr.extractable=true --output json`,
		Flags: append(clusterFlags(true),
			filterFlag("filter", "list only the keys that match"),
			&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "show every attribute, check value, owner, shares and coverage"}),
		Action: func(c *cli.Context) error {
			co, err := e.clusterOptionsFrom(c, true)
			if err != nil {
				return err
			}
			f, err := hsm.ParseFilter(c.StringSlice("filter"))
			if err != nil {
				return fmt.Errorf("--filter: %w", err)
			}
			return runHSMKeyList(c.Context, e, hsmKeyListOptions{clusterOptions: co, Filter: f, Verbose: c.Bool("verbose")})
		},
	}
}

// keyListResult is what key list prints as JSON.
type keyListResult struct {
	Cluster string        `json:"cluster"`
	Keys    []hsm.KeyInfo `json:"keys"`
}

// runHSMKeyList prints the keys o.Filter matches.
func runHSMKeyList(ctx context.Context, e *env, o hsmKeyListOptions) error {
	stdout := e.stdout
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		keys, err := s.ListKeys(ctx, o.Filter)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("list keys: %w", err))
		}
		return printKeys(stdout, o.Output, o.Dir, keys, o.Verbose)
	})
}

// printKeys prints keys as JSON, a table, or (verbose) one block per key.
func printKeys(w io.Writer, out outputFormat, dir string, keys []hsm.KeyInfo, verbose bool) error {
	if out == outputJSON {
		for i := range keys {
			keys[i] = jsonKey(keys[i])
		}
		return writeJSON(w, keyListResult{Cluster: dir, Keys: nonNil(keys)})
	}
	if !verbose {
		t := newTable(w, "KEY-REFERENCE", "LABEL", "ID", "CLASS", "TYPE", "SIZE", "CHECK-VALUE", "OWNER", "COVERAGE")
		for _, k := range keys {
			t.row(k.Ref.String(), k.Label, k.ID.String(), string(k.Class), keyTypeName(k), fmt.Sprint(k.Bits),
				hexOrDash(k.KCV), k.Owner, k.Coverage.String())
		}
		return t.flush()
	}
	for i, k := range keys {
		if i > 0 {
			fmt.Fprintln(w)
		}
		if err := printKeyVerbose(w, k); err != nil {
			return err
		}
	}
	if len(keys) == 0 {
		fmt.Fprintln(w, "no keys")
	}
	return nil
}

// printKeyVerbose prints every field and attribute of k, one per line.
func printKeyVerbose(w io.Writer, k hsm.KeyInfo) error {
	t := newTable(w)
	t.row("key-reference:", k.Ref.String())
	t.row("  label:", k.Label)
	t.row("  id:", hexOrDash(k.ID))
	t.row("  class:", string(k.Class))
	t.row("  key-type:", keyTypeName(k))
	t.row("  size-bits:", fmt.Sprint(k.Bits))
	t.row("  check-value:", hexOrDash(k.KCV))
	t.row("  owner:", k.Owner)
	t.row("  shared-users:", joinOrDash(k.SharedWith))
	t.row("  coverage:", coverageText(k.Coverage))
	for _, a := range hsm.AllAttrs {
		v, _ := k.Attrs.Get(a)
		t.row("  "+string(a)+":", fmt.Sprint(v))
	}
	return t.flush()
}

// coverageText is "full" or what is missing or inconsistent, followed by the
// HSMs that hold the key.
func coverageText(c hsm.Coverage) string {
	return fmt.Sprintf("%s (on %s)", c.String(), joinOrDash(c.HSMs))
}

// hexOrDash shows bytes as 0x-prefixed hex, the way CloudHSM CLI shows ids
// and check values.
func hexOrDash(b hsm.Bytes) string {
	if len(b) == 0 {
		return "-"
	}
	return "0x" + b.String()
}

// keyTypeName is the key type, with the curve for EC keys.
func keyTypeName(k hsm.KeyInfo) string {
	if k.Curve != "" {
		return string(k.Type) + "/" + strings.ToLower(k.Curve)
	}
	return string(k.Type)
}

// jsonKey makes k's lists non-nil so JSON shows [] rather than null.
func jsonKey(k hsm.KeyInfo) hsm.KeyInfo {
	k.SharedWith = nonNil(k.SharedWith)
	k.Coverage.HSMs = nonNil(k.Coverage.HSMs)
	if k.ID == nil {
		k.ID = hsm.Bytes{}
	}
	return k
}

// warnCoverage tells on stderr about new keys that are not yet on every HSM.
func warnCoverage(w io.Writer, dir string, keys []hsm.KeyInfo) {
	for _, k := range keys {
		if !k.Coverage.Full() && k.Attrs.Token {
			fmt.Fprintf(w, "warning: %s is on %d HSMs only (%s); it reaches the others when they are back, at the next command on cluster %s\n",
				keyName(k), k.Coverage.Count(), k.Coverage, dir)
		}
	}
}
