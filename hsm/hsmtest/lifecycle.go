package hsmtest

import (
	"bytes"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/keymig/keymig/hsm"
)

func errorsIs(err, target error) bool { return errors.Is(err, target) }

func sha1Hash(t *testing.T) crypto.Hash {
	t.Helper()
	return crypto.SHA1
}

func testMasked(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	k := aesKey(t, f.alice, "masked", map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrEncrypt: true, hsm.AttrDecrypt: true})
	if err := f.alice.ShareKey(ctx, k.Ref, "bob"); err != nil {
		t.Fatal(err)
	}
	k, _ = f.alice.GetKey(ctx, k.Ref)
	ct, err := f.alice.Encrypt(ctx, k.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("kept"))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := f.alice.ExportMasked(ctx, k.Ref)
	if err != nil {
		t.Fatalf("owner exports a non-extractable key masked: %v", err)
	}
	if bytes.Contains(blob, []byte("masked")) {
		t.Error("the masked object shows its label in clear")
	}
	if _, err := f.co.ExportMasked(ctx, k.Ref); err != nil {
		t.Errorf("crypto officer exports masked: %v", err)
	}
	// Inserting the same key again is idempotent.
	again, err := f.co.InsertMasked(ctx, blob)
	if err != nil || again.Ref != k.Ref || !bytes.Equal(again.KCV, k.KCV) {
		t.Fatalf("insert of a key already present: %+v, %v", again, err)
	}
	// Delete, then restore from the masked object: same handle, KCV,
	// owner, shares, attributes; the data it encrypted decrypts again.
	if err := f.alice.DeleteKey(ctx, k.Ref); err != nil {
		t.Fatal(err)
	}
	back, err := f.alice.InsertMasked(ctx, blob)
	if err != nil {
		t.Fatalf("owner inserts its masked key: %v", err)
	}
	checkSameMasked(t, k, back)
	pt, err := f.bob.Decrypt(ctx, k.Ref, hsm.MechAESGCM, hsm.Params{}, ct)
	if err != nil || string(pt) != "kept" {
		t.Fatalf("sharee decrypts with the restored key: %q, %v", pt, err)
	}
	// A user who is not the owner may not insert it; tampering is detected.
	if err := f.alice.DeleteKey(ctx, k.Ref); err != nil {
		t.Fatal(err)
	}
	_, err = f.carol.InsertMasked(ctx, blob)
	wantCode(t, "another crypto user inserts alice's key", err, hsm.CodePermission)
	bad := bytes.Clone(blob)
	bad[len(bad)-5] ^= 0x80
	_, err = f.co.InsertMasked(ctx, bad)
	wantCode(t, "insert an altered masked object", err, hsm.CodeIntegrity)
	_, err = f.co.InsertMasked(ctx, []byte("garbage"))
	wantCode(t, "insert garbage", err, hsm.CodeIntegrity)
	// A backend of another lineage cannot read it.
	other, officer := h.New(t)
	login, err := other.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	defer login.Logout(ctx)
	os := full(t, login)
	_, err = os.InsertMasked(ctx, blob)
	err = wantCode(t, "insert into another lineage", err, hsm.CodeIntegrity)
	mentions(t, "foreign lineage", err, "lineage")
	if h.NewClone != nil {
		clone, cofficer := h.NewClone(t, f.b)
		clogin, err := clone.Login(ctx, cofficer)
		if err != nil {
			t.Fatal(err)
		}
		defer clogin.Logout(ctx)
		cs := full(t, clogin)
		_, err = cs.InsertMasked(ctx, blob)
		err = wantCode(t, "insert before the owner exists on the clone", err, hsm.CodeNotFound)
		mentions(t, "missing owner", err, "alice")
		for _, u := range []string{"alice", "bob"} {
			if err := cs.CreateUser(ctx, u, hsm.RoleCryptoUser, userPassword); err != nil {
				t.Fatal(err)
			}
		}
		got, err := cs.InsertMasked(ctx, blob)
		if err != nil {
			t.Fatalf("insert into a clone: %v", err)
		}
		checkSameMasked(t, k, got)
		bs, err := clone.Login(ctx, hsm.Credentials{User: "bob", Password: userPassword})
		if err != nil {
			t.Fatal(err)
		}
		defer bs.Logout(ctx)
		if pt, err := bs.Decrypt(ctx, k.Ref, hsm.MechAESGCM, hsm.Params{}, ct); err != nil || string(pt) != "kept" {
			t.Errorf("the clone's copy does not decrypt: %q, %v", pt, err)
		}
	}
}

