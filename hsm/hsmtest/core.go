package hsmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// CoreHarness tells RunCore how to make the backend under test.
type CoreHarness struct {
	// New returns a fresh, empty backend and the credentials of a user
	// who may make and use keys there. Cleanup is registered with t.Cleanup.
	New func(t *testing.T) (b hsm.Backend, user hsm.Credentials)
}

// RunCore runs the checks of the hsm core that every backend has, a
// PKCS#11 token as much as the included cluster: keys made, listed and
// found by handle; wrap and unwrap round trips with every mechanism the
// backend offers (hsm.MechanismLister), check values kept; one error for
// every unwrap failure; public keys out and in; session keys gone at
// logout; concurrent use. The CloudHSM behaviour that needs users, owners,
// shares or masked objects is Run's, which skips a backend without them.
func RunCore(t *testing.T, h CoreHarness) {
	if h.New == nil {
		t.Fatal("hsmtest: CoreHarness.New is nil")
	}
	t.Run("Keys", func(t *testing.T) { testCoreKeys(t, h) })
	t.Run("RoundTrips", func(t *testing.T) { testCoreRoundTrips(t, h) })
	t.Run("UnwrapFailures", func(t *testing.T) { testCoreUnwrapFailures(t, h) })
	t.Run("SessionKeys", func(t *testing.T) { testCoreSessionKeys(t, h) })
	t.Run("Concurrent", func(t *testing.T) { testCoreConcurrent(t, h) })
	t.Run("Capabilities", func(t *testing.T) { testCoreCapabilities(t, h) })
}

func coreLogin(t *testing.T, h CoreHarness) (hsm.Backend, hsm.Credentials, hsm.Session) {
	t.Helper()
	b, c := h.New(t)
	s, err := b.Login(ctxT(t), c)
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	t.Cleanup(func() { s.Logout(context.Background()) })
	return b, c, s
}

// offers reports whether s offers m for wrap and unwrap (with hash h for
// rsa-oaep), and the hash to use.
func offers(t *testing.T, s hsm.Session, m hsm.Mechanism) (hsm.Params, bool) {
	ml, ok := s.(hsm.MechanismLister)
	if !ok {
		return hsm.Params{}, true
	}
	infos, err := ml.Mechanisms(ctxT(t))
	if err != nil {
		t.Fatalf("mechanisms: %v", err)
	}
	for _, i := range infos {
		if i.Mechanism == m && i.Wrap && i.Unwrap {
			if m == hsm.MechRSAOAEP && !i.SupportsHash("sha256") {
				return hsm.Params{Hash: i.Hashes[len(i.Hashes)-1]}, true
			}
			return hsm.Params{}, true
		}
	}
	return hsm.Params{}, false
}

func coreAES(t *testing.T, s hsm.Session, label string, id []byte, bits int, attrs map[hsm.Attr]bool) hsm.KeyInfo {
	t.Helper()
	k, err := s.GenerateKey(ctxT(t), hsm.KeySpec{Type: hsm.TypeAES, Bits: bits, Template: hsm.Template{Label: label, ID: id, Attrs: attrs}})
	if err != nil {
		t.Fatalf("generate aes-%d %q: %v", bits, label, err)
	}
	return k
}

func testCoreKeys(t *testing.T, h CoreHarness) {
	_, _, s := coreLogin(t, h)
	ctx := ctxT(t)
	var made []hsm.KeyInfo
	for i, bits := range []int{128, 192, 256} {
		k := coreAES(t, s, fmt.Sprint("core-", bits), []byte{0xc0, byte(i)}, bits, map[hsm.Attr]bool{hsm.AttrEncrypt: true})
		if k.Ref == 0 || k.Class != hsm.ClassSecret || k.Type != hsm.TypeAES || k.Bits != bits || len(k.KCV) != 3 || !k.Attrs.Token || !k.Attrs.Encrypt || k.Attrs.Wrap {
			t.Errorf("aes-%d key: %+v", bits, k)
		}
		made = append(made, k)
	}
	keys, err := s.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) < len(made) || !slices.IsSortedFunc(keys, func(a, b hsm.KeyInfo) int { return int(a.Ref>>1) - int(b.Ref>>1) }) {
		t.Errorf("list: %d keys, want ≥ %d ordered by handle", len(keys), len(made))
	}
	for _, k := range made {
		got, err := s.GetKey(ctx, k.Ref)
		if err != nil || got.Ref != k.Ref || !bytes.Equal(got.KCV, k.KCV) || got.Label != k.Label {
			t.Errorf("get %s: %+v, %v", k.Ref, got, err)
		}
	}
	if byID, _ := s.ListKeys(ctx, hsm.Filter{ID: []byte{0xc0, 1}}); len(byID) != 1 || byID[0].Ref != made[1].Ref {
		t.Errorf("list by id: %+v", byID)
	}
	_, err = s.GetKey(ctx, made[0].Ref^0x5a5a)
	wantCode(t, "get of a key that is not there", err, hsm.CodeNotFound)
}

