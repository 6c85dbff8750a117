package pkcs11

import (
	"context"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// stub is a module with one token whose C_Login answers loginErr; the
// calls it does not define panic, so a test sees any it did not expect.
type stub struct {
	api
	loginErr error
	logins   int
	closed   int
}

func (s *stub) GetSlotList(bool) ([]uint, error) { return []uint{7}, nil }
func (s *stub) GetTokenInfo(uint) (pkcs11.TokenInfo, error) {
	return pkcs11.TokenInfo{Label: "legacy                          ", SerialNumber: "42", Flags: pkcs11.CKF_TOKEN_INITIALIZED}, nil
}
func (s *stub) OpenSession(uint, uint) (pkcs11.SessionHandle, error) { return 1, nil }
func (s *stub) CloseSession(pkcs11.SessionHandle) error              { s.closed++; return nil }
func (s *stub) Login(_ pkcs11.SessionHandle, _ uint, pin string) error {
	s.logins++
	return s.loginErr
}
func (s *stub) Finalize() error { return nil }
func (s *stub) Destroy()        {}

func stubToken(t *testing.T, st *stub) *Token {
	t.Helper()
	u, err := ParseURI("pkcs11:token=legacy?module-path=/stub.so")
	if err != nil {
		t.Fatal(err)
	}
	tok, err := Open(context.Background(), u, Options{api: st})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	return tok
}

// TestWrongPINNotRetried: CKR_PIN_INCORRECT is answered once, with an
// error that names the token and says where the PIN came from, and the
// session opened for it is closed.
func TestWrongPINNotRetried(t *testing.T) {
	st := &stub{loginErr: pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)}
	tok := stubToken(t, st)
	_, err := tok.Login(context.Background(), hsm.Credentials{Password: "9999-wrong"})
	if err == nil {
		t.Fatal("logged in with a wrong PIN")
	}
	if st.logins != 1 {
		t.Fatalf("C_Login called %d times, want 1: a wrong PIN must never be retried", st.logins)
	}
	if st.closed != 1 {
		t.Errorf("the login session was closed %d times, want 1", st.closed)
	}
	if hsm.CodeOf(err) != hsm.CodePermission {
		t.Errorf("code %q, want permission", hsm.CodeOf(err))
	}
	msg := err.Error()
	for _, want := range []string{"legacy", "CKR_PIN_INCORRECT", "did not retry", "KEYMIG_PIN"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if strings.Contains(msg, "9999-wrong") {
		t.Errorf("error %q holds the PIN", msg)
	}
}

func TestLockedPIN(t *testing.T) {
	st := &stub{loginErr: pkcs11.Error(pkcs11.CKR_PIN_LOCKED)}
	_, err := stubToken(t, st).Login(context.Background(), hsm.Credentials{Password: "1234"})
	if err == nil || !strings.Contains(err.Error(), "locked") || st.logins != 1 {
		t.Fatalf("locked PIN: %v after %d logins", err, st.logins)
	}
}

// TestPINAsGiven: the PIN reaches C_Login exactly as given, user:password
// included (CloudHSM's library takes that form).
func TestPINAsGiven(t *testing.T) {
	var got string
	st := &pinRecorder{stub: stub{}, got: &got}
	u, _ := ParseURI("pkcs11:token=legacy?module-path=/stub.so")
	tok, err := Open(context.Background(), u, Options{api: st})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if _, err := tok.Login(context.Background(), hsm.Credentials{User: "cu1", Password: "pa:ss"}); err != nil {
		t.Fatal(err)
	}
	if got != "cu1:pa:ss" {
		t.Fatalf("C_Login got %q, want cu1:pa:ss", got)
	}
}

type pinRecorder struct {
	stub
	got *string
}

func (p *pinRecorder) Login(_ pkcs11.SessionHandle, _ uint, pin string) error {
	*p.got = pin
	return nil
}
func (p *pinRecorder) Logout(pkcs11.SessionHandle) error { return nil }

func TestMissingModule(t *testing.T) {
	u, _ := ParseURI("pkcs11:token=legacy?module-path=/nonexistent/libnothing.so")
	_, err := Open(context.Background(), u, Options{})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/libnothing.so") || !strings.Contains(err.Error(), "module-path") {
		t.Fatalf("missing module: %v", err)
	}
}

