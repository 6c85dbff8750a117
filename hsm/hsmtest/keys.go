package hsmtest

import (
	"bytes"
	"testing"

	"github.com/keymig/keymig/hsm"
)

func testDefaults(t *testing.T, h Harness) {
	f := newFixture(t, h)
	k := aesKey(t, f.alice, "defaults", nil)
	want := hsm.Attributes{Token: true, Private: true, Extractable: true, Sensitive: true, AlwaysSensitive: true,
		Local: true, Modifiable: true, Destroyable: true}
	if d := want.Diff(k.Attrs); len(d) > 0 {
		t.Errorf("generated aes key attributes differ from CloudHSM defaults in %v: %+v", d, k.Attrs)
	}
	if k.Ref == 0 || len(k.KCV) != 3 || k.Owner != "alice" || k.Class != hsm.ClassSecret || k.Type != hsm.TypeAES || k.Bits != 256 {
		t.Errorf("generated key info: %+v", k)
	}
	ne := aesKey(t, f.alice, "non-extractable", map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrEncrypt: true})
	if !ne.Attrs.NeverExtractable || ne.Attrs.Extractable || !ne.Attrs.Encrypt {
		t.Errorf("extractable=false key: never-extractable should be derived true: %+v", ne.Attrs)
	}
	pub, priv, err := f.alice.GenerateKeyPair(ctxT(t), hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256",
		Public: hsm.Template{Label: "ec"}, Private: hsm.Template{Label: "ec"}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pub.KCV, priv.KCV) || len(pub.KCV) != 3 {
		t.Errorf("key pair halves have KCVs %x and %x, want the same", pub.KCV, priv.KCV)
	}
	if pub.Attrs.Sensitive || !priv.Attrs.Sensitive || pub.Class != hsm.ClassPublic || priv.Class != hsm.ClassPrivate || pub.Curve != "P-256" {
		t.Errorf("ec pair: pub %+v priv %+v", pub, priv)
	}
	if pub.Ref == priv.Ref {
		t.Error("both halves got the same handle")
	}
	// Never-by-hand attributes cannot be set in a template either.
	for _, a := range []hsm.Attr{hsm.AttrLocal, hsm.AttrNeverExtractable, hsm.AttrAlwaysSensitive} {
		_, err := f.alice.GenerateKey(ctxT(t), hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Attrs: map[hsm.Attr]bool{a: true}}})
		wantCode(t, "template sets "+string(a), err, hsm.CodeInvalidInput)
	}
	_, err = f.alice.GenerateKey(ctxT(t), hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Attrs: map[hsm.Attr]bool{hsm.AttrTrusted: true}}})
	wantCode(t, "crypto user sets trusted in a template", err, hsm.CodePermission)
	list, err := f.alice.ListKeys(ctxT(t), hsm.Filter{Class: hsm.ClassSecret})
	if err != nil || len(list) != 2 {
		t.Fatalf("ListKeys(secret) = %d keys, %v; want 2", len(list), err)
	}
	if list[0].Ref > list[1].Ref {
		t.Error("ListKeys is not ordered by handle")
	}
	if _, err := f.carol.GetKey(ctxT(t), k.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("carol sees alice's key: %v", err)
	}
	if all, _ := f.co.ListKeys(ctxT(t), hsm.Filter{}); len(all) != 4 {
		t.Errorf("the crypto officer lists %d keys, want all 4", len(all))
	}
}

// matrixOp runs one operation as actor against a fresh payload key p and a
// fresh usable key w (both alice's, both shared with bob).
type matrixOp struct {
	name string
	run  func(f *fixture, actor hsm.FullSession, p, w hsm.KeyInfo, blob, ct []byte) error
	// want: owner, sharee, other crypto user, crypto officer
	want [4]hsm.Code
}

