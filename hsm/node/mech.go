package node

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
)

func pemEncode(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func pemDecode(b []byte, typ string) ([]byte, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("no PEM block found: want \"-----BEGIN %s-----\"", typ)
	}
	if blk.Type != typ {
		return nil, fmt.Errorf("PEM block is %q, want %q", blk.Type, typ)
	}
	return blk.Bytes, nil
}

// oaepParams turns contract params into wrap's, checking hash names.
func oaepParams(op string, p hsm.Params) (wrap.OAEPParams, error) {
	var out wrap.OAEPParams
	var err error
	if p.Hash != "" {
		if out.Hash, err = wrap.ParseHash(p.Hash); err != nil {
			return out, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "%v", err)
		}
	}
	if p.MGF1Hash != "" {
		if out.MGF1Hash, err = wrap.ParseHash(p.MGF1Hash); err != nil {
			return out, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "mgf1: %v", err)
		}
	}
	out.Label = p.Label
	return out, nil
}

func rsaAESParams(op string, p hsm.Params) (wrap.RSAAESParams, error) {
	o, err := oaepParams(op, p)
	if err != nil {
		return wrap.RSAAESParams{}, err
	}
	if p.AESBits != 0 && p.AESBits != 128 && p.AESBits != 192 && p.AESBits != 256 {
		return wrap.RSAAESParams{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "rsa-aes ephemeral key of %d bits: want 128, 192 or 256", p.AESBits)
	}
	return wrap.RSAAESParams{OAEP: o, AESBits: p.AESBits}, nil
}

// checkMechanism checks that key k can serve mechanism m for op ("wrap",
// "unwrap", "encrypt" or "decrypt") and the FIPS policy.
func (n *Node) checkMechanism(op string, m hsm.Mechanism, k *key) error {
	ref := k.info.Ref
	switch m {
	case hsm.MechAESKW, hsm.MechAESKWP, hsm.MechAESGCM:
		if k.info.Class != hsm.ClassSecret || k.info.Type != hsm.TypeAES {
			return hsm.Errorf(hsm.CodeInvalidInput, op, ref, "%s needs an aes key; key %s is an %s %s", m, ref, k.info.Type, k.info.Class)
		}
	case hsm.MechRSAOAEP, hsm.MechRSAAES, hsm.MechRSAPKCS:
		if m == hsm.MechRSAPKCS && n.policy().FIPS {
			return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, ref, "rsa-pkcs (pkcs#1 v1.5) key transport is not allowed in fips mode; use rsa-oaep or rsa-aes")
		}
		want := hsm.ClassPublic
		if op == "unwrap" || op == "decrypt" {
			want = hsm.ClassPrivate
		}
		if k.info.Type != hsm.TypeRSA || k.info.Class != want {
			return hsm.Errorf(hsm.CodeInvalidInput, op, ref, "%s %ss with an rsa %s; key %s is an %s %s", m, op, want, ref, k.info.Type, k.info.Class)
		}
	default:
		return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, ref, "unknown mechanism %q: want rsa-oaep, rsa-aes, aes-kwp, aes-kw or aes-gcm", m)
	}
	if (op == "encrypt" || op == "decrypt") && m != hsm.MechAESGCM {
		return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, ref, "%s supports aes-gcm only, not %s", op, m)
	}
	if err := k.mat.parse(); err != nil {
		return hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s: stored material is unreadable: %v", ref, err)
	}
	return nil
}

