package cli

// `keymig hsm`: the included HSM cluster, a directory on disk modelled on
// AWS CloudHSM. The subcommands live in cmd_hsm_*.go; this file holds what
// they share: the cluster flags, opening a cluster and logging in, and
// turning HSM errors into messages that name the cluster and the key.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// defaultLockTimeout is how long a command waits for another keymig process
// that holds the cluster directory.
const defaultLockTimeout = 10 * time.Second

// hsmCommand is `keymig hsm`, the group of commands that manage the included
// HSM cluster.
func hsmCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "hsm",
		Usage: "manage the included HSM cluster (modelled on AWS CloudHSM)",
		Description: `keymig ships an HSM cluster simulation that behaves like AWS CloudHSM:
crypto officers and crypto users, keys with CloudHSM's attributes, token keys
replicated across the HSMs of a cluster under the key availability quorum,
backups and cross-region clones, and a hash-chained audit log per HSM.

A cluster is a directory (cluster.json and one file per HSM). It is a faithful
simulation, not a security boundary: key material at rest is encrypted by
keys stored beside it.

Commands that log in read the PIN (user:password) from KEYMIG_PIN, from
--pin-file FILE (readable by its owner only) or from a prompt.

Example:
  export KEYMIG_PIN=admin:secret-pass
  keymig hsm init --dir ./hsm1 --hsms 3
  KEYMIG_NEW_PASSWORD=user-pass keymig hsm user create --cluster ./hsm1 --username alice --role crypto-user
  KEYMIG_PIN=alice:user-pass keymig hsm key generate --cluster ./hsm1 --type aes-256 --label payments`,
		Subcommands: []*cli.Command{
			hsmInitCommand(e),
			hsmStatusCommand(e),
			hsmUserCommand(e),
			hsmKeyCommand(e),
			hsmAuditCommand(e),
			hsmSyncCommand(e),
			hsmBackupCommand(e),
			hsmRestoreCommand(e),
			hsmAddHSMCommand(e),
			hsmRemoveHSMCommand(e),
			hsmFaultCommand(e),
			hsmQuorumCommand(e),
			hsmCACommand(e),
			hsmMTLSCommand(e),
			hsmServeCommand(e),
			hsmClientConfigCommand(e),
		},
	}
}

// clusterOptions are the options every command on an existing cluster
// shares.
type clusterOptions struct {
	Dir         string          // the cluster directory
	PINFile     string          // --pin-file, when the PIN is not in KEYMIG_PIN
	Output      outputFormat    // text or json
	LockTimeout time.Duration   // how long to wait for another keymig process
	Creds       hsm.Credentials // the caller's credentials, for commands that log in
}

// clusterFlags are the flags of clusterOptions; login adds --pin-file.
func clusterFlags(login bool) []cli.Flag {
	fs := []cli.Flag{
		&cli.StringFlag{Name: "cluster", Aliases: []string{"c"}, Required: true, Usage: "the cluster `DIR`ectory (key commands: or a PKCS#11 token, pkcs11:token=LABEL?module-path=FILE)"},
		outputFlag(),
		&cli.DurationFlag{Name: "lock-timeout", Value: defaultLockTimeout,
			Usage: "how long to wait for another keymig process using the cluster"},
	}
	if login {
		fs = append(fs, pinFileFlag())
	}
	return fs
}

// pinFileFlag is --pin-file; a PIN is never accepted as a flag's value.
func pinFileFlag() cli.Flag {
	return &cli.StringFlag{Name: "pin-file", Usage: "read the PIN (user:password) from `FILE` (mode 0600) instead of " + envPIN}
}

// clusterOptionsFrom reads the shared flags and, if login, the caller's PIN.
func (e *env) clusterOptionsFrom(c *cli.Context, login bool) (clusterOptions, error) {
	if err := noArgs(c); err != nil {
		return clusterOptions{}, err
	}
	out, err := parseOutput(c.String("output"))
	if err != nil {
		return clusterOptions{}, err
	}
	o := clusterOptions{Dir: c.String("cluster"), Output: out, LockTimeout: c.Duration("lock-timeout")}
	if login {
		o.PINFile = c.String("pin-file")
		if o.Creds, err = loadBackendPIN(e, envPIN, o.PINFile, o.Dir, sideName(o.Dir)); err != nil {
			return clusterOptions{}, err
		}
	}
	return o, nil
}

// noArgs refuses positional arguments: urfave/cli stops reading flags at the
// first one, so a stray word would silently drop every flag after it.
func noArgs(c *cli.Context) error {
	if c.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: %s takes only flags (see --help)", c.Args().First(), c.Command.FullName())
	}
	return nil
}

// openCluster opens the cluster directory, waiting for another process that
// holds it at most o.LockTimeout. A client directory (keymig hsm
// client-config) opens the cluster through its HSM daemons.
func openCluster(ctx context.Context, o clusterOptions) (*cluster.Cluster, error) {
	if o.Dir == "" {
		return nil, errors.New("--cluster DIR is required")
	}
	if isToken(o.Dir) {
		return nil, fmt.Errorf("%s is a PKCS#11 token: this command manages the included cluster; a token takes the key commands, plan, migrate, verify and rotate", sideName(o.Dir))
	}
	timeout := o.LockTimeout
	if timeout <= 0 {
		timeout = defaultLockTimeout
	}
	members, err := clusterMembers(o.Dir)
	if err != nil {
		return nil, err
	}
	cl, err := cluster.Open(ctx, o.Dir, cluster.OpenOptions{LockTimeout: timeout, Members: members})
	if err != nil {
		return nil, inCluster(o.Dir, err)
	}
	return cl, nil
}

