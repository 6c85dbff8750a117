// Package hsmtest is the conformance suite of the hsm contract: every
// backend (a single node, a cluster, later remote and PKCS#11 backends) runs
// Run against itself, so that they all behave the way AWS CloudHSM does —
// the same permission matrix, attribute rules, FIPS policy, mechanisms,
// unwrap-failure uniformity, masked objects, lockout and session keys.
//
// The suite generates few RSA keys (one RSA-2048 pair per test that needs
// one) so that it stays fast under -race.
package hsmtest

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
)

// Harness tells Run how to make the backend under test.
type Harness struct {
	// New returns a fresh, empty backend with one crypto officer, whose
	// credentials it returns. Cleanup is registered with t.Cleanup.
	New func(t *testing.T) (b hsm.Backend, officer hsm.Credentials)
	// NewClone, if set, returns a fresh, empty backend of the same lineage
	// as b (sharing its masking key), with one crypto officer; the masked
	// object tests then move keys across. Optional.
	NewClone func(t *testing.T, b hsm.Backend) (clone hsm.Backend, officer hsm.Credentials)
	// Capacity is the token-key capacity of the backends New makes, if it
	// is small enough to fill in a test (a few hundred at most) and large
	// enough for the concurrency test (about 200 keys); 0 skips the
	// capacity test.
	Capacity int
	// FIPS says the backends New makes run in FIPS mode; the FIPS tests
	// are skipped otherwise.
	FIPS bool
}

// Run runs the conformance suite against the backends h makes.
func Run(t *testing.T, h Harness) {
	if h.New == nil {
		t.Fatal("hsmtest: Harness.New is nil")
	}
	t.Run("Login", func(t *testing.T) { testLogin(t, h) })
	t.Run("Users", func(t *testing.T) { testUsers(t, h) })
	t.Run("UserNameCase", func(t *testing.T) { testUserNameCase(t, h) })
	t.Run("Defaults", func(t *testing.T) { testDefaults(t, h) })
	t.Run("PermissionMatrix", func(t *testing.T) { testPermissionMatrix(t, h) })
	t.Run("WrapRules", func(t *testing.T) { testWrapRules(t, h) })
	t.Run("AttributeRules", func(t *testing.T) { testAttributeRules(t, h) })
	t.Run("FIPS", func(t *testing.T) { testFIPS(t, h) })
	t.Run("SymmetricMechanisms", func(t *testing.T) { testSymmetricMechanisms(t, h) })
	t.Run("RSAMechanisms", func(t *testing.T) { testRSAMechanisms(t, h) })
	t.Run("PublicKeys", func(t *testing.T) { testPublicKeys(t, h) })
	t.Run("PublicKeysForAll", func(t *testing.T) { testPublicKeysForAll(t, h) })
	t.Run("ExtractableFixed", func(t *testing.T) { testExtractableFixed(t, h) })
	t.Run("UnwrapFailures", func(t *testing.T) { testUnwrapFailures(t, h) })
	t.Run("Masked", func(t *testing.T) { testMasked(t, h) })
	t.Run("SessionKeys", func(t *testing.T) { testSessionKeys(t, h) })
	t.Run("IDUniqueness", func(t *testing.T) { testIDUniqueness(t, h) })
	t.Run("Capacity", func(t *testing.T) { testCapacity(t, h) })
	t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, h) })
}

// fixture is a backend with a crypto officer and four crypto users: alice
// owns keys, bob is who she shares with, carol is another user, dave is a
// share target.
type fixture struct {
	t                       *testing.T
	b                       hsm.Backend
	officer                 hsm.Credentials
	co                      hsm.FullSession
	alice, bob, carol, dave hsm.FullSession
	alicePW, bobPW, carolPW string
}

