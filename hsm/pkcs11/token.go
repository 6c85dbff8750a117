package pkcs11

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/miekg/pkcs11"
)

// DefaultSessions is the size of a token's session pool when Options
// leave it unset: enough for the wraps and unwraps of a migration to
// overlap, few enough for tokens that allow only a handful of sessions.
const DefaultSessions = 8

// Options tune how a token is used.
type Options struct {
	// Sessions bounds the PKCS#11 sessions open on the token at once, and
	// so the calls in flight; 0 means DefaultSessions.
	Sessions int
	// api, if set, replaces the module (unit tests).
	api api
}

// Token is one PKCS#11 token, opened through its module: an hsm.Backend.
// Login logs in once (C_Login, CKU_USER) and returns sessions that share
// the token's session pool and key cache.
type Token struct {
	uri  URI
	name string // for messages: the token label
	mod  *module
	slot uint
	info pkcs11.TokenInfo
	size int // pool size

	mu       sync.Mutex
	loggedIn int      // hsm sessions logged in
	pinSum   [32]byte // SHA-256 of salt ‖ PIN, to check the PIN of a second Login without a second C_Login
	salt     [16]byte
	pool     chan pkcs11.SessionHandle
	open     int // pool sessions open
	first    pkcs11.SessionHandle
	closed   bool

	cache *keyCache
	mechs *mechanisms

	kekMu sync.Mutex
	kek   pkcs11.ObjectHandle // session KEK for check values by round trip; 0 until made
}

// roundTripKEK returns the token's session KEK for check values by round
// trip, making it on first use in session sh.
func (t *Token) roundTripKEK(sh pkcs11.SessionHandle) (pkcs11.ObjectHandle, error) {
	t.kekMu.Lock()
	defer t.kekMu.Unlock()
	if t.kek != 0 {
		return t.kek, nil
	}
	h, err := t.mod.api.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keymig-transport-kcv"),
	})
	if err != nil {
		return 0, err
	}
	t.kek = h
	return h, nil
}

// Open loads the module u names (once per process), finds the token and
// returns it, not yet logged in.
func Open(ctx context.Context, u URI, o Options) (*Token, error) {
	t := &Token{uri: u, name: u.Name(), size: o.Sessions}
	if t.size <= 0 {
		t.size = DefaultSessions
	}
	if o.api != nil {
		t.mod = &module{path: u.ModulePath, api: o.api, refs: 1}
	} else {
		m, err := loadModule(u.ModulePath)
		if err != nil {
			return nil, err
		}
		t.mod = m
	}
	if err := t.findSlot(); err != nil {
		t.mod.release()
		return nil, err
	}
	t.pool = make(chan pkcs11.SessionHandle, t.size)
	t.cache = newKeyCache()
	t.mechs = &mechanisms{}
	return t, nil
}

// findSlot picks the one slot whose token matches the URI.
func (t *Token) findSlot() error {
	slots, err := t.mod.api.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("PKCS#11 module %s: listing slots: %s", t.mod.path, ckrName(err))
	}
	var labels []string
	var hits []uint
	var infos []pkcs11.TokenInfo
	for _, s := range slots {
		ti, err := t.mod.api.GetTokenInfo(s)
		if err != nil {
			continue
		}
		label := strings.TrimRight(ti.Label, " \x00")
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			labels = append(labels, label)
		}
		u := t.uri
		if u.Token != "" && label != u.Token || u.Serial != "" && strings.TrimSpace(ti.SerialNumber) != u.Serial ||
			u.Manufacturer != "" && strings.TrimSpace(ti.ManufacturerID) != u.Manufacturer ||
			u.Model != "" && strings.TrimSpace(ti.Model) != u.Model || u.SlotID != nil && *u.SlotID != s {
			continue
		}
		hits = append(hits, s)
		infos = append(infos, ti)
	}
	sort.Strings(labels)
	switch len(hits) {
	case 0:
		have := "it has no initialised token"
		if len(labels) > 0 {
			have = "its tokens are " + strings.Join(labels, ", ")
		}
		return fmt.Errorf("no token %s in PKCS#11 module %s (%s): check token= in the URI, or initialise the token (softhsm2-util --init-token --free --label %s)", t.name, t.mod.path, have, t.uri.Token)
	case 1:
		t.slot, t.info = hits[0], infos[0]
		if t.info.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			return fmt.Errorf("token %s in PKCS#11 module %s is not initialised: initialise it first (softhsm2-util --init-token)", t.name, t.mod.path)
		}
		return nil
	}
	return fmt.Errorf("%d tokens in PKCS#11 module %s match %s: add serial= to the URI to pick one", len(hits), t.mod.path, t.name)
}

// Name is how messages name the token: "token LABEL (PKCS#11)".
func (t *Token) Name() string { return "token " + t.name + " (PKCS#11)" }

// URI is the token's URI.
func (t *Token) URI() URI { return t.uri }