func testPermissionMatrix(t *testing.T, h Harness) {
	f := newFixture(t, h)
	const (
		ok   = hsm.Code("")
		perm = hsm.CodePermission
		nf   = hsm.CodeNotFound
	)
	ops := []matrixOp{
		{"wrap", func(f *fixture, a hsm.FullSession, p, w hsm.KeyInfo, _, _ []byte) error {
			_, err := a.WrapKey(ctxT(f.t), hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: w.Ref, Payload: p.Ref})
			return err
		}, [4]hsm.Code{ok, perm, nf, perm}},
		{"unwrap", func(f *fixture, a hsm.FullSession, p, w hsm.KeyInfo, blob, _ []byte) error {
			_, err := a.UnwrapKey(ctxT(f.t), hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: w.Ref, Blob: blob,
				Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "unwrapped"}})
			return err
		}, [4]hsm.Code{ok, ok, nf, perm}},
		{"share", func(f *fixture, a hsm.FullSession, p, _ hsm.KeyInfo, _, _ []byte) error {
			return a.ShareKey(ctxT(f.t), p.Ref, "dave")
		}, [4]hsm.Code{ok, perm, nf, perm}},
		{"unshare", func(f *fixture, a hsm.FullSession, p, _ hsm.KeyInfo, _, _ []byte) error {
			return a.UnshareKey(ctxT(f.t), p.Ref, "bob")
		}, [4]hsm.Code{ok, perm, nf, perm}},
		{"delete", func(f *fixture, a hsm.FullSession, p, _ hsm.KeyInfo, _, _ []byte) error {
			return a.DeleteKey(ctxT(f.t), p.Ref)
		}, [4]hsm.Code{ok, perm, nf, perm}},
		{"set-attribute", func(f *fixture, a hsm.FullSession, p, _ hsm.KeyInfo, _, _ []byte) error {
			return a.SetAttribute(ctxT(f.t), p.Ref, hsm.AttrDecrypt, true)
		}, [4]hsm.Code{ok, perm, nf, perm}},
		{"encrypt", func(f *fixture, a hsm.FullSession, _, w hsm.KeyInfo, _, _ []byte) error {
			_, err := a.Encrypt(ctxT(f.t), w.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("hello"))
			return err
		}, [4]hsm.Code{ok, ok, nf, perm}},
		{"decrypt", func(f *fixture, a hsm.FullSession, _, w hsm.KeyInfo, _, ct []byte) error {
			_, err := a.Decrypt(ctxT(f.t), w.Ref, hsm.MechAESGCM, hsm.Params{}, ct)
			return err
		}, [4]hsm.Code{ok, ok, nf, perm}},
		{"export-masked", func(f *fixture, a hsm.FullSession, p, _ hsm.KeyInfo, _, _ []byte) error {
			_, err := a.ExportMasked(ctxT(f.t), p.Ref)
			return err
		}, [4]hsm.Code{ok, perm, nf, ok}},
	}
	actors := []struct {
		name string
		s    func(*fixture) hsm.FullSession
	}{
		{"owner", func(f *fixture) hsm.FullSession { return f.alice }},
		{"sharee", func(f *fixture) hsm.FullSession { return f.bob }},
		{"other-crypto-user", func(f *fixture) hsm.FullSession { return f.carol }},
		{"crypto-officer", func(f *fixture) hsm.FullSession { return f.co }},
	}
	ctx := ctxT(t)
	for _, op := range ops {
		for i, actor := range actors {
			t.Run(op.name+"/"+actor.name, func(t *testing.T) {
				f.t = t
				p := aesKey(t, f.alice, "payload", nil)
				w := aesKey(t, f.alice, "usable", map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true, hsm.AttrEncrypt: true, hsm.AttrDecrypt: true})
				for _, k := range []hsm.KeyInfo{p, w} {
					if err := f.alice.ShareKey(ctx, k.Ref, "bob"); err != nil {
						t.Fatal(err)
					}
				}
				p, _ = f.alice.GetKey(ctx, p.Ref)
				w, _ = f.alice.GetKey(ctx, w.Ref)
				blob, err := f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: w.Ref, Payload: p.Ref})
				if err != nil {
					t.Fatal(err)
				}
				ct, err := f.alice.Encrypt(ctx, w.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("hello"))
				if err != nil {
					t.Fatal(err)
				}
				err = op.run(f, actor.s(f), p, w, blob, ct)
				wantCode(t, op.name+" by "+actor.name, err, op.want[i])
				if err != nil {
					sameKey(t, "after a refused "+op.name, f.alice, p)
					sameKey(t, "after a refused "+op.name, f.alice, w)
					if hsm.CodeOf(err) == hsm.CodeNotFound {
						mentions(t, op.name, err, "not found")
					}
				}
			})
		}
	}
}

func testWrapRules(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	w := aesKey(t, f.alice, "kek", map[hsm.Attr]bool{hsm.AttrWrap: true})
	noWrap := aesKey(t, f.alice, "no-wrap", nil)
	ne := aesKey(t, f.alice, "non-extractable", map[hsm.Attr]bool{hsm.AttrExtractable: false})
	wwt := aesKey(t, f.alice, "wrap-with-trusted", map[hsm.Attr]bool{hsm.AttrWrapWithTrusted: true})
	p := aesKey(t, f.alice, "payload", nil)
	wrap := func(wk, pk hsm.KeyInfo) error {
		_, err := f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: wk.Ref, Payload: pk.Ref})
		return err
	}
	e1 := wantCode(t, "wrap a non-extractable key", wrap(w, ne), hsm.CodeNotExtractable)
	mentions(t, "non-extractable", e1, ne.Ref.String(), "extractable")
	e2 := wantCode(t, "wrap with a key without wrap", wrap(noWrap, p), hsm.CodePermission)
	mentions(t, "no wrap attribute", e2, noWrap.Ref.String(), "wrap")
	e3 := wantCode(t, "wrap a wrap-with-trusted key with an untrusted key", wrap(w, wwt), hsm.CodePermission)
	mentions(t, "untrusted wrapping key", e3, wwt.Ref.String(), "trusted")
	if e1.Error() == e2.Error() || e2.Error() == e3.Error() || e1.Error() == e3.Error() {
		t.Error("the three wrap refusals share a message; each needs its own")
	}
	for _, k := range []hsm.KeyInfo{w, noWrap, ne, wwt, p} {
		sameKey(t, "after refused wraps", f.alice, k)
	}
	wantCode(t, "officer sets trusted", f.co.SetAttribute(ctx, w.Ref, hsm.AttrTrusted, true), "")
	wantCode(t, "wrap a wrap-with-trusted key with a trusted key", wrap(w, wwt), "")
	wantCode(t, "wrap with the payload as its own wrapping key", wrap(w, w), hsm.CodeInvalidInput)
}

