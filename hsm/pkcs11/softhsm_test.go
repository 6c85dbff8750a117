package pkcs11

import (
	"bytes"
	"context"
	"os"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/softhsmtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	softhsmtest.Cleanup()
	os.Exit(code)
}

// newToken makes a fresh SoftHSM token and returns it open and logged in.
func newToken(t *testing.T) (*softhsmtest.Env, string, *Token, hsm.Session) {
	t.Helper()
	e := softhsmtest.Shared(t)
	label := e.NewToken(t, "t")
	u, err := ParseURI(e.URI(label))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := Open(context.Background(), u, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	s, err := tok.Login(context.Background(), hsm.Credentials{Password: softhsmtest.UserPIN})
	if err != nil {
		t.Fatal(err)
	}
	return e, label, tok, s
}

func TestSoftHSMBasics(t *testing.T) {
	e, label, _, s := newToken(t)
	ctx := context.Background()
	ms, err := s.(hsm.MechanismLister).Mechanisms(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var oaep hsm.MechanismInfo
	for _, m := range ms {
		if m.Mechanism == hsm.MechRSAOAEP {
			oaep = m
		}
		if m.Mechanism == hsm.MechRSAAES {
			t.Errorf("rsa-aes listed: %+v", m)
		}
	}
	if !oaep.Wrap || !oaep.Unwrap || len(oaep.Hashes) == 0 {
		t.Errorf("rsa-oaep: %+v", oaep)
	}
	t.Logf("mechanisms: %+v", ms)
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "kek", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Label: "k1", ID: []byte{1}}})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: k.Ref})
	if err != nil {
		t.Fatal(err)
	}
	u, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "k1-copy", ID: []byte{2}}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(u.KCV, k.KCV) || len(k.KCV) != 3 || k.KCVFrom != "" {
		t.Fatalf("kcv %s vs %s (from %q)", u.KCV, k.KCV, k.KCVFrom)
	}
	// SoftHSM keeps no CKA_CHECK_VALUE for unwrapped keys: this one's was
	// found by a round trip inside the token, and says so.
	if u.KCVFrom != hsm.KCVRoundTrip || u.Bits != 128 {
		t.Errorf("unwrapped key: KCV from %q, %d bits; want %q, 128", u.KCVFrom, u.Bits, hsm.KCVRoundTrip)
	}
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048, Public: hsm.Template{Label: "rsa", ID: []byte{3}, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}}, Private: hsm.Template{Label: "rsa", ID: []byte{3}, Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pub.KCV, priv.KCV) || len(pub.KCV) != 3 {
		t.Fatalf("pair kcv %x %x", pub.KCV, priv.KCV)
	}
	blob, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, Params: hsm.Params{Hash: "sha1"}, WrappingKey: pub.Ref, Payload: kek.Ref})
	if err != nil {
		t.Fatal(err)
	}
	u2, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechRSAOAEP, Params: hsm.Params{Hash: "sha1"}, UnwrappingKey: priv.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "kek2", Session: true}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(u2.KCV, kek.KCV) {
		t.Fatal("kek kcv")
	}
	blob, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: priv.Ref})
	if err != nil {
		t.Fatal(err)
	}
	u3, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassPrivate, Type: hsm.TypeRSA, Template: hsm.Template{Label: "rsa-copy", ID: []byte{4}}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(u3.KCV, priv.KCV) {
		t.Fatal("priv kcv")
	}
	_, _ = e, label
}
