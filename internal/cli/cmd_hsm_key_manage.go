package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmKeyOneOptions are the inputs of the commands that act on one key
// selected by --filter: share, unshare, set-attribute and delete.
type hsmKeyOneOptions struct {
	clusterOptions
	Filter   hsm.Filter
	Username string   // share, unshare
	Unshare  bool     // unshare rather than share
	Attr     hsm.Attr // set-attribute
	Value    bool     // set-attribute
}

// keyActionResult is what the one-key commands print as JSON.
type keyActionResult struct {
	Cluster  string      `json:"cluster"`
	Action   string      `json:"action"`
	Key      hsm.KeyInfo `json:"key"`
	Username string      `json:"username,omitempty"`
	Attr     hsm.Attr    `json:"attribute,omitempty"`
	Value    *bool       `json:"value,omitempty"`
}

// printKeyAction prints the result of a one-key command as JSON or text.
func printKeyAction(w io.Writer, o hsmKeyOneOptions, r keyActionResult, text string) error {
	if o.Output == outputJSON {
		r.Cluster = o.Dir
		r.Key = jsonKey(r.Key)
		return writeJSON(w, r)
	}
	_, err := fmt.Fprintln(w, text)
	return err
}

// keyOneOptionsFrom reads --filter, the cluster flags and the PIN.
func (e *env) keyOneOptionsFrom(c *cli.Context) (hsmKeyOneOptions, error) {
	f, err := parseFilterFlag("filter", c.StringSlice("filter"))
	if err != nil {
		return hsmKeyOneOptions{}, err
	}
	co, err := e.clusterOptionsFrom(c, true)
	if err != nil {
		return hsmKeyOneOptions{}, err
	}
	return hsmKeyOneOptions{clusterOptions: co, Filter: f}, nil
}

// hsmKeyShareCommand is `keymig hsm key share` (share) or `unshare` (!share).
func hsmKeyShareCommand(e *env, share bool) *cli.Command {
	name, usage, example := "share", "let another crypto user use a key you own", "share"
	if !share {
		name, usage, example = "unshare", "withdraw a share of a key you own", "unshare"
	}
	return &cli.Command{
		Name:  name,
		Usage: usage,
		Description: `Only the owner of a key may share or unshare it. A user a key is shared with
may use it for what its attributes allow (encrypt, decrypt, wrap, unwrap, ...),
but may not wrap, share, change or delete it. Sharing twice is not an error.

Example:
  keymig hsm key ` + example + ` --cluster ./hsm1 --filter attr.label=payments --username bob`,
		Flags: append(clusterFlags(true),
			filterFlag("filter", "the key"),
			&cli.StringFlag{Name: "username", Aliases: []string{"u"}, Required: true, Usage: "the crypto user"}),
		Action: func(c *cli.Context) error {
			o, err := e.keyOneOptionsFrom(c)
			if err != nil {
				return err
			}
			o.Username = c.String("username")
			o.Unshare = !share
			return runHSMKeyShare(c.Context, e, o)
		},
	}
}

// runHSMKeyShare shares (or unshares) the selected key with o.Username.
func runHSMKeyShare(ctx context.Context, e *env, o hsmKeyOneOptions) error {
	stdout := e.stdout
	op, fn, share := "share", hsm.Sharer.ShareKey, !o.Unshare
	if !share {
		op, fn = "unshare", hsm.Sharer.UnshareKey
	}
	if o.Username == "" {
		return fmt.Errorf("%s: --username is required", op)
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		sharer, err := capable[hsm.Sharer](o.Dir, s, "share keys")
		if err != nil {
			return err
		}
		k, err := selectKey(ctx, s, o.Filter, op)
		if err != nil {
			return inCluster(o.Dir, err)
		}
		if err := fn(sharer, ctx, k.Ref, o.Username); err != nil {
			if hsm.CodeOf(err) == hsm.CodeNotFound || hsm.CodeOf(err) == hsm.CodeInvalidInput {
				return inCluster(o.Dir, &explainedError{fmt.Sprintf("%s %s with %s: %s; see `keymig hsm user list`", op, keyName(k), o.Username, hsmMsg(err)), err})
			}
			return inCluster(o.Dir, explainKeyError(op, k, s.User().Name, err))
		}
		k2, err := s.GetKey(ctx, k.Ref)
		if err != nil {
			k2 = k
		}
		text := fmt.Sprintf("shared %s with %s", keyName(k), o.Username)
		if !share {
			text = fmt.Sprintf("unshared %s from %s", keyName(k), o.Username)
		}
		return printKeyAction(stdout, o, keyActionResult{Action: op, Key: k2, Username: o.Username}, text)
	})
}