func checkSameMasked(t *testing.T, want, got hsm.KeyInfo) {
	t.Helper()
	if got.Ref != want.Ref || !bytes.Equal(got.KCV, want.KCV) || got.Owner != want.Owner || got.Label != want.Label ||
		strings.Join(got.SharedWith, ",") != strings.Join(want.SharedWith, ",") || len(want.Attrs.Diff(got.Attrs)) > 0 {
		t.Errorf("masked round trip changed the key:\nwant %+v\ngot  %+v", want, got)
	}
}

func testSessionKeys(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	s1 := f.login(hsm.Credentials{User: "alice", Password: userPassword})
	sk, err := s1.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "ephemeral", Session: true,
		Attrs: map[hsm.Attr]bool{hsm.AttrEncrypt: true, hsm.AttrDecrypt: true, hsm.AttrWrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if sk.Attrs.Token {
		t.Error("a session key has token=true")
	}
	if _, err := s1.GetKey(ctx, sk.Ref); err != nil {
		t.Errorf("the session does not see its own session key: %v", err)
	}
	if _, err := s1.Encrypt(ctx, sk.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("x")); err != nil {
		t.Errorf("encrypt with a session key: %v", err)
	}
	p := aesKey(t, s1, "payload", nil)
	if _, err := s1.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: sk.Ref, Payload: p.Ref}); err != nil {
		t.Errorf("wrap under a session key: %v", err)
	}
	for name, s := range map[string]hsm.FullSession{"another session of alice": f.alice, "the crypto officer": f.co} {
		if _, err := s.GetKey(ctx, sk.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
			t.Errorf("%s sees the session key: %v", name, err)
		}
		keys, _ := s.ListKeys(ctx, hsm.Filter{})
		for _, k := range keys {
			if k.Ref == sk.Ref {
				t.Errorf("%s lists the session key", name)
			}
		}
	}
	if err := s1.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	s2 := f.login(hsm.Credentials{User: "alice", Password: userPassword})
	if _, err := s2.GetKey(ctx, sk.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("the session key survived logout: %v", err)
	}
	if _, err := s2.GetKey(ctx, p.Ref); err != nil {
		t.Errorf("a token key died with the session: %v", err)
	}
}

func testIDUniqueness(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	gen := func(s hsm.FullSession, id string) (hsm.KeyInfo, error) {
		return s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Label: "same-label", ID: []byte(id)}})
	}
	first, err := gen(f.alice, "id-1")
	if err != nil {
		t.Fatal(err)
	}
	_, err = gen(f.alice, "id-1")
	err = wantCode(t, "a second key with the same owner and id", err, hsm.CodeExists)
	mentions(t, "duplicate id", err, first.Ref.String())
	if _, err := gen(f.bob, "id-1"); err != nil {
		t.Errorf("another owner reuses the id: %v", err)
	}
	if _, err := gen(f.alice, "id-2"); err != nil {
		t.Errorf("same label, new id: %v", err)
	}
	// After delete, the id is free again.
	if err := f.alice.DeleteKey(ctx, first.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := gen(f.alice, "id-1"); err != nil {
		t.Errorf("reuse an id after its key was deleted: %v", err)
	}
	// The halves of a key pair may share an id (PKCS#11 convention).
	_, _, err = f.alice.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256",
		Public: hsm.Template{ID: []byte("pair")}, Private: hsm.Template{ID: []byte("pair")}})
	if err != nil {
		t.Errorf("key pair halves sharing an id: %v", err)
	}
	id := []byte("id-1")
	keys, _ := f.alice.ListKeys(ctx, hsm.Filter{ID: id})
	if len(keys) != 1 {
		t.Errorf("alice has %d keys with id %x, want 1", len(keys), id)
	}
}

