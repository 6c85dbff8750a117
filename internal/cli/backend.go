package cli

// Backends: what a cluster argument (--cluster, --source, --target) opens.
// A directory is the included cluster; a pkcs11: URI is a PKCS#11 token
// (hsm/pkcs11). Commands that work on any backend open it here and log in
// through hsm.Backend; the commands that manage the included cluster
// itself (init, users, backups, quorum) keep using openCluster.

import (
	"context"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/pkcs11"
)

// backend is an opened cluster or token: log in to it, close it, and name
// it in messages.
type backend interface {
	hsm.Backend
	// Name is how messages name it: the cluster directory or the token's URI.
	Name() string
}

// clusterBackend is the included cluster as a backend.
type clusterBackend struct {
	*cluster.Cluster
	dir string
}

// Name is the cluster directory.
func (c clusterBackend) Name() string { return c.dir }

// tokenBackend is a PKCS#11 token as a backend.
type tokenBackend struct {
	*pkcs11.Token
	uri string
}

// Name is the token's URI as given (it never holds a PIN: ParseURI refuses one).
func (t tokenBackend) Name() string { return t.uri }

// isToken reports whether a cluster argument names a PKCS#11 token.
func isToken(name string) bool { return pkcs11.IsURI(name) }

// openBackend opens what name names: a pkcs11: URI or a cluster directory
// (waiting at most lockTimeout for another keymig process that holds it).
func openBackend(ctx context.Context, name string, lockTimeout time.Duration) (backend, error) {
	if !isToken(name) {
		cl, err := openCluster(ctx, clusterOptions{Dir: name, LockTimeout: lockTimeout})
		if err != nil {
			return nil, err
		}
		return clusterBackend{cl, name}, nil
	}
	u, err := pkcs11.ParseURI(name)
	if err != nil {
		return nil, err
	}
	t, err := pkcs11.Open(ctx, u, pkcs11.Options{})
	if err != nil {
		return nil, err
	}
	return tokenBackend{t, name}, nil
}

// loginBackend logs in to b, restating a failure with what to do.
func loginBackend(ctx context.Context, b backend, creds hsm.Credentials) (hsm.Session, error) {
	s, err := b.Login(ctx, creds)
	if err == nil {
		return s, nil
	}
	if _, ok := b.(tokenBackend); ok {
		return nil, err // the token's error names it and says what to do
	}
	return nil, loginError(b.Name(), creds.User, err)
}

// loadBackendPIN reads the PIN for the backend name names: user:password
// for a cluster, and for a token the token's PIN exactly as written (it
// goes to C_Login as is: a bare PIN for SoftHSM, user:password for
// CloudHSM's library).
func loadBackendPIN(e *env, envName, pinFile, name, what string) (hsm.Credentials, error) {
	if !isToken(name) {
		return loadPIN(e, envName, pinFile, what)
	}
	if _, err := pkcs11.ParseURI(name); err != nil {
		return hsm.Credentials{}, err // refuse a PIN in the URI before asking for one
	}
	pin, err := loadSecret(e, envName, pinFile, what, "the token's PIN")
	if err != nil {
		return hsm.Credentials{}, err
	}
	return hsm.Credentials{Password: pin}, nil
}

// withBackendSession opens name, logs in, runs fn, logs out and closes.
func withBackendSession(ctx context.Context, o clusterOptions, fn func(s hsm.Session) error) (err error) {
	b, err := openBackend(ctx, o.Dir, o.LockTimeout)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := b.Close(); cerr != nil && err == nil {
			err = inCluster(o.Dir, cerr)
		}
	}()
	s, err := loginBackend(ctx, b, o.Creds)
	if err != nil {
		return err
	}
	defer s.Logout(context.WithoutCancel(ctx))
	return fn(s)
}

// sideName names a cluster argument in prompts and errors: "cluster DIR"
// or "PKCS#11 token LABEL".
func sideName(name string) string {
	if !isToken(name) {
		return "cluster " + name
	}
	if u, err := pkcs11.ParseURI(name); err == nil {
		return "PKCS#11 token " + u.Name()
	}
	return strings.TrimSpace(name)
}
