package pkcs11

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/miekg/pkcs11"
)

// Session is a logged-in view of a token: the hsm core (find, generate,
// wrap, unwrap, encrypt, public keys) and key deletion. A token has no
// owners, shares, masked objects or users, so Session implements none of
// Sharer, Masker or Users, nor AttributeSetter: hsm.As reports them
// unsupported. Every key on the token is the logged-in user's.
type Session struct {
	t    *Token
	once sync.Once
}

var (
	_ hsm.Session         = (*Session)(nil)
	_ hsm.KeyDeleter      = (*Session)(nil)
	_ hsm.MechanismLister = (*Session)(nil)
	_ hsm.BackendNamer    = (*Session)(nil)
)

func newSession(t *Token) *Session { return &Session{t: t} }

// UserName is the name every token session has: PKCS#11's normal user.
const UserName = "user"

// BackendName names the token in errors.
func (s *Session) BackendName() string { return s.t.Name() }

// User is the token's normal user (CKU_USER).
func (s *Session) User() hsm.User {
	return hsm.User{Name: UserName, Role: hsm.RoleCryptoUser, Coverage: hsm.Coverage{HSMs: []string{s.t.name}}}
}

// Info describes the token as a cluster of one HSM, without a region,
// lineage or key capacity (a token states none).
func (s *Session) Info(ctx context.Context) (hsm.ClusterInfo, error) {
	if err := s.load(ctx); err != nil {
		return hsm.ClusterInfo{}, err
	}
	n := 0
	for _, o := range s.t.cache.list() {
		if o.info.Attrs.Token {
			n++
		}
	}
	ti := s.t.info
	return hsm.ClusterInfo{
		ID:     "pkcs11:" + s.t.name + "/" + trim(ti.SerialNumber),
		HSMs:   []hsm.HSMInfo{{ID: s.t.name, State: "active"}},
		Policy: hsm.Policy{KeyCapacity: 1 << 30, MaxConcurrentOps: s.t.size},
		Keys:   n,
	}, nil
}

// Logout ends this session's share of the token's login; the last one
// logs out and closes the pooled sessions, which destroys every session
// object. Idempotent.
func (s *Session) Logout(ctx context.Context) error {
	s.once.Do(s.t.logout)
	return nil
}

// load finds the token's keys once (C_FindObjects for every key class the
// URI allows) and caches them.
func (s *Session) load(ctx context.Context) error {
	c := s.t.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loaded {
		return nil
	}
	var found []*object
	err := s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		for _, class := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
			if !s.t.uri.wantsClass(class) {
				continue
			}
			tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}
			if s.t.uri.Object != "" {
				tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, s.t.uri.Object))
			}
			if len(s.t.uri.ID) > 0 {
				tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, s.t.uri.ID))
			}
			hs, err := s.find(sh, tmpl)
			if err != nil {
				return err
			}
			for _, h := range hs {
				o, err := s.read(sh, h)
				if err != nil {
					return err
				}
				// This process has made no session object yet, so one that
				// says CKA_TOKEN false here is not a key: it is what a
				// module killed while creating an object leaves (SoftHSM
				// writes an object's attributes one by one), and it is
				// left out, as the module itself would have.
				if o != nil && o.info.Attrs.Token {
					found = append(found, o)
				}
			}
		}
		return nil
	})
	if err != nil {
		return s.t.fail("list keys", nil, err)
	}
	// Halves of an EC pair: the private half has no public point of its own.
	pubByID := map[string]*object{}
	for _, o := range found {
		if o.info.Class == hsm.ClassPublic && len(o.info.ID) > 0 {
			pubByID[string(o.info.ID)] = o
		}
	}
	for _, o := range found {
		if o.info.Class == hsm.ClassPrivate && len(o.info.KCV) == 0 {
			if p, ok := pubByID[string(o.info.ID)]; ok && p.info.Type == o.info.Type {
				o.info.KCV, o.pub = p.info.KCV, p.pub
			}
		}
		c.addLocked(o)
	}
	c.loaded = true
	return nil
}