func (s *session) WrapKey(ctx context.Context, r hsm.WrapRequest) ([]byte, error) {
	const op = "wrap"
	release, err := s.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	out, err := s.wrapKey(r)
	if err := s.n.audit(ctx, s.user, op, err, r.WrappingKey, r.Payload); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *session) wrapKey(r hsm.WrapRequest) ([]byte, error) {
	const op = "wrap"
	p, err := s.visible(op, r.Payload)
	if err != nil {
		return nil, err
	}
	if err := s.ownerCheck(op, "wrap", p.info); err != nil {
		return nil, err
	}
	w, err := s.usable(op, r.WrappingKey)
	if err != nil {
		return nil, err
	}
	pref, wref := p.info.Ref, w.info.Ref
	if p.info.Class == hsm.ClassPublic {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, op, pref, "key %s is a public key; export it with ExportPublicKey instead of wrapping it", pref)
	}
	if !p.info.Attrs.Extractable {
		return nil, hsm.Errorf(hsm.CodeNotExtractable, op, pref, "key %s is not extractable (extractable=false), so it cannot be wrapped; move it as a masked object to a clone, or rotate it", pref)
	}
	if !w.info.Attrs.Wrap {
		return nil, hsm.Errorf(hsm.CodePermission, op, wref, "key %s cannot wrap (wrap=false); its owner (%s) can set wrap=true if it is modifiable, or use another wrapping key", wref, w.info.Owner)
	}
	if p.info.Attrs.WrapWithTrusted && !w.info.Attrs.Trusted {
		return nil, hsm.Errorf(hsm.CodePermission, op, pref, "key %s has wrap-with-trusted=true but wrapping key %s is not trusted; have a crypto officer set trusted=true on %s", pref, wref, wref)
	}
	if err := s.n.checkMechanism(op, r.Mechanism, w); err != nil {
		return nil, err
	}
	if r.Payload == r.WrappingKey {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, op, pref, "key %s cannot wrap itself", pref)
	}
	payload := p.mat.der
	var out []byte
	switch r.Mechanism {
	case hsm.MechAESKW:
		if len(payload)%8 != 0 || len(payload) < 16 {
			return nil, hsm.Errorf(hsm.CodeInvalidInput, op, pref, "aes-kw needs a payload that is a multiple of 8 bytes (key %s is %d bytes); use aes-kwp", pref, len(payload))
		}
		out, err = wrap.KeyWrapBlock(w.mat.block, payload)
	case hsm.MechAESKWP:
		out, err = wrap.KeyWrapPadBlock(w.mat.block, payload)
	case hsm.MechAESGCM:
		iv := make([]byte, w.mat.gcm.NonceSize(), w.mat.gcm.NonceSize()+len(payload)+w.mat.gcm.Overhead())
		rand.Read(iv)
		out = w.mat.gcm.Seal(iv, iv, payload, r.Params.AAD)
	case hsm.MechRSAOAEP:
		var o wrap.OAEPParams
		if o, err = oaepParams(op, r.Params); err != nil {
			return nil, err
		}
		out, err = wrap.WrapOAEP(w.mat.rsaPu, payload, o)
		if errors.Is(err, wrap.ErrPayloadTooLarge) {
			return nil, hsm.Errorf(hsm.CodeInvalidInput, op, pref, "key %s does not fit in one rsa-oaep block of key %s: use rsa-aes (%v)", pref, wref, err)
		}
	case hsm.MechRSAAES:
		var ra wrap.RSAAESParams
		if ra, err = rsaAESParams(op, r.Params); err != nil {
			return nil, err
		}
		out, err = wrap.WrapRSAAES(w.mat.rsaPu, payload, ra)
	case hsm.MechRSAPKCS:
		out, err = rsa.EncryptPKCS1v15(rand.Reader, w.mat.rsaPu, payload)
	}
	if err != nil {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, op, pref, "wrapping key %s with %s under %s: %v", pref, r.Mechanism, wref, err)
	}
	return out, nil
}

func (s *session) UnwrapKey(ctx context.Context, r hsm.UnwrapRequest) (hsm.KeyInfo, error) {
	const op = "unwrap"
	release, err := s.begin(ctx, op)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	info, err := s.unwrapKey(ctx, r)
	if err != nil {
		return hsm.KeyInfo{}, s.settle(ctx, op, err, r.UnwrappingKey)
	}
	return info, nil
}