// Login logs in to the token as its user with the PIN in c, passed to
// C_Login exactly as given: c.Password, or c.User:c.Password when c has a
// user (CloudHSM's PKCS#11 library takes user:password, SoftHSM a bare
// PIN). A wrong PIN is never retried, so the token's retry counter moves
// by one. A second Login while a session is open must give the same PIN;
// it shares the first one's C_Login.
func (t *Token) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	pin := c.Password
	if c.User != "" {
		pin = c.User + ":" + c.Password
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, fmt.Errorf("token %s is closed", t.name)
	}
	if t.loggedIn > 0 {
		sum := t.sum(pin)
		if subtle.ConstantTimeCompare(sum[:], t.pinSum[:]) != 1 {
			return nil, hsm.Errorf(hsm.CodePermission, "login", 0, "token %s: the PIN differs from the one this process logged in with", t.name)
		}
		t.loggedIn++
		return newSession(t), nil
	}
	sh, err := t.mod.api.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, t.fail("login", nil, err)
	}
	if err := t.mod.api.Login(sh, pkcs11.CKU_USER, pin); err != nil && ckr(err) != pkcs11.CKR_USER_ALREADY_LOGGED_IN {
		t.mod.api.CloseSession(sh)
		return nil, t.loginError(err)
	}
	rand.Read(t.salt[:])
	t.pinSum = t.sum(pin)
	t.first, t.open = sh, 1
	t.pool <- sh
	t.loggedIn = 1
	return newSession(t), nil
}

func (t *Token) sum(pin string) [32]byte {
	return sha256.Sum256(append(t.salt[:], pin...))
}

// loginError says what a failed C_Login means and what to do; it never
// holds the PIN.
func (t *Token) loginError(err error) error {
	switch ckr(err) {
	case pkcs11.CKR_PIN_INCORRECT:
		return hsm.Errorf(hsm.CodePermission, "login", 0, "token %s: wrong PIN (CKR_PIN_INCORRECT); keymig did not retry, so the token counted one failure: check the PIN in KEYMIG_PIN (or KEYMIG_SOURCE_PIN / KEYMIG_TARGET_PIN) or --pin-file", t.name)
	case pkcs11.CKR_PIN_LOCKED:
		return hsm.Errorf(hsm.CodePermission, "login", 0, "token %s: the user PIN is locked (CKR_PIN_LOCKED): the token's security officer must set a new one (C_InitPIN; softhsm2-util has no unlock, re-initialise the PIN)", t.name)
	case pkcs11.CKR_PIN_EXPIRED:
		return hsm.Errorf(hsm.CodePermission, "login", 0, "token %s: the user PIN has expired (CKR_PIN_EXPIRED): change it with the token's tools, then try again", t.name)
	case pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_PIN_INVALID:
		return hsm.Errorf(hsm.CodePermission, "login", 0, "token %s: the PIN has a length or characters the token refuses (%s): check the PIN", t.name, ckrName(err))
	}
	return t.fail("login", nil, err)
}

// logout ends one hsm session's share of the login; the last one logs the
// token out and closes every pooled session, which destroys the session
// objects.
func (t *Token) logout() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.loggedIn == 0 {
		return
	}
	t.loggedIn--
	if t.loggedIn > 0 {
		return
	}
	t.mod.api.Logout(t.first)
	for t.open > 0 {
		sh := <-t.pool
		t.mod.api.CloseSession(sh)
		t.open--
	}
	t.cache.dropSessionObjects()
	t.kekMu.Lock()
	t.kek = 0
	t.kekMu.Unlock()
}

// Close logs out if needed and releases the module (C_Finalize after its
// last token). Sessions must not be used afterwards.
func (t *Token) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	n := t.loggedIn
	t.mu.Unlock()
	for range n {
		t.logout()
	}
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.mod.release()
	return nil
}

// withSession runs fn on a pooled session: every call to the module goes
// through here, so at most the pool's size are in flight. A session is
// opened the first time the pool is short of one; a session the module
// says is gone is closed and not handed out again.
func (t *Token) withSession(ctx context.Context, fn func(sh pkcs11.SessionHandle) error) error {
	var sh pkcs11.SessionHandle
	select {
	case sh = <-t.pool:
	default:
		t.mu.Lock()
		if t.loggedIn == 0 {
			t.mu.Unlock()
			return hsm.Errorf(hsm.CodePermission, "", 0, "token %s: not logged in (the session was logged out)", t.name)
		}
		grow := t.open < t.size
		if grow {
			t.open++
		}
		t.mu.Unlock()
		if grow {
			var err error
			sh, err = t.mod.api.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				t.mu.Lock()
				t.open--
				t.mu.Unlock()
				return t.fail("open session", nil, err)
			}
		} else {
			select {
			case sh = <-t.pool:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	err := fn(sh)
	if err != nil && brokenSession(err) && sh != t.first {
		t.mod.api.CloseSession(sh)
		t.mu.Lock()
		t.open--
		t.mu.Unlock()
		return err
	}
	t.pool <- sh
	return err
}

// errClosed is returned by calls on a token that was closed.
var errClosed = errors.New("token closed")
