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

// hsmUserOptions are the inputs of the `keymig hsm user` commands.
type hsmUserOptions struct {
	clusterOptions
	Username    string
	Role        hsm.Role
	NewPassword string // create and change-password; never printed
}

// hsmUserCommand is `keymig hsm user`, the group of user management commands.
func hsmUserCommand(e *env) *cli.Command {
	usernameFlag := func(required bool, usage string) cli.Flag {
		return &cli.StringFlag{Name: "username", Aliases: []string{"u"}, Required: required, Usage: usage}
	}
	return &cli.Command{
		Name:  "user",
		Usage: "create, list, delete users and change passwords",
		Description: `Users are crypto officers (manage users, set trusted on keys) and crypto
users (create and use keys), as in CloudHSM. The caller logs in with
KEYMIG_PIN (user:password), --pin-file or a prompt; new passwords come from
KEYMIG_NEW_PASSWORD or a prompt, never from a flag.`,
		Subcommands: []*cli.Command{
			hsmUserRegisterQuorumCommand(e),
			{
				Name:  "create",
				Usage: "create a user on every HSM of the cluster (crypto officers only)",
				Description: `Example:
  KEYMIG_PIN=admin:secret-pass KEYMIG_NEW_PASSWORD=alice-pass \
    keymig hsm user create --cluster ./hsm1 --username alice --role crypto-user`,
				Flags: append(clusterFlags(true),
					usernameFlag(true, "the new user's name"),
					&cli.StringFlag{Name: "role", Required: true, Usage: "crypto-user or crypto-officer"}),
				Action: func(c *cli.Context) error {
					o, err := e.userOptionsFrom(c)
					if err != nil {
						return err
					}
					if o.Role, err = hsm.ParseRole(c.String("role")); err != nil {
						return fmt.Errorf("--role: %w", err)
					}
					if o.NewPassword, err = loadNewPassword(e, "user "+o.Username); err != nil {
						return err
					}
					return runHSMUserCreate(c.Context, e, o)
				},
			},
			{
				Name:  "list",
				Usage: "list the users, their roles, lock state and HSM coverage (no login needed)",
				Description: `As in CloudHSM, listing users needs no login: no PIN is read. User names
are not case-sensitive and are shown in lower case.

Example:
  keymig hsm user list --cluster ./hsm1 --output json`,
				Flags: clusterFlags(false),
				Action: func(c *cli.Context) error {
					co, err := e.clusterOptionsFrom(c, false)
					if err != nil {
						return err
					}
					return runHSMUserList(c.Context, e, hsmUserOptions{clusterOptions: co})
				},
			},
			{
				Name:  "delete",
				Usage: "delete a user who owns no keys (crypto officers only)",
				Description: `Example:
  keymig hsm user delete --cluster ./hsm1 --username alice`,
				Flags: append(clusterFlags(true), usernameFlag(true, "the user to delete")),
				Action: func(c *cli.Context) error {
					o, err := e.userOptionsFrom(c)
					if err != nil {
						return err
					}
					return runHSMUserDelete(c.Context, e, o)
				},
			},
			{
				Name:  "change-password",
				Usage: "set a user's password (and unlock it); without --username, the caller's own",
				Description: `A crypto officer may change any user's password, which also unlocks a user
locked after too many failed logins; every user may change its own.

Example:
  KEYMIG_PIN=alice:old-pass KEYMIG_NEW_PASSWORD=new-pass keymig hsm user change-password --cluster ./hsm1`,
				Flags: append(clusterFlags(true), usernameFlag(false, "the user whose password changes; default: the caller")),
				Action: func(c *cli.Context) error {
					o, err := e.userOptionsFrom(c)
					if err != nil {
						return err
					}
					if o.Username == "" {
						o.Username = o.Creds.User
					}
					if o.NewPassword, err = loadNewPassword(e, "user "+o.Username); err != nil {
						return err
					}
					return runHSMUserChangePassword(c.Context, e, o)
				},
			},
		},
	}
}

// userOptionsFrom reads --username, the cluster flags and the PIN.
func (e *env) userOptionsFrom(c *cli.Context) (hsmUserOptions, error) {
	co, err := e.clusterOptionsFrom(c, true)
	if err != nil {
		return hsmUserOptions{}, err
	}
	return hsmUserOptions{clusterOptions: co, Username: c.String("username")}, nil
}