func testCoreRoundTrips(t *testing.T, h CoreHarness) {
	_, _, s := coreLogin(t, h)
	ctx := ctxT(t)
	kek := coreAES(t, s, "core-kek", nil, 256, map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true})
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048,
		Public:  hsm.Template{Label: "core-rsa", ID: []byte("rsa"), Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}},
		Private: hsm.Template{Label: "core-rsa", ID: []byte("rsa"), Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(pub.KCV) != 3 || !bytes.Equal(pub.KCV, priv.KCV) || pub.Bits != 2048 {
		t.Errorf("key pair halves: %+v / %+v", pub, priv)
	}
	payload := coreAES(t, s, "core-payload", []byte("p"), 256, nil)
	n := 0
	rt := func(m hsm.Mechanism, p hsm.Params, wk, uk, k hsm.KeyInfo) {
		t.Helper()
		blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: m, Params: p, WrappingKey: wk.Ref, Payload: k.Ref})
		if err != nil {
			t.Fatalf("%s wrap of %s: %v", m, k.Ref, err)
		}
		n++
		id := []byte(fmt.Sprint("core-rt-", n))
		got, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: m, Params: p, UnwrappingKey: uk.Ref, Blob: blob, Class: k.Class, Type: k.Type,
			Template: hsm.Template{Label: "core-unwrapped", ID: id, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false}}})
		if err != nil {
			t.Fatalf("%s unwrap of %s: %v", m, k.Ref, err)
		}
		if !bytes.Equal(got.KCV, k.KCV) || got.Label != "core-unwrapped" || !bytes.Equal(got.ID, id) || got.Attrs.Extractable || got.Attrs.Local || got.Ref == k.Ref {
			t.Errorf("%s round trip of %s (kcv %s): got %+v", m, k.Ref, k.KCV, got)
		}
	}
	ran := 0
	for _, m := range []hsm.Mechanism{hsm.MechAESKWP, hsm.MechAESKW} {
		if p, ok := offers(t, s, m); ok {
			rt(m, p, kek, kek, payload)
			ran++
		} else {
			t.Logf("%s skips %s: not offered", hsm.BackendName(s), m)
		}
	}
	if p, ok := offers(t, s, hsm.MechAESKWP); ok {
		rt(hsm.MechAESKWP, p, kek, kek, priv) // a private key under KWP, as PKCS#8
	}
	if p, ok := offers(t, s, hsm.MechRSAOAEP); ok {
		rt(hsm.MechRSAOAEP, p, pub, priv, payload)
		ran++
	}
	if ran == 0 {
		t.Skipf("%s offers none of aes-kwp, aes-kw, rsa-oaep", hsm.BackendName(s))
	}
	// Public keys out and in: the same check value.
	pem, err := s.ExportPublicKey(ctx, priv.Ref)
	if err != nil {
		t.Fatal(err)
	}
	imp, err := s.ImportPublicKey(ctx, pem, hsm.Template{Label: "core-imported", ID: []byte("imp"), Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}})
	if err != nil {
		t.Fatal(err)
	}
	if imp.Class != hsm.ClassPublic || !bytes.Equal(imp.KCV, pub.KCV) {
		t.Errorf("imported public key: %+v, want kcv %s", imp, pub.KCV)
	}
}