// find runs one C_FindObjects search to the end.
func (s *Session) find(sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	api := s.t.mod.api
	if err := api.FindObjectsInit(sh, tmpl); err != nil {
		return nil, err
	}
	var out []pkcs11.ObjectHandle
	for {
		hs, _, err := api.FindObjects(sh, 1000)
		if err != nil {
			api.FindObjectsFinal(sh)
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		out = append(out, hs...)
	}
	return out, api.FindObjectsFinal(sh)
}

// read reads one object's attributes; nil for an object that is not a key
// keymig knows (a certificate, a DES key).
func (s *Session) read(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (*object, error) {
	a, err := s.attrs(sh, h, commonAttrs)
	if err != nil {
		return nil, err
	}
	c, typ, ok := classOf(a)
	if !ok {
		return nil, nil
	}
	more := map[hsm.Class][]uint{hsm.ClassSecret: secretAttrs, hsm.ClassPrivate: privateAttrs, hsm.ClassPublic: publicAttrs}[c]
	switch typ {
	case hsm.TypeRSA:
		more = append(append([]uint(nil), more...), rsaAttrs...)
	case hsm.TypeEC:
		more = append(append([]uint(nil), more...), ecAttrs...)
		if c == hsm.ClassPublic {
			more = append(more, ecPubAttrs...)
		}
	}
	b, err := s.attrs(sh, h, more)
	if err != nil {
		return nil, err
	}
	for k, v := range b {
		a[k] = v
	}
	info, pub := infoOf(a, s.t.name)
	o := &object{h: h, info: info, pub: pub, session: !info.Attrs.Token}
	if c == hsm.ClassSecret && typ == hsm.TypeAES {
		if len(info.KCV) == 0 && info.Attrs.Encrypt {
			o.info.KCV = s.kcvInToken(sh, h)
		}
		if (len(o.info.KCV) == 0 || o.info.Bits == 0) && info.Attrs.Extractable {
			bits, kcv := s.kcvByRoundTrip(sh, h, len(o.info.KCV) == 0)
			if o.info.Bits == 0 {
				o.info.Bits = bits
			}
			if len(o.info.KCV) == 0 && len(kcv) > 0 {
				o.info.KCV, o.info.KCVFrom = kcv, hsm.KCVRoundTrip
			}
		}
	}
	return o, nil
}

// kcvByRoundTrip finds the size and, if kcv, the check value of an
// extractable AES key for which the token keeps no CKA_VALUE_LEN or
// CKA_CHECK_VALUE and that may not encrypt (SoftHSM keeps neither for
// unwrapped keys): the key is wrapped with AES-KWP under a session KEK of
// the token's own (the blob is 8 bytes longer than the key), unwrapped
// again as a session object that may encrypt, whose KCV is computed, and
// the copy is destroyed. The key never leaves the token unwrapped. Zero
// values if the token refuses.
func (s *Session) kcvByRoundTrip(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, kcv bool) (int, hsm.Bytes) {
	api := s.t.mod.api
	kek, err := s.t.roundTripKEK(sh)
	if err != nil {
		return 0, nil
	}
	kwp := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}
	blob, err := api.WrapKey(sh, kwp, kek, h)
	if err != nil {
		return 0, nil
	}
	bits := (len(blob) - 8) * 8
	if !kcv {
		return bits, nil
	}
	cp, err := api.UnwrapKey(sh, kwp, kek, blob, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
	})
	clear(blob)
	if err != nil {
		return bits, nil
	}
	defer api.DestroyObject(sh, cp)
	return bits, s.kcvInToken(sh, cp)
}

// attrs reads the attributes ts of h, all at once, or one at a time when
// the token refuses some (then those are left out).
func (s *Session) attrs(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, ts []uint) (attrs, error) {
	api := s.t.mod.api
	q := make([]*pkcs11.Attribute, len(ts))
	for i, t := range ts {
		q[i] = pkcs11.NewAttribute(t, nil)
	}
	out := attrs{}
	got, err := api.GetAttributeValue(sh, h, q)
	if err == nil {
		for _, a := range got {
			out[a.Type] = a.Value
		}
		return out, nil
	}
	switch ckr(err) {
	// BUFFER_TOO_SMALL: a value grew between the module's two passes (an
	// object another session is still writing); one at a time re-sizes.
	case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_SENSITIVE, pkcs11.CKR_BUFFER_TOO_SMALL:
	default:
		return nil, err
	}
	for _, t := range ts {
		got, err := api.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
		if err == nil && len(got) == 1 {
			out[t] = got[0].Value
		}
	}
	return out, nil
}

