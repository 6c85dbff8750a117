package hsmtest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
)

// roundTrip wraps payload under wk and unwraps it with uk, then checks the
// new key: same KCV, local=false, the template's label and id, the caller
// as owner.
var rtSeq atomic.Int64

func roundTrip(t *testing.T, s hsm.FullSession, m hsm.Mechanism, p hsm.Params, wk, uk, payload hsm.KeyInfo) hsm.KeyInfo {
	t.Helper()
	ctx := ctxT(t)
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: m, Params: p, WrappingKey: wk.Ref, Payload: payload.Ref})
	if err != nil {
		t.Fatalf("%s wrap of %s: %v", m, payload.Ref, err)
	}
	id := []byte(fmt.Sprintf("rt-%s-%d", m, rtSeq.Add(1)))
	got, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: m, Params: p, UnwrappingKey: uk.Ref, Blob: blob,
		Class: payload.Class, Type: payload.Type,
		Template: hsm.Template{Label: "unwrapped", ID: id, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false}}})
	if err != nil {
		t.Fatalf("%s unwrap of %s: %v", m, payload.Ref, err)
	}
	if !bytes.Equal(got.KCV, payload.KCV) {
		t.Errorf("%s round trip of %s: kcv %x, want %x", m, payload.Ref, got.KCV, payload.KCV)
	}
	if got.Attrs.Local || got.Attrs.Extractable || got.Attrs.NeverExtractable || got.Attrs.AlwaysSensitive {
		t.Errorf("%s unwrapped key: local/extractable/never-extractable/always-sensitive should all be false: %+v", m, got.Attrs)
	}
	if got.Label != "unwrapped" || !bytes.Equal(got.ID, id) || got.Owner != s.User().Name || got.Bits != payload.Bits || got.Ref == payload.Ref {
		t.Errorf("%s unwrapped key info: %+v", m, got)
	}
	return got
}

func testSymmetricMechanisms(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	kek := aesKey(t, f.alice, "kek", map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true})
	for _, bits := range []int{128, 192, 256} {
		payload, err := f.alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: bits})
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, f.alice, hsm.MechAESKW, hsm.Params{}, kek, kek, payload)
		roundTrip(t, f.alice, hsm.MechAESKWP, hsm.Params{}, kek, kek, payload)
		roundTrip(t, f.alice, hsm.MechAESGCM, hsm.Params{AAD: []byte("context")}, kek, kek, payload)
	}
	ecPub, ecPriv, err := f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-384"})
	if err != nil {
		t.Fatal(err)
	}
	got := roundTrip(t, f.alice, hsm.MechAESKWP, hsm.Params{}, kek, kek, ecPriv)
	if !bytes.Equal(got.KCV, ecPub.KCV) || got.Curve != "P-384" {
		t.Errorf("unwrapped ec private key: %+v", got)
	}
	// The sharee can unwrap with a shared key; the new key is hers.
	if err := f.alice.ShareKey(ctx, kek.Ref, "bob"); err != nil {
		t.Fatal(err)
	}
	p := aesKey(t, f.alice, "for-bob", nil)
	blob, err := f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: p.Ref})
	if err != nil {
		t.Fatal(err)
	}
	bk, err := f.bob.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES})
	if err != nil || bk.Owner != "bob" || !bytes.Equal(bk.KCV, p.KCV) {
		t.Fatalf("bob unwraps with a shared key: %+v, %v", bk, err)
	}
	// Encrypt / decrypt with AES-GCM; the IV is made inside, so two
	// encryptions differ.
	ek := aesKey(t, f.alice, "data", map[hsm.Attr]bool{hsm.AttrEncrypt: true, hsm.AttrDecrypt: true})
	aad := hsm.Params{AAD: []byte("row 7")}
	c1, err := f.alice.Encrypt(ctx, ek.Ref, hsm.MechAESGCM, aad, []byte("secret data"))
	if err != nil {
		t.Fatal(err)
	}
	c2, _ := f.alice.Encrypt(ctx, ek.Ref, hsm.MechAESGCM, aad, []byte("secret data"))
	if bytes.Equal(c1, c2) || len(c1) != 12+len("secret data")+16 {
		t.Errorf("aes-gcm ciphertexts: %x %x; want IV ‖ ct ‖ tag with fresh IVs", c1, c2)
	}
	pt, err := f.alice.Decrypt(ctx, ek.Ref, hsm.MechAESGCM, aad, c1)
	if err != nil || string(pt) != "secret data" {
		t.Fatalf("decrypt: %q, %v", pt, err)
	}
	_, err = f.alice.Decrypt(ctx, ek.Ref, hsm.MechAESGCM, hsm.Params{AAD: []byte("row 8")}, c1)
	wantCode(t, "decrypt with the wrong aad", err, hsm.CodeIntegrity)
	_, err = f.alice.Encrypt(ctx, kek.Ref, hsm.MechAESGCM, aad, []byte("x"))
	wantCode(t, "encrypt with a key without encrypt", err, hsm.CodePermission)
	_, err = f.alice.Encrypt(ctx, ek.Ref, hsm.MechAESKWP, aad, []byte("x"))
	wantCode(t, "encrypt with aes-kwp", err, hsm.CodeUnsupportedMechanism)
}