func testAttributeRules(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	k := aesKey(t, f.alice, "attrs", nil)
	set := func(s hsm.FullSession, a hsm.Attr, v bool) error { return s.SetAttribute(ctx, k.Ref, a, v) }
	wantCode(t, "wrap-with-trusted false→true", set(f.alice, hsm.AttrWrapWithTrusted, true), "")
	wantCode(t, "wrap-with-trusted true→false", set(f.alice, hsm.AttrWrapWithTrusted, false), hsm.CodePermission)
	wantCode(t, "wrap-with-trusted true→true (idempotent)", set(f.alice, hsm.AttrWrapWithTrusted, true), "")
	for _, a := range []hsm.Attr{hsm.AttrLocal, hsm.AttrNeverExtractable, hsm.AttrAlwaysSensitive} {
		wantCode(t, "set "+string(a)+" by hand", set(f.alice, a, false), hsm.CodeInvalidInput)
	}
	wantCode(t, "crypto user sets trusted", set(f.alice, hsm.AttrTrusted, true), hsm.CodePermission)
	wantCode(t, "crypto officer sets trusted", set(f.co, hsm.AttrTrusted, true), "")
	wantCode(t, "crypto officer sets encrypt", set(f.co, hsm.AttrEncrypt, true), hsm.CodePermission)
	wantCode(t, "extractable true→false", set(f.alice, hsm.AttrExtractable, false), hsm.CodeInvalidInput)
	wantCode(t, "encrypt on", set(f.alice, hsm.AttrEncrypt, true), "")
	got, _ := f.alice.GetKey(ctx, k.Ref)
	if !got.Attrs.Encrypt || !got.Attrs.Trusted || !got.Attrs.WrapWithTrusted || !got.Attrs.Extractable || got.Attrs.NeverExtractable {
		t.Errorf("attributes after changes: %+v", got.Attrs)
	}
	wantCode(t, "destroyable true→false", set(f.alice, hsm.AttrDestroyable, false), "")
	wantCode(t, "modifiable true→false", set(f.alice, hsm.AttrModifiable, false), "")
	before, _ := f.alice.GetKey(ctx, k.Ref)
	wantCode(t, "modifiable false→true", set(f.alice, hsm.AttrModifiable, true), hsm.CodePermission)
	err := wantCode(t, "change a non-modifiable key", set(f.alice, hsm.AttrDecrypt, true), hsm.CodePermission)
	mentions(t, "non-modifiable", err, k.Ref.String(), "modifiable")
	err = wantCode(t, "delete a non-destroyable key", f.alice.DeleteKey(ctx, k.Ref), hsm.CodePermission)
	mentions(t, "non-destroyable", err, k.Ref.String(), "destroyable")
	sameKey(t, "after refused changes", f.alice, before)
	d := aesKey(t, f.alice, "delete-me", nil)
	wantCode(t, "delete", f.alice.DeleteKey(ctx, d.Ref), "")
	wantCode(t, "delete again", f.alice.DeleteKey(ctx, d.Ref), hsm.CodeNotFound)
}

func testFIPS(t *testing.T, h Harness) {
	if !h.FIPS {
		t.Skip("the backend does not run in FIPS mode")
	}
	f := newFixture(t, h)
	ctx := ctxT(t)
	_, _, err := f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 1024})
	err = wantCode(t, "generate rsa-1024 in fips mode", err, hsm.CodeUnsupportedMechanism)
	mentions(t, "rsa-1024", err, "fips")
	_, err = f.alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 64})
	if err == nil {
		t.Error("aes-64 was generated")
	}
	_, _, err = f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-224"})
	wantCode(t, "generate ec P-224", err, hsm.CodeUnsupportedMechanism)
	pub, priv := rsaPair(t, f.alice, "rsa", map[hsm.Attr]bool{hsm.AttrWrap: true}, map[hsm.Attr]bool{hsm.AttrUnwrap: true})
	p := aesKey(t, f.alice, "payload", nil)
	_, err = f.alice.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAPKCS, WrappingKey: pub.Ref, Payload: p.Ref})
	err = wantCode(t, "wrap with rsa-pkcs in fips mode", err, hsm.CodeUnsupportedMechanism)
	mentions(t, "rsa-pkcs", err, "fips")
	_, err = f.alice.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechRSAPKCS, UnwrappingKey: priv.Ref, Blob: make([]byte, 256), Class: hsm.ClassSecret, Type: hsm.TypeAES})
	wantCode(t, "unwrap with rsa-pkcs in fips mode", err, hsm.CodeUnsupportedMechanism)
}