// kcvInToken computes an AES key's check value inside the token, for a
// token that keeps no CKA_CHECK_VALUE: the first 3 bytes of AES-ECB of a
// zero block. nil if the token will not (then migrate verifies the key by
// a round trip).
func (s *Session) kcvInToken(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) hsm.Bytes {
	api := s.t.mod.api
	if err := api.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}, h); err != nil {
		return nil
	}
	ct, err := api.Encrypt(sh, make([]byte, 16))
	if err != nil || len(ct) < 3 {
		return nil
	}
	return hsm.Bytes(ct[:3])
}

// ListKeys returns the keys f matches, from the cache, ordered by handle.
func (s *Session) ListKeys(ctx context.Context, f hsm.Filter) ([]hsm.KeyInfo, error) {
	if err := s.load(ctx); err != nil {
		return nil, err
	}
	var out []hsm.KeyInfo
	for _, o := range s.t.cache.list() {
		if f.Match(o.info) {
			out = append(out, o.info)
		}
	}
	return out, nil
}

// GetKey returns one key by handle, from the cache.
func (s *Session) GetKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	o, err := s.object(ctx, "get key", ref)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return o.info, nil
}

func (s *Session) object(ctx context.Context, op string, ref hsm.KeyRef) (*object, error) {
	if err := s.load(ctx); err != nil {
		return nil, err
	}
	o, ok := s.t.cache.get(ref)
	if !ok {
		return nil, hsm.Errorf(hsm.CodeNotFound, op, ref, "token %s has no key %s", s.t.name, ref)
	}
	return o, nil
}

// DeleteKey destroys a key on the token (C_DestroyObject).
func (s *Session) DeleteKey(ctx context.Context, ref hsm.KeyRef) error {
	o, err := s.object(ctx, "delete", ref)
	if err != nil {
		return err
	}
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error { return s.t.mod.api.DestroyObject(sh, o.h) })
	if err != nil {
		return s.t.fail("delete", o, err)
	}
	s.t.cache.remove(ref)
	return nil
}

// created reads a new object's attributes and caches it.
func (s *Session) created(ctx context.Context, op string, h pkcs11.ObjectHandle) (hsm.KeyInfo, error) {
	if err := s.load(ctx); err != nil {
		return hsm.KeyInfo{}, err
	}
	var o *object
	err := s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		o, err = s.read(sh, h)
		return err
	})
	if err != nil {
		return hsm.KeyInfo{}, s.t.fail(op, nil, err)
	}
	if o == nil {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "token %s made an object keymig does not know", s.t.name)
	}
	s.t.cache.add(o)
	return o.info, nil
}

// ExportPublicKey returns the public half of a key pair as PEM, built from
// the modulus and exponent (or EC point) the token shows for either half.
func (s *Session) ExportPublicKey(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	o, err := s.object(ctx, "export public key", ref)
	if err != nil {
		return nil, err
	}
	if o.pub == nil {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "export public key", ref, "token %s: key %s (label %q) is not half of a key pair whose public values the token shows", s.t.name, ref, o.info.Label)
	}
	der, err := x509.MarshalPKIXPublicKey(o.pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ImportPublicKey stores a PEM RSA public key on the token (C_CreateObject).
func (s *Session) ImportPublicKey(ctx context.Context, p []byte, t hsm.Template) (hsm.KeyInfo, error) {
	blk, _ := pem.Decode(p)
	if blk == nil {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, "import public key", 0, "not a PEM public key")
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, "import public key", 0, "not a public key: %v", err)
	}
	rp, ok := pub.(*rsa.PublicKey)
	if !ok {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, "import public key", 0, "token %s: keymig imports RSA public keys only, not %T", s.t.name, pub)
	}
	// Find the token's keys first: a listing that runs while this
	// process creates objects could read them half-written.
	if err := s.load(ctx); err != nil {
		return hsm.KeyInfo{}, err
	}
	tmpl, err := template(hsm.ClassPublic, hsm.TypeRSA, t)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_MODULUS, rp.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(rp.E)).Bytes()))
	var h pkcs11.ObjectHandle
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		h, err = s.t.mod.api.CreateObject(sh, tmpl)
		return err
	})
	if err != nil {
		return hsm.KeyInfo{}, s.t.fail("import public key", nil, err)
	}
	return s.created(ctx, "import public key", h)
}