// withCluster opens the cluster, runs fn, then closes the cluster whatever
// fn returned; an error closing it is reported if fn had none.
func withCluster(ctx context.Context, o clusterOptions, fn func(cl *cluster.Cluster) error) (err error) {
	cl, err := openCluster(ctx, o)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := cl.Close(); cerr != nil && err == nil {
			err = inCluster(o.Dir, cerr)
		}
	}()
	return fn(cl)
}

// withSession is withCluster logged in with o.Creds, logged out at the end.
// A PKCS#11 token (a pkcs11: URI) is logged in to the same way; fn then
// gets no cluster.
func withSession(ctx context.Context, o clusterOptions, fn func(cl *cluster.Cluster, s hsm.Session) error) error {
	if isToken(o.Dir) {
		return withBackendSession(ctx, o, func(s hsm.Session) error { return fn(nil, s) })
	}
	return withCluster(ctx, o, func(cl *cluster.Cluster) error {
		s, err := cl.Login(ctx, o.Creds)
		if err != nil {
			return loginError(o.Dir, o.Creds.User, err)
		}
		defer s.Logout(context.WithoutCancel(ctx))
		return fn(cl, s)
	})
}

// loginError restates a failed login the way CloudHSM CLI users expect,
// never with the password.
func loginError(dir, user string, err error) error {
	msg := fmt.Sprintf("log in as %s: %s", user, hsmMsg(err))
	if hsm.CodeOf(err) == hsm.CodePermission {
		if strings.Contains(strings.ToLower(msg), "locked") {
			msg += fmt.Sprintf(" (as a crypto officer: `keymig hsm user change-password --username %s`)", user)
		} else {
			msg += " (check the user name and password in " + envPIN + " or --pin-file)"
		}
	}
	return inCluster(dir, &explainedError{msg, err})
}

// inCluster prefixes err with the cluster directory, unless it names it
// already.
func inCluster(dir string, err error) error {
	if err == nil || dir == "" || strings.Contains(err.Error(), dir) {
		return err
	}
	return fmt.Errorf("cluster %s: %w", dir, err)
}

// capable returns s as the optional capability T (hsm.Sharer, hsm.Users,
// ...), or an error naming the cluster and what it cannot do.
func capable[T any](dir string, s hsm.Session, doing string) (T, error) {
	c, err := hsm.As[T](s, doing)
	return c, inCluster(dir, err)
}

// keyName names a key in messages: its handle and label.
func keyName(k hsm.KeyInfo) string {
	return fmt.Sprintf("key %s (label %q)", k.Ref, k.Label)
}

// explainedError is an HSM error restated for a person: with the key's
// handle and label or the user involved, and what to do. It unwraps to the
// HSM error, so errors.Is and hsm.CodeOf still see the code.
type explainedError struct {
	msg string
	err error
}

// Error returns the restated message.
func (e *explainedError) Error() string { return e.msg }

// Unwrap returns the HSM error.
func (e *explainedError) Unwrap() error { return e.err }

// explainKeyError turns the HSM's answer to op on key k into a message that
// names the key (handle and label) and says what to do. user is the
// logged-in user. op reads before the key: "delete", "set-attribute
// decrypt=true on".
func explainKeyError(op string, k hsm.KeyInfo, user string, err error) error {
	msg := fmt.Sprintf("%s %s: %s", op, keyName(k), hsmMsg(err))
	switch hsm.CodeOf(err) {
	case hsm.CodeNotFound:
		msg += "; list the keys " + user + " can see with `keymig hsm key list`"
	case hsm.CodeQuorum:
		msg += "; bring the missing HSM back up (`keymig hsm fault --up`): the key reaches it at the next command"
	case hsm.CodePermission:
		// One action: the HSM's own message may name it already.
		if k.Owner != "" && user != "" && k.Owner != user && !strings.Contains(msg, "log in as") {
			msg += fmt.Sprintf("; log in as %s, its owner", k.Owner)
		}
	case hsm.CodeThrottled, hsm.CodeUnavailable:
		msg += "; try again, and see `keymig hsm status` for HSMs that are down"
	case hsm.CodeCapacity:
		msg += "; delete keys, or restore into a cluster with a larger --key-capacity"
	}
	return &explainedError{msg, err}
}

// hsmMsg is the message of an HSM error without its "op key:" prefix, which
// the callers restate with the key's label.
func hsmMsg(err error) string {
	var he *hsm.Error
	if errors.As(err, &he) && he.Msg != "" {
		return he.Msg
	}
	return err.Error()
}

// parseFilterFlag parses a repeatable --filter-style flag for a command that
// acts on one key; flag names the flag in errors.
func parseFilterFlag(flag string, exprs []string) (hsm.Filter, error) {
	if len(exprs) == 0 {
		return hsm.Filter{}, fmt.Errorf("--%s is required: select the key with e.g. --%s key-reference=0x... or --%s attr.label=LABEL", flag, flag, flag)
	}
	f, err := hsm.ParseFilter(exprs)
	if err != nil {
		return hsm.Filter{}, fmt.Errorf("--%s: %w", flag, err)
	}
	return f, nil
}

// selectKey lists the keys s can see and returns the one f selects; what
// names the key's role ("payload key") in errors.
func selectKey(ctx context.Context, s hsm.Session, f hsm.Filter, what string) (hsm.KeyInfo, error) {
	keys, err := s.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		return hsm.KeyInfo{}, fmt.Errorf("list keys: %w", err)
	}
	k, err := hsm.SelectOne(keys, f)
	if err != nil {
		if hsm.CodeOf(err) == hsm.CodeNotFound {
			return hsm.KeyInfo{}, fmt.Errorf("%s: %w among the keys %s can see; list them with `keymig hsm key list`", what, err, s.User().Name)
		}
		return hsm.KeyInfo{}, fmt.Errorf("%s: %w", what, err)
	}
	return k, nil
}