// userResult is what the user commands print as JSON.
type userResult struct {
	Cluster  string `json:"cluster"`
	Action   string `json:"action"`
	Username string `json:"username"`
	Role     string `json:"role,omitempty"`
}

// printUserResult prints the result of a user command as JSON or text.
func printUserResult(o hsmUserOptions, stdout io.Writer, action, text string) error {
	if o.Output == outputJSON {
		return writeJSON(stdout, userResult{Cluster: o.Dir, Action: action, Username: o.Username, Role: string(o.Role)})
	}
	_, err := fmt.Fprintln(stdout, text)
	return err
}

// userError restates an HSM error about user management; caller is the
// logged-in user.
func userError(o hsmUserOptions, op string, caller hsm.User, err error) error {
	msg := fmt.Sprintf("%s user %s: %s", op, o.Username, hsmMsg(err))
	switch hsm.CodeOf(err) {
	case hsm.CodePermission:
		if caller.Role != hsm.RoleCryptoOfficer && !strings.Contains(msg, "crypto officer") {
			msg += " (only a crypto officer may create, delete or change other users)"
		}
	case hsm.CodeExists:
		msg += "; pick another name, or change its password with `keymig hsm user change-password`"
	case hsm.CodeNotFound:
		msg += "; see `keymig hsm user list`"
	}
	return inCluster(o.Dir, &explainedError{msg, err})
}

// runHSMUserCreate creates o.Username with o.Role and o.NewPassword.
func runHSMUserCreate(ctx context.Context, e *env, o hsmUserOptions) error {
	stdout := e.stdout
	if o.Username == "" || o.Role == "" || o.NewPassword == "" {
		return errors.New("user create needs --username, --role and a new password")
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		users, err := capable[hsm.Users](o.Dir, s, "manage users")
		if err != nil {
			return err
		}
		if err := users.CreateUser(ctx, o.Username, o.Role, o.NewPassword); err != nil {
			return userError(o, "create", s.User(), err)
		}
		return printUserResult(o, stdout, "created", fmt.Sprintf("created %s %s", o.Role, o.Username))
	})
}

// runHSMUserDelete deletes o.Username.
func runHSMUserDelete(ctx context.Context, e *env, o hsmUserOptions) error {
	stdout := e.stdout
	if o.Username == "" {
		return errors.New("--username is required")
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		if strings.EqualFold(o.Username, s.User().Name) {
			return inCluster(o.Dir, fmt.Errorf("delete user %s: a user cannot delete itself; log in as another crypto officer", o.Username))
		}
		users, err := capable[hsm.Users](o.Dir, s, "manage users")
		if err != nil {
			return err
		}
		if err := users.DeleteUser(ctx, o.Username); err != nil {
			return userError(o, "delete", s.User(), err)
		}
		return printUserResult(o, stdout, "deleted", "deleted user "+o.Username)
	})
}

// runHSMUserChangePassword sets o.Username's password to o.NewPassword.
func runHSMUserChangePassword(ctx context.Context, e *env, o hsmUserOptions) error {
	stdout := e.stdout
	if o.Username == "" || o.NewPassword == "" {
		return errors.New("change-password needs a user and a new password")
	}
	return withSession(ctx, o.clusterOptions, func(_ *cluster.Cluster, s hsm.Session) error {
		users, err := capable[hsm.Users](o.Dir, s, "manage users")
		if err != nil {
			return err
		}
		if err := users.ChangePassword(ctx, o.Username, o.NewPassword); err != nil {
			return userError(o, "change the password of", s.User(), err)
		}
		return printUserResult(o, stdout, "password-changed", "changed the password of "+o.Username)
	})
}

// runHSMUserList prints every user; it needs no login.
func runHSMUserList(ctx context.Context, e *env, o hsmUserOptions) error {
	stdout := e.stdout
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		users, err := cl.Users(ctx)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("list users: %w", err))
		}
		if o.Output == outputJSON {
			for i := range users {
				users[i].Coverage.HSMs = nonNil(users[i].Coverage.HSMs)
			}
			return writeJSON(stdout, struct {
				Cluster string     `json:"cluster"`
				Users   []hsm.User `json:"users"`
			}{o.Dir, nonNil(users)})
		}
		t := newTable(stdout, "USERNAME", "ROLE", "LOCKED", "COVERAGE")
		for _, u := range users {
			t.row(u.Name, string(u.Role), fmt.Sprint(u.Locked), u.Coverage.String())
		}
		return t.flush()
	})
}