// GenerateKey makes an AES key inside the token (CKM_AES_KEY_GEN).
func (s *Session) GenerateKey(ctx context.Context, spec hsm.KeySpec) (hsm.KeyInfo, error) {
	if spec.Type != hsm.TypeAES {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, "generate", 0, "token %s: keymig generates AES secret keys, not %s", s.t.name, spec.Type)
	}
	switch spec.Bits {
	case 128, 192, 256:
	default:
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, "generate", 0, "an AES key is 128, 192 or 256 bits, not %d", spec.Bits)
	}
	// Find the token's keys first: a listing that runs while this
	// process creates objects could read them half-written.
	if err := s.load(ctx); err != nil {
		return hsm.KeyInfo{}, err
	}
	tmpl, err := template(hsm.ClassSecret, hsm.TypeAES, spec.Template)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, spec.Bits/8))
	var h pkcs11.ObjectHandle
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		h, err = s.t.mod.api.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		return err
	})
	if err != nil {
		return hsm.KeyInfo{}, s.t.fail("generate", nil, err)
	}
	return s.created(ctx, "generate", h)
}

// GenerateKeyPair makes an RSA key pair inside the token
// (CKM_RSA_PKCS_KEY_PAIR_GEN, public exponent 65537).
func (s *Session) GenerateKeyPair(ctx context.Context, spec hsm.KeyPairSpec) (pub, priv hsm.KeyInfo, err error) {
	if spec.Type != hsm.TypeRSA {
		return pub, priv, hsm.Errorf(hsm.CodeInvalidInput, "generate key pair", 0, "token %s: keymig generates RSA key pairs, not %s", s.t.name, spec.Type)
	}
	if spec.Bits < 2048 || spec.Bits > 4096 {
		return pub, priv, hsm.Errorf(hsm.CodeInvalidInput, "generate key pair", 0, "an RSA key is 2048 to 4096 bits, not %d", spec.Bits)
	}
	// Find the token's keys first: a listing that runs while this
	// process creates objects could read them half-written.
	if err := s.load(ctx); err != nil {
		return pub, priv, err
	}
	pt, err := template(hsm.ClassPublic, hsm.TypeRSA, spec.Public)
	if err != nil {
		return pub, priv, err
	}
	pt = append(pt, pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, spec.Bits), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	kt, err := template(hsm.ClassPrivate, hsm.TypeRSA, spec.Private)
	if err != nil {
		return pub, priv, err
	}
	var hp, hk pkcs11.ObjectHandle
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		hp, hk, err = s.t.mod.api.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pt, kt)
		return err
	})
	if err != nil {
		return pub, priv, s.t.fail("generate key pair", nil, err)
	}
	if pub, err = s.created(ctx, "generate key pair", hp); err != nil {
		return pub, priv, err
	}
	priv, err = s.created(ctx, "generate key pair", hk)
	return pub, priv, err
}

