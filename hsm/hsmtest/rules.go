package hsmtest

import (
	"slices"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// CloudHSM rules every backend with users must follow: public keys are
// visible to and usable by every user and are never shared, extractable is
// fixed when a key is made, and user names are not case-sensitive.

func testPublicKeysForAll(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	pub, priv := rsaPair(t, f.alice, "alice-transport", map[hsm.Attr]bool{hsm.AttrWrap: true}, nil)
	keys, err := f.carol.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var refs []hsm.KeyRef
	for _, k := range keys {
		refs = append(refs, k.Ref)
	}
	if !slices.Contains(refs, pub.Ref) || slices.Contains(refs, priv.Ref) {
		t.Errorf("carol lists %v: want alice's public key %s and not her private key %s", refs, pub.Ref, priv.Ref)
	}
	if _, err := f.carol.GetKey(ctx, pub.Ref); err != nil {
		t.Errorf("carol gets alice's public key: %v", err)
	}
	if _, err := f.carol.ExportPublicKey(ctx, pub.Ref); err != nil {
		t.Errorf("carol exports alice's public key: %v", err)
	}
	// Carol wraps her own key under alice's public key.
	p := aesKey(t, f.carol, "carol-payload", nil)
	_, err = f.carol.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, WrappingKey: pub.Ref, Payload: p.Ref})
	wantCode(t, "carol wraps her key under alice's public key", err, "")
	// Seeing is not owning.
	wantCode(t, "carol deletes alice's public key", f.carol.DeleteKey(ctx, pub.Ref), hsm.CodePermission)
	wantCode(t, "carol changes alice's public key", f.carol.SetAttribute(ctx, pub.Ref, hsm.AttrWrap, false), hsm.CodePermission)
	// Public keys cannot be shared or unshared, even by their owner.
	err = wantCode(t, "alice shares her public key", f.alice.ShareKey(ctx, pub.Ref, "bob"), hsm.CodeInvalidInput)
	mentions(t, "share a public key", err, pub.Ref.String(), "public key")
	wantCode(t, "alice unshares her public key", f.alice.UnshareKey(ctx, pub.Ref, "bob"), hsm.CodeInvalidInput)
	sameKey(t, "after refused shares", f.alice, pub)
}

func testExtractableFixed(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	for _, start := range []bool{true, false} {
		k := aesKey(t, f.alice, "fixed", map[hsm.Attr]bool{hsm.AttrExtractable: start})
		for _, v := range []bool{!start, start} {
			err := wantCode(t, "set extractable", f.alice.SetAttribute(ctx, k.Ref, hsm.AttrExtractable, v), hsm.CodeInvalidInput)
			mentions(t, "set extractable", err, k.Ref.String(), "extractable")
		}
		sameKey(t, "after refused extractable changes", f.alice, k)
	}
}

func testUserNameCase(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	wantCode(t, "create ALICE beside alice", f.co.CreateUser(ctx, "ALICE", hsm.RoleCryptoUser, userPassword), hsm.CodeExists)
	wantCode(t, "create Erin", f.co.CreateUser(ctx, "Erin", hsm.RoleCryptoUser, userPassword), "")
	s := f.login(hsm.Credentials{User: "ALICE", Password: userPassword})
	if u := s.User(); u.Name != "alice" {
		t.Errorf("ALICE logs in as %q, want alice", u.Name)
	}
	k := aesKey(t, s, "by-ALICE", nil)
	if k.Owner != "alice" {
		t.Errorf("a key made by ALICE is owned by %q, want alice", k.Owner)
	}
	wantCode(t, "share with BOB", s.ShareKey(ctx, k.Ref, "BOB"), "")
	if got, _ := f.bob.GetKey(ctx, k.Ref); !slices.Equal(got.SharedWith, []string{"bob"}) {
		t.Errorf("shared with %v, want [bob]", got.SharedWith)
	}
	users, err := f.co.ListUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if u.Name == "Erin" || u.Name == "ALICE" {
			t.Errorf("ListUsers shows %q; user names are shown in lower case", u.Name)
		}
	}
	wantCode(t, "change the password of ERIN", f.co.ChangePassword(ctx, "ERIN", "erin-new-pass"), "")
	f.login(hsm.Credentials{User: "erin", Password: "erin-new-pass"})
	wantCode(t, "delete ERIN", f.co.DeleteUser(ctx, "ERIN"), "")
}