func testRSAMechanisms(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	pub, priv := rsaPair(t, f.alice, "transport", map[hsm.Attr]bool{hsm.AttrWrap: true}, map[hsm.Attr]bool{hsm.AttrUnwrap: true})
	if pub.Bits != 2048 || !bytes.Equal(pub.KCV, priv.KCV) {
		t.Fatalf("rsa pair: %+v %+v", pub, priv)
	}
	payload := aesKey(t, f.alice, "payload", nil)
	for _, p := range []hsm.Params{
		{},
		{Hash: "sha256", MGF1Hash: "sha1"},
		{Hash: "sha1"},
		{Hash: "sha384", Label: []byte("keymig")},
	} {
		roundTrip(t, f.alice, hsm.MechRSAOAEP, p, pub, priv, payload)
		roundTrip(t, f.alice, hsm.MechRSAAES, p, pub, priv, payload)
	}
	roundTrip(t, f.alice, hsm.MechRSAAES, hsm.Params{AESBits: 128}, pub, priv, payload)
	// Private keys travel by rsa-aes (as PKCS#8).
	ecPub, ecPriv, err := f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
	if err != nil {
		t.Fatal(err)
	}
	got := roundTrip(t, f.alice, hsm.MechRSAAES, hsm.Params{}, pub, priv, ecPriv)
	if !bytes.Equal(got.KCV, ecPub.KCV) {
		t.Error("ec private key changed kcv through rsa-aes")
	}
	_, rsaPriv2 := rsaPair(t, f.alice, "payload-rsa", nil, nil)
	roundTrip(t, f.alice, hsm.MechRSAAES, hsm.Params{Hash: "sha512"}, pub, priv, rsaPriv2)
	// A private key does not fit in one OAEP block.
	_, err = f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, WrappingKey: pub.Ref, Payload: ecPriv.Ref})
	if err == nil {
		// P-256 PKCS#8 is ~138 bytes and fits OAEP-SHA256 of RSA-2048
		// (190 bytes); an RSA private key never does.
		_, err = f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, WrappingKey: pub.Ref, Payload: rsaPriv2.Ref})
		wantCode(t, "rsa-oaep wrap of an rsa private key", err, hsm.CodeInvalidInput)
	}
	// Interoperability: a key the HSM wraps under an imported public key
	// unwraps outside with the wrap package, and the KCV matches.
	ext, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&ext.PublicKey)
	imp, err := f.alice.ImportPublicKey(ctx, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), hsm.Template{Label: "external", Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, Params: hsm.Params{MGF1Hash: "sha1"}, WrappingKey: imp.Ref, Payload: payload.Ref})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := wrap.UnwrapOAEP(ext, blob, wrap.OAEPParams{MGF1Hash: sha1Hash(t)})
	if err != nil {
		t.Fatalf("unwrapping outside the hsm: %v", err)
	}
	if kcv, _ := wrap.KCVSecret(raw); !bytes.Equal(kcv, payload.KCV) {
		t.Errorf("outside kcv %x, hsm kcv %x", kcv, payload.KCV)
	}
	// And a key wrapped outside unwraps inside (private key by rsa-aes
	// into the HSM's own transport key).
	ecExt, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p8, _ := wrap.MarshalPKCS8(ecExt)
	pubPEM, err := f.alice.ExportPublicKey(ctx, pub.Ref)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(pubPEM)
	hp, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	blob, err = wrap.WrapRSAAES(hp.(*rsa.PublicKey), p8, wrap.RSAAESParams{})
	if err != nil {
		t.Fatal(err)
	}
	in, err := f.alice.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechRSAAES, UnwrappingKey: priv.Ref, Blob: blob, Class: hsm.ClassPrivate, Type: hsm.TypeEC})
	if err != nil {
		t.Fatal(err)
	}
	if kcv, _ := wrap.KCVPublic(&ecExt.PublicKey); !bytes.Equal(kcv, in.KCV) {
		t.Errorf("imported ec private key kcv %x, want %x", in.KCV, kcv)
	}
	// Mechanism/key mismatches are refused clearly.
	_, err = f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, WrappingKey: priv.Ref, Payload: payload.Ref})
	if err == nil {
		t.Error("wrapped with the private half (wrap=false, wrong class)")
	}
}