// WrapKey exports a key encrypted under a wrapping key (C_WrapKey). The
// payload must be extractable; keymig checks that first, so the error
// names the token and key rather than the module's CKR_.
func (s *Session) WrapKey(ctx context.Context, r hsm.WrapRequest) ([]byte, error) {
	wk, err := s.object(ctx, "wrap", r.WrappingKey)
	if err != nil {
		return nil, err
	}
	p, err := s.object(ctx, "wrap", r.Payload)
	if err != nil {
		return nil, err
	}
	if !p.info.Attrs.Extractable {
		return nil, hsm.Errorf(hsm.CodeNotExtractable, "wrap", p.info.Ref, "token %s: key %s (label %q) has CKA_EXTRACTABLE false: it cannot leave the token; nothing was wrapped", s.t.name, p.info.Ref, p.info.Label)
	}
	if !wk.info.Attrs.Wrap {
		return nil, hsm.Errorf(hsm.CodePermission, "wrap", wk.info.Ref, "token %s: key %s (label %q) has CKA_WRAP false: it cannot wrap keys", s.t.name, wk.info.Ref, wk.info.Label)
	}
	m, free, err := s.mechanism(ctx, "wrap", r.Mechanism, r.Params, func(i hsm.MechanismInfo) bool { return i.Wrap })
	if err != nil {
		return nil, err
	}
	defer free()
	var blob []byte
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		blob, err = s.t.mod.api.WrapKey(sh, m, wk.h, p.h)
		return err
	})
	if err != nil {
		return nil, s.t.fail("wrap", p, err)
	}
	return blob, nil
}

// UnwrapKey imports a wrapped key as a new object (C_UnwrapKey). Every
// failure of the unwrap itself is hsm.ErrUnwrapFailed, whatever the
// module said.
func (s *Session) UnwrapKey(ctx context.Context, r hsm.UnwrapRequest) (hsm.KeyInfo, error) {
	uk, err := s.object(ctx, "unwrap", r.UnwrappingKey)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	if !uk.info.Attrs.Unwrap {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodePermission, "unwrap", uk.info.Ref, "token %s: key %s (label %q) has CKA_UNWRAP false: it cannot unwrap keys", s.t.name, uk.info.Ref, uk.info.Label)
	}
	tmpl, err := template(r.Class, r.Type, r.Template)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	// Blobs no mechanism can produce are refused here: some modules do
	// not return from C_UnwrapKey on an empty one (SoftHSM 2.6).
	if min := map[hsm.Mechanism]int{hsm.MechAESKWP: 16, hsm.MechAESKW: 24}[r.Mechanism]; len(r.Blob) == 0 || len(r.Blob) < min || min > 0 && len(r.Blob)%8 != 0 {
		return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
	}
	m, free, err := s.mechanism(ctx, "unwrap", r.Mechanism, r.Params, func(i hsm.MechanismInfo) bool { return i.Unwrap })
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer free()
	var h pkcs11.ObjectHandle
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		h, err = s.t.mod.api.UnwrapKey(sh, m, uk.h, r.Blob, tmpl)
		return err
	})
	if err != nil {
		if brokenSession(err) {
			return hsm.KeyInfo{}, s.t.fail("unwrap", nil, err)
		}
		return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
	}
	info, err := s.created(ctx, "unwrap", h)
	if err != nil || info.Class != hsm.ClassSecret || info.Type != hsm.TypeAES || len(info.KCV) > 0 && info.Bits > 0 {
		return info, err
	}
	// A token without CKA_CHECK_VALUE for unwrapped keys (SoftHSM), and a
	// key that may neither encrypt nor leave: unwrap the same blob once
	// more as a session copy that may encrypt, take its KCV, destroy it.
	if (r.Mechanism == hsm.MechAESKWP || r.Mechanism == hsm.MechAESKW) && info.Bits == 0 && len(r.Blob) > 8 {
		info.Bits = (len(r.Blob) - 8) * 8
	}
	if len(info.KCV) == 0 {
		copyTmpl := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		}
		s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			cp, err := s.t.mod.api.UnwrapKey(sh, m, uk.h, r.Blob, copyTmpl)
			if err != nil {
				return err
			}
			defer s.t.mod.api.DestroyObject(sh, cp)
			if info.KCV = s.kcvInToken(sh, cp); len(info.KCV) > 0 {
				info.KCVFrom = hsm.KCVRoundTrip
			}
			return nil
		})
	}
	s.t.cache.update(info)
	return info, nil
}

// Encrypt encrypts with a key on the token: aes-gcm (IV from the token's
// random generator, output IV ‖ ciphertext ‖ tag) or rsa-oaep.
func (s *Session) Encrypt(ctx context.Context, key hsm.KeyRef, mech hsm.Mechanism, p hsm.Params, plaintext []byte) ([]byte, error) {
	return s.cipher(ctx, "encrypt", key, mech, p, plaintext, true)
}

