package cli

// What the commands that work on two clusters share (plan, migrate,
// verify, synckey): their flags, opening both clusters and logging in to
// each, and listing each inventory once.

import (
	"context"
	"errors"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/urfave/cli/v2"
)

// pairOptions name two clusters and where their PINs come from.
type pairOptions struct {
	SourceDir, TargetDir         string
	SourcePINFile, TargetPINFile string
	LockTimeout                  time.Duration
}

// pairFlags are the flags of pairOptions; required says whether --source
// and --target must be given (migrate and verify take them from the plan).
func pairFlags(required bool) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "source", Required: required, Usage: "the source cluster `DIR`ectory, or a PKCS#11 token (pkcs11:token=LABEL?module-path=FILE)"},
		&cli.StringFlag{Name: "target", Required: required, Usage: "the target cluster `DIR`ectory, or a PKCS#11 token (pkcs11:token=LABEL?module-path=FILE)"},
		&cli.StringFlag{Name: "source-pin-file", Usage: "read the source PIN from `FILE` (mode 0600) instead of " + envSourcePIN},
		&cli.StringFlag{Name: "target-pin-file", Usage: "read the target PIN from `FILE` (mode 0600) instead of " + envTargetPIN},
		&cli.DurationFlag{Name: "lock-timeout", Value: defaultLockTimeout, Usage: "how long to wait for another keymig process using a cluster"},
	}
}

func pairOptionsFrom(c *cli.Context) pairOptions {
	return pairOptions{
		SourceDir: c.String("source"), TargetDir: c.String("target"),
		SourcePINFile: c.String("source-pin-file"), TargetPINFile: c.String("target-pin-file"),
		LockTimeout: c.Duration("lock-timeout"),
	}
}

// side is one logged-in cluster or token.
type side struct {
	dir     string
	backend backend
	session hsm.Session
	creds   hsm.Credentials // for more sessions (a rotation's lanes)
}

// moreSessions logs in n more times, for work that spreads over the HSMs
// of the cluster (each session's objects live on one HSM).
func (s side) moreSessions(ctx context.Context, n int) ([]hsm.Session, error) {
	return loginSessions(ctx, s.backend, s.dir, s.creds, n)
}

// loginSessions logs in to cl n times; on a failure it logs out of those
// it made and names the cluster directory dir.
func loginSessions(ctx context.Context, cl hsm.Backend, dir string, creds hsm.Credentials, n int) ([]hsm.Session, error) {
	var out []hsm.Session
	for range n {
		sess, err := cl.Login(ctx, creds)
		if err != nil {
			logoutAll(ctx, out)
			if isToken(dir) {
				return nil, err // the token's error names it and says what to do
			}
			return nil, loginError(dir, creds.User, err)
		}
		out = append(out, sess)
	}
	return out, nil
}

// logoutAll ends every session of ss.
func logoutAll(ctx context.Context, ss []hsm.Session) {
	for _, s := range ss {
		s.Logout(context.WithoutCancel(ctx))
	}
}

// pair is both clusters, open and logged in.
type pair struct {
	src, dst side
}

// openPair opens both clusters and logs in to each with its own PIN. The
// PINs are read before anything is opened, so a missing one fails fast.
func openPair(ctx context.Context, e *env, o pairOptions) (_ *pair, err error) {
	if o.SourceDir == "" || o.TargetDir == "" {
		return nil, errors.New("both --source DIR and --target DIR are needed")
	}
	srcCreds, err := loadBackendPIN(e, envSourcePIN, o.SourcePINFile, o.SourceDir, "the source "+sideName(o.SourceDir))
	if err != nil {
		return nil, err
	}
	dstCreds, err := loadBackendPIN(e, envTargetPIN, o.TargetPINFile, o.TargetDir, "the target "+sideName(o.TargetDir))
	if err != nil {
		return nil, err
	}
	return openPairWith(ctx, o, srcCreds, dstCreds)
}

// openPairWith opens both clusters and logs in with credentials already
// read, so that a scheduled sync asks for its PINs once.
func openPairWith(ctx context.Context, o pairOptions, srcCreds, dstCreds hsm.Credentials) (_ *pair, err error) {
	p := &pair{}
	defer func() {
		if err != nil {
			p.close(ctx)
		}
	}()
	for _, s := range []struct {
		sd    *side
		dir   string
		creds hsm.Credentials
	}{{&p.src, o.SourceDir, srcCreds}, {&p.dst, o.TargetDir, dstCreds}} {
		b, err := openBackend(ctx, s.dir, o.LockTimeout)
		if err != nil {
			return nil, err
		}
		s.sd.dir, s.sd.backend, s.sd.creds = s.dir, b, s.creds
		sess, err := loginBackend(ctx, b, s.creds)
		if err != nil {
			return nil, err
		}
		s.sd.session = sess
	}
	return p, nil
}

// close logs out of and closes both clusters.
func (p *pair) close(ctx context.Context) {
	for _, s := range []*side{&p.src, &p.dst} {
		if s.session != nil {
			s.session.Logout(context.WithoutCancel(ctx))
		}
		if s.backend != nil {
			s.backend.Close()
		}
	}
}

// inventory lists one side once: cluster facts, the user, user names and
// every key the user can see.
func (s side) inventory(ctx context.Context) (hsm.Inventory, error) {
	return hsm.TakeInventory(ctx, s.session, s.dir)
}

// measureRTT times a few cheap reads to estimate one round trip.
func (s side) measureRTT(ctx context.Context, keys []hsm.KeyInfo) time.Duration {
	const n = 5
	if len(keys) == 0 {
		return 0
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		if _, err := s.session.GetKey(ctx, keys[i%len(keys)].Ref); err != nil {
			return 0
		}
	}
	return time.Since(start) / n
}