const userPassword = "correct-horse"

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newFixture(t *testing.T, h Harness) *fixture {
	t.Helper()
	b, officer := h.New(t)
	f := &fixture{t: t, b: b, officer: officer, alicePW: userPassword, bobPW: userPassword, carolPW: userPassword}
	f.co = f.login(officer)
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		if err := f.co.CreateUser(ctxT(t), u, hsm.RoleCryptoUser, userPassword); err != nil {
			t.Fatalf("create user %s: %v", u, err)
		}
	}
	f.alice = f.login(hsm.Credentials{User: "alice", Password: userPassword})
	f.bob = f.login(hsm.Credentials{User: "bob", Password: userPassword})
	f.carol = f.login(hsm.Credentials{User: "carol", Password: userPassword})
	f.dave = f.login(hsm.Credentials{User: "dave", Password: userPassword})
	return f
}

func (f *fixture) login(c hsm.Credentials) hsm.FullSession {
	f.t.Helper()
	s, err := f.b.Login(ctxT(f.t), c)
	if err != nil {
		f.t.Fatalf("login %s: %v", c.User, err)
	}
	f.t.Cleanup(func() { s.Logout(context.Background()) })
	return full(f.t, s)
}

// full is s with every optional capability. The suite tests CloudHSM's
// behaviour, users, shares and masked objects included; a backend with
// only the core (a PKCS#11 token) is skipped, not failed.
func full(t *testing.T, s hsm.Session) hsm.FullSession {
	t.Helper()
	fs, ok := s.(hsm.FullSession)
	if !ok {
		t.Skipf("%s has only some of the optional capabilities (%+v); this suite tests a CloudHSM-like backend", hsm.BackendName(s), hsm.CapabilitiesOf(s))
	}
	return fs
}

// aes makes a token AES-256 key owned by s with the given attribute overrides.
func aesKey(t *testing.T, s hsm.FullSession, label string, attrs map[hsm.Attr]bool) hsm.KeyInfo {
	t.Helper()
	k, err := s.GenerateKey(ctxT(t), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: label, Attrs: attrs}})
	if err != nil {
		t.Fatalf("generate aes key %q: %v", label, err)
	}
	return k
}

func rsaPair(t *testing.T, s hsm.FullSession, label string, pubAttrs, privAttrs map[hsm.Attr]bool) (pub, priv hsm.KeyInfo) {
	t.Helper()
	pub, priv, err := s.GenerateKeyPair(ctxT(t), hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048,
		Public: hsm.Template{Label: label, Attrs: pubAttrs}, Private: hsm.Template{Label: label, Attrs: privAttrs}})
	if err != nil {
		t.Fatalf("generate rsa-2048 pair %q: %v", label, err)
	}
	return pub, priv
}

// wantCode fails unless err has code c ("" means no error); it returns err.
func wantCode(t *testing.T, what string, err error, c hsm.Code) error {
	t.Helper()
	if c == "" {
		if err != nil {
			t.Fatalf("%s: unexpected error: %v", what, err)
		}
		return nil
	}
	if err == nil {
		t.Fatalf("%s: succeeded, want a %s error", what, c)
	}
	if got := hsm.CodeOf(err); got != c {
		t.Fatalf("%s: error %q has code %q, want %q", what, err, got, c)
	}
	if msg := err.Error(); msg == "" || strings.ToLower(msg[:1]) != msg[:1] && !strings.HasPrefix(msg, "Key ") {
		t.Errorf("%s: message %q should start lower-case", what, msg)
	}
	return err
}

// sameKey fails if a key's info changed.
func sameKey(t *testing.T, what string, s hsm.FullSession, before hsm.KeyInfo) {
	t.Helper()
	after, err := s.GetKey(ctxT(t), before.Ref)
	if err != nil {
		t.Fatalf("%s: key %s is gone: %v", what, before.Ref, err)
	}
	if d := before.Attrs.Diff(after.Attrs); len(d) > 0 || after.Label != before.Label || after.Owner != before.Owner ||
		strings.Join(after.SharedWith, ",") != strings.Join(before.SharedWith, ",") || !bytes.Equal(after.KCV, before.KCV) {
		t.Fatalf("%s: key %s changed: before %+v after %+v", what, before.Ref, before, after)
	}
}

func mentions(t *testing.T, what string, err error, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("%s: error %q does not mention %q", what, err, p)
		}
	}
}