// Decrypt reverses Encrypt.
func (s *Session) Decrypt(ctx context.Context, key hsm.KeyRef, mech hsm.Mechanism, p hsm.Params, ciphertext []byte) ([]byte, error) {
	return s.cipher(ctx, "decrypt", key, mech, p, ciphertext, false)
}

func (s *Session) cipher(ctx context.Context, op string, key hsm.KeyRef, mech hsm.Mechanism, p hsm.Params, in []byte, enc bool) ([]byte, error) {
	o, err := s.object(ctx, op, key)
	if err != nil {
		return nil, err
	}
	if enc && !o.info.Attrs.Encrypt || !enc && !o.info.Attrs.Decrypt {
		return nil, hsm.Errorf(hsm.CodePermission, op, key, "token %s: key %s (label %q) does not allow %s", s.t.name, key, o.info.Label, op)
	}
	if _, err := s.supported(ctx, op, mech, p, func(i hsm.MechanismInfo) bool { return enc && i.Encrypt || !enc && i.Decrypt }); err != nil {
		return nil, err
	}
	api := s.t.mod.api
	var out []byte
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		switch mech {
		case hsm.MechAESGCM:
			var iv []byte
			if enc {
				var err error
				if iv, err = api.GenerateRandom(sh, 12); err != nil {
					return err
				}
			} else {
				if len(in) < 12+16 {
					return errShort
				}
				iv, in = in[:12], in[12:]
			}
			gp := pkcs11.NewGCMParams(iv, p.AAD, 128)
			defer gp.Free()
			m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, gp)}
			if enc {
				if err := api.EncryptInit(sh, m, o.h); err != nil {
					return err
				}
				ct, err := api.Encrypt(sh, in)
				out = append(append([]byte(nil), iv...), ct...)
				return err
			}
			if err := api.DecryptInit(sh, m, o.h); err != nil {
				return err
			}
			var err error
			out, err = api.Decrypt(sh, in)
			return err
		default:
			m, free, err := mechanismFor(mech, p)
			if err != nil {
				return err
			}
			defer free()
			if enc {
				if err := api.EncryptInit(sh, m, o.h); err != nil {
					return err
				}
				out, err = api.Encrypt(sh, in)
				return err
			}
			if err := api.DecryptInit(sh, m, o.h); err != nil {
				return err
			}
			out, err = api.Decrypt(sh, in)
			return err
		}
	})
	if err != nil {
		if !enc && !brokenSession(err) {
			return nil, hsm.Errorf(hsm.CodeIntegrity, op, key, "token %s: decryption with key %s (label %q) failed: the ciphertext, the key or the parameters are wrong", s.t.name, key, o.info.Label)
		}
		return nil, s.t.fail(op, o, err)
	}
	return out, nil
}

var errShort = errors.New("ciphertext too short")