func testCapacity(t *testing.T, h Harness) {
	if h.Capacity <= 0 {
		t.Skip("Harness.Capacity not set")
	}
	f := newFixture(t, h)
	ctx := ctxT(t)
	var last hsm.KeyInfo
	for i := 0; i < h.Capacity; i++ {
		last = aesKey(t, f.alice, fmt.Sprint("k", i), nil)
	}
	_, err := f.alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128})
	err = wantCode(t, "generate past capacity", err, hsm.CodeCapacity)
	mentions(t, "capacity", err, fmt.Sprint(h.Capacity))
	if hsm.IsRetryable(err) {
		t.Error("a capacity error says retrying helps")
	}
	if _, err := f.alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Session: true}}); err != nil {
		t.Errorf("session keys do not count against capacity: %v", err)
	}
	if err := f.alice.DeleteKey(ctx, last.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := f.alice.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128}); err != nil {
		t.Errorf("generate after a delete freed room: %v", err)
	}
	info, err := f.alice.Info(ctx)
	if err != nil || info.Keys != h.Capacity || info.Policy.KeyCapacity != h.Capacity {
		t.Errorf("Info: %+v, %v", info, err)
	}
}

func testConcurrent(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	kek := aesKey(t, f.alice, "kek", map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true, hsm.AttrEncrypt: true, hsm.AttrDecrypt: true})
	if err := f.alice.ShareKey(ctx, kek.Ref, "bob"); err != nil {
		t.Fatal(err)
	}
	const workers, rounds = 32, 6
	var wg sync.WaitGroup
	errs := make(chan error, workers*rounds)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			s := f.alice
			if w%2 == 1 {
				s = f.bob
			}
			for r := 0; r < rounds; r++ {
				if err := mixedOp(f, s, kek, w, r); err != nil {
					errs <- fmt.Errorf("worker %d round %d: %w", w, r, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if hsm.CodeOf(err) == hsm.CodeThrottled {
			continue // a backend may throttle; that is allowed
		}
		t.Error(err)
	}
	all, err := f.co.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[hsm.KeyRef]bool{}
	for _, k := range all {
		if seen[k.Ref] {
			t.Errorf("handle %s listed twice", k.Ref)
		}
		seen[k.Ref] = true
	}
}

// mixedOp does one round of generate, wrap, unwrap, encrypt, decrypt, share,
// set-attribute, list and delete.
func mixedOp(f *fixture, s hsm.FullSession, kek hsm.KeyInfo, w, r int) error {
	ctx := ctxT(f.t)
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: fmt.Sprint("w", w), ID: []byte(fmt.Sprint(w, "-", r))}})
	if err != nil {
		return err
	}
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: k.Ref})
	if err != nil {
		return err
	}
	u, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES})
	if err != nil {
		return err
	}
	if !bytes.Equal(u.KCV, k.KCV) {
		return fmt.Errorf("kcv changed in a round trip")
	}
	ct, err := s.Encrypt(ctx, kek.Ref, hsm.MechAESGCM, hsm.Params{}, []byte(fmt.Sprint(w, r)))
	if err != nil {
		return err
	}
	if pt, err := s.Decrypt(ctx, kek.Ref, hsm.MechAESGCM, hsm.Params{}, ct); err != nil || string(pt) != fmt.Sprint(w, r) {
		return fmt.Errorf("decrypt: %q, %v", pt, err)
	}
	if err := s.ShareKey(ctx, k.Ref, "carol"); err != nil {
		return err
	}
	if err := s.SetAttribute(ctx, k.Ref, hsm.AttrEncrypt, true); err != nil {
		return err
	}
	if _, err := s.ListKeys(ctx, hsm.Filter{Label: ptr(fmt.Sprint("w", w))}); err != nil {
		return err
	}
	got, err := s.GetKey(ctx, k.Ref)
	if err != nil {
		return err
	}
	if !got.Attrs.Encrypt || len(got.SharedWith) != 1 {
		return fmt.Errorf("key %s lost a change: %+v", k.Ref, got)
	}
	if err := s.DeleteKey(ctx, u.Ref); err != nil {
		return err
	}
	return nil
}

func ptr[T any](v T) *T { return &v }
