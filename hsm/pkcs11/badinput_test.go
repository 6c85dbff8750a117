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