func TestWrongTokenLabel(t *testing.T) {
	e := softhsmtest.Shared(t)
	have := e.NewToken(t, "present")
	u, _ := ParseURI(e.URI("no-such-token"))
	_, err := Open(context.Background(), u, Options{})
	if err == nil {
		t.Fatal("opened a token that does not exist")
	}
	for _, want := range []string{"no-such-token", have, e.Module, "softhsm2-util --init-token"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestWrongPINSoftHSM: a real token refuses the PIN once; the next login
// with the right PIN works, so nothing was locked by retries.
func TestWrongPINSoftHSM(t *testing.T) {
	e := softhsmtest.Shared(t)
	label := e.NewToken(t, "pin")
	u, _ := ParseURI(e.URI(label))
	tok, err := Open(context.Background(), u, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if _, err := tok.Login(context.Background(), hsm.Credentials{Password: "000000"}); err == nil || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("wrong PIN: %v", err)
	}
	s, err := tok.Login(context.Background(), hsm.Credentials{Password: softhsmtest.UserPIN})
	if err != nil {
		t.Fatal(err)
	}
	s.Logout(context.Background())
}

// TestNotExtractable: a key made with CKA_EXTRACTABLE false by pkcs11-tool
// is refused by name before the module is asked, and nothing is made.
func TestNotExtractable(t *testing.T) {
	e, label, _, s := newToken(t)
	e.Tool(t, label, "--keygen", "--key-type", "AES:32", "--label", "locked", "--id", "0a", "--sensitive")
	ctx := context.Background()
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "kek", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	keys, err := s.ListKeys(ctx, hsm.Filter{ID: []byte{0x0a}})
	if err != nil || len(keys) != 1 {
		t.Fatalf("list: %v %v", keys, err)
	}
	before, _ := s.ListKeys(ctx, hsm.Filter{})
	_, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: keys[0].Ref})
	if hsm.CodeOf(err) != hsm.CodeNotExtractable {
		t.Fatalf("wrap of a non-extractable key: %v", err)
	}
	for _, want := range []string{label, keys[0].Ref.String(), "locked", "CKA_EXTRACTABLE"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if after, _ := s.ListKeys(ctx, hsm.Filter{}); len(after) != len(before) {
		t.Errorf("%d keys before, %d after", len(before), len(after))
	}
}

// crashing is a module with one extractable AES key and a wrapping key
// whose C_WrapKey fails as a module does when its device goes away.
type crashing struct {
	stub
	opened, wraps int
	class         byte
	found         bool
}

func (c *crashing) OpenSession(uint, uint) (pkcs11.SessionHandle, error) {
	c.opened++
	return pkcs11.SessionHandle(c.opened), nil
}
func (c *crashing) Logout(pkcs11.SessionHandle) error { return nil }
func (c *crashing) FindObjectsInit(_ pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) error {
	c.class = tmpl[0].Value[0]
	return nil
}
func (c *crashing) FindObjects(pkcs11.SessionHandle, int) ([]pkcs11.ObjectHandle, bool, error) {
	if c.class == pkcs11.CKO_SECRET_KEY && !c.found {
		c.found = true
		return []pkcs11.ObjectHandle{1, 2}, false, nil
	}
	return nil, false, nil
}
func (c *crashing) FindObjectsFinal(pkcs11.SessionHandle) error {
	if c.class != pkcs11.CKO_SECRET_KEY {
		c.found = false
	}
	return nil
}
func (c *crashing) GetAttributeValue(_ pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	label := map[pkcs11.ObjectHandle]string{1: "payload", 2: "kek"}[o]
	out := make([]*pkcs11.Attribute, len(a))
	for i, q := range a {
		var v any = false
		switch q.Type {
		case pkcs11.CKA_CLASS:
			v = pkcs11.CKO_SECRET_KEY
		case pkcs11.CKA_KEY_TYPE:
			v = pkcs11.CKK_AES
		case pkcs11.CKA_LABEL:
			v = label
		case pkcs11.CKA_ID:
			v = []byte(label)
		case pkcs11.CKA_VALUE_LEN:
			v = 32
		case pkcs11.CKA_CHECK_VALUE:
			v = []byte{1, 2, 3}
		case pkcs11.CKA_TOKEN, pkcs11.CKA_EXTRACTABLE:
			v = true
		case pkcs11.CKA_WRAP:
			v = o == 2
		}
		out[i] = pkcs11.NewAttribute(q.Type, v)
	}
	return out, nil
}
func (c *crashing) GetMechanismList(uint) ([]*pkcs11.Mechanism, error) {
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, nil
}
func (c *crashing) GetMechanismInfo(uint, []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error) {
	return pkcs11.MechanismInfo{Flags: pkcs11.CKF_WRAP | pkcs11.CKF_UNWRAP}, nil
}
func (c *crashing) WrapKey(pkcs11.SessionHandle, []*pkcs11.Mechanism, pkcs11.ObjectHandle, pkcs11.ObjectHandle) ([]byte, error) {
	c.wraps++
	return nil, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
}

// TestModuleCrashesACall: a call the module fails with CKR_DEVICE_ERROR is
// answered once (no retry here: the runner owns retries), with a
// retryable error naming the token and the key, and the broken session is
// closed rather than handed out again.
func TestModuleCrashesACall(t *testing.T) {
	c := &crashing{}
	tok := stubToken(t, &c.stub)
	tok.mod.api = c
	s, err := tok.Login(context.Background(), hsm.Credentials{Password: "1234"})
	if err != nil {
		t.Fatal(err)
	}
	keys, err := s.ListKeys(context.Background(), hsm.Filter{})
	if err != nil || len(keys) != 2 {
		t.Fatalf("list: %v %v", keys, err)
	}
	payload, kek := keys[0], keys[1]
	if payload.Label != "payload" {
		payload, kek = kek, payload
	}
	closedBefore := c.closed
	// Hold the login session so that the wrap runs on a second one.
	held := <-tok.pool
	_, err = s.WrapKey(context.Background(), hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: payload.Ref})
	if err == nil {
		t.Fatal("wrap succeeded on a crashing module")
	}
	if c.wraps != 1 {
		t.Errorf("C_WrapKey called %d times, want 1", c.wraps)
	}
	if !hsm.IsRetryable(err) {
		t.Errorf("error %v is not retryable", err)
	}
	for _, want := range []string{"legacy", payload.Ref.String(), "payload", "CKR_DEVICE_ERROR"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	tok.pool <- held
	if c.closed != closedBefore+1 || tok.open != 1 {
		t.Errorf("the broken session was not closed: %d closes (were %d), %d open", c.closed, closedBefore, tok.open)
	}
}