// template is the PKCS#11 template of a new key of class c and type typ:
// CloudHSM's defaults (token unless a session key, private, extractable,
// sensitive for secret and private keys, modifiable) with t's overrides.
// Attributes a class does not have in PKCS#11 (extractable on a public
// key, encrypt on a private one) and those the token sets itself (local,
// never-extractable, always-sensitive) are left out.
func template(c hsm.Class, typ hsm.KeyType, t hsm.Template) ([]*pkcs11.Attribute, error) {
	class := map[hsm.Class]uint{hsm.ClassSecret: pkcs11.CKO_SECRET_KEY, hsm.ClassPrivate: pkcs11.CKO_PRIVATE_KEY, hsm.ClassPublic: pkcs11.CKO_PUBLIC_KEY}[c]
	kt, ok := map[hsm.KeyType]uint{hsm.TypeAES: pkcs11.CKK_AES, hsm.TypeRSA: pkcs11.CKK_RSA, hsm.TypeEC: pkcs11.CKK_EC, hsm.TypeGeneric: pkcs11.CKK_GENERIC_SECRET}[typ]
	if class == 0 && c != hsm.ClassPublic || !ok {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "", 0, "a PKCS#11 token holds no %s %s key", typ, c)
	}
	token := !t.Session
	if v, ok := t.Attrs[hsm.AttrToken]; ok {
		if v && t.Session {
			return nil, hsm.Errorf(hsm.CodeInvalidInput, "", 0, "the template asks for a session key and token=true; choose one")
		}
		token = v
	}
	// Usage attributes start false, as in CloudHSM (a token's own defaults
	// vary: SoftHSM's are true).
	vals := map[hsm.Attr]bool{hsm.AttrPrivate: true, hsm.AttrModifiable: true}
	for a := range classAttr[c] {
		if _, ok := vals[a]; !ok {
			vals[a] = false
		}
	}
	if c != hsm.ClassPublic {
		vals[hsm.AttrExtractable], vals[hsm.AttrSensitive] = true, true
	}
	for a, v := range t.Attrs {
		vals[a] = v
	}
	out := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, kt),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, token),
	}
	if t.Label != "" {
		out = append(out, pkcs11.NewAttribute(pkcs11.CKA_LABEL, t.Label))
	}
	if len(t.ID) > 0 {
		out = append(out, pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(t.ID)))
	}
	for _, a := range hsm.SortedAttrs(vals) {
		v := vals[a]
		switch a {
		case hsm.AttrToken, hsm.AttrDestroyable:
			continue // token set above; CKA_DESTROYABLE is not in every token
		case hsm.AttrLocal, hsm.AttrNeverExtractable, hsm.AttrAlwaysSensitive:
			continue // the token sets these itself
		case hsm.AttrTrusted:
			if v {
				return nil, hsm.Errorf(hsm.CodePermission, "", 0, "only the token's security officer may set CKA_TRUSTED; keymig logs in as the normal user")
			}
			continue
		}
		ck, ok := classAttr[c][a]
		if !ok {
			continue // e.g. extractable on a public key: PKCS#11 has no such attribute there
		}
		out = append(out, pkcs11.NewAttribute(ck, v))
	}
	return out, nil
}

// classAttr maps the contract's attributes to PKCS#11's, per class.
var classAttr = func() map[hsm.Class]map[hsm.Attr]uint {
	common := map[hsm.Attr]uint{hsm.AttrPrivate: pkcs11.CKA_PRIVATE, hsm.AttrModifiable: pkcs11.CKA_MODIFIABLE, hsm.AttrDerive: pkcs11.CKA_DERIVE}
	with := func(m map[hsm.Attr]uint) map[hsm.Attr]uint {
		for k, v := range common {
			m[k] = v
		}
		return m
	}
	return map[hsm.Class]map[hsm.Attr]uint{
		hsm.ClassSecret: with(map[hsm.Attr]uint{hsm.AttrExtractable: pkcs11.CKA_EXTRACTABLE, hsm.AttrSensitive: pkcs11.CKA_SENSITIVE,
			hsm.AttrEncrypt: pkcs11.CKA_ENCRYPT, hsm.AttrDecrypt: pkcs11.CKA_DECRYPT, hsm.AttrWrap: pkcs11.CKA_WRAP, hsm.AttrUnwrap: pkcs11.CKA_UNWRAP,
			hsm.AttrSign: pkcs11.CKA_SIGN, hsm.AttrVerify: pkcs11.CKA_VERIFY, hsm.AttrWrapWithTrusted: pkcs11.CKA_WRAP_WITH_TRUSTED}),
		hsm.ClassPrivate: with(map[hsm.Attr]uint{hsm.AttrExtractable: pkcs11.CKA_EXTRACTABLE, hsm.AttrSensitive: pkcs11.CKA_SENSITIVE,
			hsm.AttrDecrypt: pkcs11.CKA_DECRYPT, hsm.AttrSign: pkcs11.CKA_SIGN, hsm.AttrUnwrap: pkcs11.CKA_UNWRAP, hsm.AttrWrapWithTrusted: pkcs11.CKA_WRAP_WITH_TRUSTED}),
		hsm.ClassPublic: with(map[hsm.Attr]uint{hsm.AttrEncrypt: pkcs11.CKA_ENCRYPT, hsm.AttrVerify: pkcs11.CKA_VERIFY, hsm.AttrWrap: pkcs11.CKA_WRAP}),
	}
}()

func trim(s string) string {
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}