func testCoreUnwrapFailures(t *testing.T, h CoreHarness) {
	_, _, s := coreLogin(t, h)
	ctx := ctxT(t)
	p, ok := offers(t, s, hsm.MechAESKWP)
	if !ok {
		t.Skipf("%s does not offer aes-kwp", hsm.BackendName(s))
	}
	kek := coreAES(t, s, "core-kek", nil, 256, map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true})
	other := coreAES(t, s, "core-other", nil, 256, map[hsm.Attr]bool{hsm.AttrUnwrap: true})
	payload := coreAES(t, s, "core-payload", nil, 256, nil)
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, Params: p, WrappingKey: kek.Ref, Payload: payload.Ref})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := s.ListKeys(ctx, hsm.Filter{})
	flipped := bytes.Clone(blob)
	flipped[3] ^= 1
	for name, c := range map[string]struct {
		uk   hsm.KeyRef
		blob []byte
	}{
		"flipped byte": {kek.Ref, flipped}, "wrong key": {other.Ref, blob},
		"truncated": {kek.Ref, blob[:len(blob)-8]}, "empty": {kek.Ref, nil},
	} {
		_, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, Params: p, UnwrappingKey: c.uk, Blob: c.blob, Class: hsm.ClassSecret, Type: hsm.TypeAES})
		if !errors.Is(err, hsm.ErrUnwrapFailed) || err.Error() != hsm.ErrUnwrapFailed.Error() {
			t.Errorf("%s: error %v, want exactly hsm.ErrUnwrapFailed", name, err)
		}
	}
	if after, _ := s.ListKeys(ctx, hsm.Filter{}); len(after) != len(before) {
		t.Errorf("failed unwraps left keys behind: %d keys, were %d", len(after), len(before))
	}
	// A key that may not leave is refused with not-extractable.
	stuck := coreAES(t, s, "core-stuck", nil, 256, map[hsm.Attr]bool{hsm.AttrExtractable: false})
	_, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, Params: p, WrappingKey: kek.Ref, Payload: stuck.Ref})
	wantCode(t, "wrap of a non-extractable key", err, hsm.CodeNotExtractable)
}

func testCoreSessionKeys(t *testing.T, h CoreHarness) {
	b, c, s := coreLogin(t, h)
	ctx := ctxT(t)
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "core-session", Session: true}})
	if err != nil {
		t.Fatal(err)
	}
	if k.Attrs.Token {
		t.Errorf("session key has token=true: %+v", k)
	}
	if err := s.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Logout(ctx); err != nil {
		t.Errorf("second logout: %v", err)
	}
	s2, err := b.Login(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Logout(context.Background())
	_, err = s2.GetKey(ctx, k.Ref)
	wantCode(t, "a session key after its session's logout", err, hsm.CodeNotFound)
}

func testCoreConcurrent(t *testing.T, h CoreHarness) {
	_, _, s := coreLogin(t, h)
	ctx := ctxT(t)
	p, ok := offers(t, s, hsm.MechAESKWP)
	if !ok {
		t.Skipf("%s does not offer aes-kwp", hsm.BackendName(s))
	}
	kek := coreAES(t, s, "core-kek", nil, 256, map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true})
	const n = 24
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Label: "core-conc", ID: []byte{0xcc, byte(i)}}})
			if err != nil {
				errs <- err
				return
			}
			blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, Params: p, WrappingKey: kek.Ref, Payload: k.Ref})
			if err != nil {
				errs <- err
				return
			}
			got, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, Params: p, UnwrappingKey: kek.Ref, Blob: blob,
				Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "core-conc-copy", ID: []byte{0xcd, byte(i)}}})
			if err == nil && !bytes.Equal(got.KCV, k.KCV) {
				err = fmt.Errorf("copy of %s has kcv %s, want %s", k.Ref, got.KCV, k.KCV)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	copyLabel := "core-conc-copy"
	keys, _ := s.ListKeys(ctx, hsm.Filter{Label: &copyLabel})
	if len(keys) != n {
		t.Errorf("%d copies listed, want %d", len(keys), n)
	}
}

// testCoreCapabilities: what a backend lacks is reported unsupported by
// hsm.As, with an error naming the backend.
func testCoreCapabilities(t *testing.T, h CoreHarness) {
	_, _, s := coreLogin(t, h)
	caps := hsm.CapabilitiesOf(s)
	if !caps.Share {
		_, err := hsm.As[hsm.Sharer](s, "share keys")
		wantCode(t, "As[Sharer] of a backend without shares", err, hsm.CodeUnsupported)
		mentions(t, "As[Sharer]", err, hsm.BackendName(s), "share keys")
	}
	if !caps.Masked {
		_, err := hsm.As[hsm.Masker](s, "export masked objects")
		wantCode(t, "As[Masker] of a backend without masked objects", err, hsm.CodeUnsupported)
	}
	if !caps.Users {
		_, err := hsm.As[hsm.Users](s, "manage users")
		wantCode(t, "As[Users] of a backend without users", err, hsm.CodeUnsupported)
	}
}