// hsmKeySetAttributeCommand is `keymig hsm key set-attribute`.
func hsmKeySetAttributeCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "set-attribute",
		Usage: "change one boolean attribute of a key you own",
		Description: `As in CloudHSM, only the owner of a modifiable key may change it; trusted is
set by a crypto officer only; wrap-with-trusted can only be turned on and
modifiable only turned off; check-value, local, never-extractable and
always-sensitive are set by the HSM and never by hand.

Examples:
  keymig hsm key set-attribute --cluster ./hsm1 --filter attr.label=payments --name decrypt --value false
  KEYMIG_PIN=admin:secret-pass keymig hsm key set-attribute --cluster ./hsm1 --filter attr.label=kek --name trusted --value true`,
		Flags: append(clusterFlags(true),
			filterFlag("filter", "the key"),
			&cli.StringFlag{Name: "name", Aliases: []string{"n"}, Required: true, Usage: "the attribute, e.g. extractable, decrypt, trusted"},
			&cli.StringFlag{Name: "value", Required: true, Usage: "true or false"}),
		Action: func(c *cli.Context) error {
			a, err := parseSettableAttr(c.String("name"))
			if err != nil {
				return err
			}
			v, err := hsm.ParseBool(c.String("value"))
			if err != nil {
				return fmt.Errorf("--value: %w", err)
			}
			o, err := e.keyOneOptionsFrom(c)
			if err != nil {
				return err
			}
			o.Attr, o.Value = a, v
			return runHSMKeySetAttribute(c.Context, e, o)
		},
	}
}

// parseSettableAttr parses --name, refusing with CloudHSM's reason the
// attributes that are never set by hand.
func parseSettableAttr(name string) (hsm.Attr, error) {
	switch n := strings.ToLower(strings.TrimSpace(name)); n {
	case "check-value", "kcv":
		return "", errors.New("--name check-value: the check value is computed by the HSM when the key is made and is never set by hand")
	case "label", "id":
		return "", fmt.Errorf("--name %s: set-attribute changes boolean attributes; the %s is chosen when the key is made", n, n)
	}
	a, err := hsm.ParseAttr(name)
	if err != nil {
		return "", fmt.Errorf("--name: %w", err)
	}
	return a, nil
}

// runHSMKeySetAttribute sets o.Attr to o.Value on the selected key.
func runHSMKeySetAttribute(ctx context.Context, e *env, o hsmKeyOneOptions) error {
	stdout := e.stdout
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		setter, err := capable[hsm.AttributeSetter](o.Dir, s, "change key attributes")
		if err != nil {
			return err
		}
		k, err := selectKey(ctx, s, o.Filter, "set-attribute")
		if err != nil {
			return inCluster(o.Dir, err)
		}
		if err := setter.SetAttribute(ctx, k.Ref, o.Attr, o.Value); err != nil {
			return inCluster(o.Dir, setAttributeError(k, s.User(), o.Attr, o.Value, err))
		}
		k2, err := s.GetKey(ctx, k.Ref)
		if err != nil {
			k2 = k
		}
		v := o.Value
		return printKeyAction(stdout, o, keyActionResult{Action: "set-attribute", Key: k2, Attr: o.Attr, Value: &v},
			fmt.Sprintf("set %s=%t on %s", o.Attr, o.Value, keyName(k)))
	})
}

// setAttributeError explains a refused attribute change with CloudHSM's rule
// and one action: only a crypto officer sets trusted, not even the owner.
func setAttributeError(k hsm.KeyInfo, u hsm.User, a hsm.Attr, v bool, err error) error {
	op := fmt.Sprintf("set-attribute %s=%t on", a, v)
	if a == hsm.AttrTrusted && u.Role != hsm.RoleCryptoOfficer && hsm.CodeOf(err) == hsm.CodePermission {
		return &explainedError{fmt.Sprintf("%s %s: %s; log in as a crypto officer to set trusted", op, keyName(k), hsmMsg(err)), err}
	}
	return explainKeyError(op, k, u.Name, err)
}

// hsmKeyDeleteCommand is `keymig hsm key delete`.
func hsmKeyDeleteCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "delete",
		Usage: "delete a key you own from every HSM of the cluster",
		Description: `Only the owner of a destroyable key may delete it. A filter that matches
several keys deletes nothing and lists them.

Example:
  keymig hsm key delete --cluster ./hsm1 --filter key-reference=0x000000000000002a`,
		Flags: append(clusterFlags(true), filterFlag("filter", "the key")),
		Action: func(c *cli.Context) error {
			o, err := e.keyOneOptionsFrom(c)
			if err != nil {
				return err
			}
			return runHSMKeyDelete(c.Context, e, o)
		},
	}
}

// runHSMKeyDelete deletes the selected key.
func runHSMKeyDelete(ctx context.Context, e *env, o hsmKeyOneOptions) error {
	stdout := e.stdout
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		deleter, err := capable[hsm.KeyDeleter](o.Dir, s, "delete keys")
		if err != nil {
			return err
		}
		k, err := selectKey(ctx, s, o.Filter, "delete")
		if err != nil {
			return inCluster(o.Dir, err)
		}
		if err := deleter.DeleteKey(ctx, k.Ref); err != nil {
			return inCluster(o.Dir, explainKeyError("delete", k, s.User().Name, err))
		}
		return printKeyAction(stdout, o, keyActionResult{Action: "delete", Key: k}, "deleted "+keyName(k))
	})
}