func (s *session) unwrapKey(ctx context.Context, r hsm.UnwrapRequest) (hsm.KeyInfo, error) {
	const op = "unwrap"
	if err := s.mustBeUser(op, "unwrap keys"); err != nil {
		return hsm.KeyInfo{}, err
	}
	u, err := s.usable(op, r.UnwrappingKey)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	uref := u.info.Ref
	if !u.info.Attrs.Unwrap {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodePermission, op, uref, "key %s cannot unwrap (unwrap=false); its owner (%s) can set unwrap=true if it is modifiable, or use another key", uref, u.info.Owner)
	}
	if err := s.n.checkMechanism(op, r.Mechanism, u); err != nil {
		return hsm.KeyInfo{}, err
	}
	class, typ := r.Class, r.Type
	switch class {
	case hsm.ClassSecret:
		if typ == "" {
			typ = hsm.TypeAES
		}
		if typ != hsm.TypeAES {
			return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "secret keys of type %q are not supported: this hsm holds aes secret keys", typ)
		}
	case hsm.ClassPrivate:
		if typ != hsm.TypeRSA && typ != hsm.TypeEC {
			return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a private key to unwrap must be of type rsa or ec, not %q", typ)
		}
	case hsm.ClassPublic:
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "public keys are imported with ImportPublicKey, not unwrapped")
	default:
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "unwrap needs the class of the wrapped key: secret-key or private-key")
	}
	// Validate the template before touching the blob.
	if _, _, err := buildAttrs(op, class, r.Template, false, s.role); err != nil {
		return hsm.KeyInfo{}, err
	}
	var der []byte
	switch r.Mechanism {
	case hsm.MechAESKW:
		der, err = wrap.KeyUnwrapBlock(u.mat.block, r.Blob)
	case hsm.MechAESKWP:
		der, err = wrap.KeyUnwrapPadBlock(u.mat.block, r.Blob)
	case hsm.MechAESGCM:
		g := u.mat.gcm
		if len(r.Blob) < g.NonceSize()+g.Overhead() {
			err = hsm.ErrUnwrapFailed
		} else {
			der, err = g.Open(nil, r.Blob[:g.NonceSize()], r.Blob[g.NonceSize():], r.Params.AAD)
		}
	case hsm.MechRSAOAEP:
		var o wrap.OAEPParams
		if o, err = oaepParams(op, r.Params); err != nil {
			return hsm.KeyInfo{}, err
		}
		der, err = wrap.UnwrapOAEP(u.mat.rsaPr, r.Blob, o)
	case hsm.MechRSAAES:
		var ra wrap.RSAAESParams
		if ra, err = rsaAESParams(op, r.Params); err != nil {
			return hsm.KeyInfo{}, err
		}
		der, err = wrap.UnwrapRSAAES(u.mat.rsaPr, r.Blob, ra)
	case hsm.MechRSAPKCS:
		der, err = rsa.DecryptPKCS1v15(nil, u.mat.rsaPr, r.Blob)
	}
	if err != nil {
		return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
	}
	// The key inside must be what the caller said it is; a mismatch is an
	// unwrap failure too, so that no oracle tells what decrypted.
	var (
		info    hsm.KeyInfo
		session bool
		mat     *material
	)
	switch class {
	case hsm.ClassSecret:
		if err := checkAESBits(op, len(der)*8); err != nil {
			return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
		}
		kcv, _ := wrap.KCVSecret(der)
		if info, session, err = s.baseInfo(op, class, hsm.TypeAES, len(der)*8, "", kcv, r.Template, false); err != nil {
			return hsm.KeyInfo{}, err
		}
		mat = &material{class: class, der: der}
	case hsm.ClassPrivate:
		priv, err := wrap.ParsePKCS8(der)
		if err != nil {
			return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
		}
		t, bits, curve, kcv, err := s.n.describePublic(op, priv.Public())
		if err != nil {
			return hsm.KeyInfo{}, err
		}
		if t != typ {
			return hsm.KeyInfo{}, hsm.ErrUnwrapFailed
		}
		if info, session, err = s.baseInfo(op, class, t, bits, curve, kcv, r.Template, false); err != nil {
			return hsm.KeyInfo{}, err
		}
		mat = &material{class: class, der: der}
		if rk, ok := priv.(*rsa.PrivateKey); ok {
			rk.Precompute()
		}
		mat.once.Do(func() { // already parsed: fill the cache now
			mat.priv = priv
			mat.pub = priv.Public()
			mat.rsaPr, _ = priv.(*rsa.PrivateKey)
			mat.rsaPu, _ = mat.pub.(*rsa.PublicKey)
		})
	}
	out, err := s.create(ctx, op, []newKey{{info: info, der: der, mat: mat, session: session}}, r.UnwrappingKey)
	if err != nil {
		return hsm.KeyInfo{}, storedErr{err}
	}
	return out[0], nil
}

func (s *session) Encrypt(ctx context.Context, ref hsm.KeyRef, m hsm.Mechanism, p hsm.Params, plaintext []byte) ([]byte, error) {
	const op = "encrypt"
	release, err := s.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	out, err := s.encrypt(ref, m, p, plaintext)
	if err := s.n.audit(ctx, s.user, op, err, ref); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *session) encrypt(ref hsm.KeyRef, m hsm.Mechanism, p hsm.Params, plaintext []byte) ([]byte, error) {
	const op = "encrypt"
	k, err := s.usable(op, ref)
	if err != nil {
		return nil, err
	}
	if !k.info.Attrs.Encrypt {
		return nil, hsm.Errorf(hsm.CodePermission, op, ref, "key %s cannot encrypt (encrypt=false); its owner (%s) can set encrypt=true if it is modifiable", ref, k.info.Owner)
	}
	if err := s.n.checkMechanism(op, m, k); err != nil {
		return nil, err
	}
	g := k.mat.gcm
	iv := make([]byte, g.NonceSize(), g.NonceSize()+len(plaintext)+g.Overhead())
	rand.Read(iv)
	return g.Seal(iv, iv, plaintext, p.AAD), nil
}

func (s *session) Decrypt(ctx context.Context, ref hsm.KeyRef, m hsm.Mechanism, p hsm.Params, ciphertext []byte) ([]byte, error) {
	const op = "decrypt"
	release, err := s.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	out, err := s.decrypt(ref, m, p, ciphertext)
	if err := s.n.audit(ctx, s.user, op, err, ref); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *session) decrypt(ref hsm.KeyRef, m hsm.Mechanism, p hsm.Params, ciphertext []byte) ([]byte, error) {
	const op = "decrypt"
	k, err := s.usable(op, ref)
	if err != nil {
		return nil, err
	}
	if !k.info.Attrs.Decrypt {
		return nil, hsm.Errorf(hsm.CodePermission, op, ref, "key %s cannot decrypt (decrypt=false); its owner (%s) can set decrypt=true if it is modifiable", ref, k.info.Owner)
	}
	if err := s.n.checkMechanism(op, m, k); err != nil {
		return nil, err
	}
	g := k.mat.gcm
	fail := hsm.Errorf(hsm.CodeIntegrity, op, ref, "decryption with key %s failed: the ciphertext, the key or the aad is wrong", ref)
	if len(ciphertext) < g.NonceSize()+g.Overhead() {
		return nil, fail
	}
	out, err := g.Open(nil, ciphertext[:g.NonceSize()], ciphertext[g.NonceSize():], p.AAD)
	if err != nil {
		return nil, fail
	}
	return out, nil
}