func testPublicKeys(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	pub, priv, err := f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []hsm.KeyRef{pub.Ref, priv.Ref} {
		p, err := f.alice.ExportPublicKey(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(p)
		if blk == nil || blk.Type != "PUBLIC KEY" {
			t.Fatalf("export of %s is not a PEM public key: %s", ref, p)
		}
		k, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if kcv, _ := wrap.KCVPublic(k); !bytes.Equal(kcv, pub.KCV) {
			t.Errorf("exported public key kcv %x, want %x", kcv, pub.KCV)
		}
		imp, err := f.bob.ImportPublicKey(ctx, p, hsm.Template{Label: "imported"})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(imp.KCV, pub.KCV) || imp.Attrs.Local || imp.Owner != "bob" || imp.Class != hsm.ClassPublic {
			t.Errorf("imported public key: %+v", imp)
		}
	}
	_, err = f.alice.ImportPublicKey(ctx, []byte("not pem"), hsm.Template{})
	wantCode(t, "import garbage", err, hsm.CodeInvalidInput)
	s := aesKey(t, f.alice, "secret", nil)
	_, err = f.alice.ExportPublicKey(ctx, s.Ref)
	wantCode(t, "export the public half of an aes key", err, hsm.CodeInvalidInput)
	_, err = f.carol.ExportPublicKey(ctx, pub.Ref)
	wantCode(t, "export someone else's public key (public keys are visible to all)", err, "")
}

func testUnwrapFailures(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	kek := aesKey(t, f.alice, "kek", map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true})
	other := aesKey(t, f.alice, "other", map[hsm.Attr]bool{hsm.AttrUnwrap: true})
	pub, priv := rsaPair(t, f.alice, "rsa", map[hsm.Attr]bool{hsm.AttrWrap: true}, map[hsm.Attr]bool{hsm.AttrUnwrap: true})
	payload := aesKey(t, f.alice, "payload", nil)
	wrapWith := func(m hsm.Mechanism, p hsm.Params, wk hsm.KeyRef) []byte {
		b, err := f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: m, Params: p, WrappingKey: wk, Payload: payload.Ref})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	flip := func(b []byte, i int) []byte {
		c := bytes.Clone(b)
		c[(i+len(c))%len(c)] ^= 0x01
		return c
	}
	kwp := wrapWith(hsm.MechAESKWP, hsm.Params{}, kek.Ref)
	kw := wrapWith(hsm.MechAESKW, hsm.Params{}, kek.Ref)
	gcm := wrapWith(hsm.MechAESGCM, hsm.Params{AAD: []byte("a")}, kek.Ref)
	oaep := wrapWith(hsm.MechRSAOAEP, hsm.Params{}, pub.Ref)
	rsaaes := wrapWith(hsm.MechRSAAES, hsm.Params{}, pub.Ref)
	cases := []struct {
		name string
		m    hsm.Mechanism
		p    hsm.Params
		uk   hsm.KeyRef
		blob []byte
	}{
		{"aes-kwp flipped byte", hsm.MechAESKWP, hsm.Params{}, kek.Ref, flip(kwp, 3)},
		{"aes-kwp wrong key", hsm.MechAESKWP, hsm.Params{}, other.Ref, kwp},
		{"aes-kwp truncated", hsm.MechAESKWP, hsm.Params{}, kek.Ref, kwp[:len(kwp)-8]},
		{"aes-kwp empty", hsm.MechAESKWP, hsm.Params{}, kek.Ref, nil},
		{"aes-kw flipped byte", hsm.MechAESKW, hsm.Params{}, kek.Ref, flip(kw, -1)},
		{"aes-kw wrong key", hsm.MechAESKW, hsm.Params{}, other.Ref, kw},
		{"aes-gcm flipped tag", hsm.MechAESGCM, hsm.Params{AAD: []byte("a")}, kek.Ref, flip(gcm, -1)},
		{"aes-gcm wrong aad", hsm.MechAESGCM, hsm.Params{AAD: []byte("b")}, kek.Ref, gcm},
		{"aes-gcm short", hsm.MechAESGCM, hsm.Params{}, kek.Ref, gcm[:10]},
		{"rsa-oaep flipped byte", hsm.MechRSAOAEP, hsm.Params{}, priv.Ref, flip(oaep, 10)},
		{"rsa-oaep wrong hash", hsm.MechRSAOAEP, hsm.Params{Hash: "sha1"}, priv.Ref, oaep},
		{"rsa-oaep wrong mgf1 hash", hsm.MechRSAOAEP, hsm.Params{MGF1Hash: "sha1"}, priv.Ref, oaep},
		{"rsa-oaep wrong label", hsm.MechRSAOAEP, hsm.Params{Label: []byte("x")}, priv.Ref, oaep},
		{"rsa-aes flipped tail", hsm.MechRSAAES, hsm.Params{}, priv.Ref, flip(rsaaes, -2)},
		{"rsa-aes wrong hash", hsm.MechRSAAES, hsm.Params{Hash: "sha512"}, priv.Ref, rsaaes},
		{"aes-kwp blob unwrapped as a private key", hsm.MechAESKWP, hsm.Params{}, kek.Ref, kwp},
	}
	var first string
	for _, c := range cases {
		class, typ := hsm.ClassSecret, hsm.TypeAES
		if c.name == "aes-kwp blob unwrapped as a private key" {
			class, typ = hsm.ClassPrivate, hsm.TypeRSA
		}
		_, err := f.alice.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: c.m, Params: c.p, UnwrappingKey: c.uk, Blob: c.blob, Class: class, Type: typ})
		if err == nil {
			t.Errorf("%s: unwrap succeeded", c.name)
			continue
		}
		if !errorsIs(err, hsm.ErrUnwrapFailed) || err.Error() != hsm.ErrUnwrapFailed.Error() {
			t.Errorf("%s: error %q, want exactly hsm.ErrUnwrapFailed", c.name, err)
		}
		if first == "" {
			first = err.Error()
		} else if err.Error() != first {
			t.Errorf("%s: message %q differs from %q", c.name, err, first)
		}
	}
	keys, _ := f.alice.ListKeys(ctx, hsm.Filter{})
	if len(keys) != 5 {
		t.Errorf("failed unwraps left keys behind: %d keys, want 5", len(keys))
	}
}
