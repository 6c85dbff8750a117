package pkcs11

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"math/big"
	"strings"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/miekg/pkcs11"
)

// mechanisms is what a token offers, read once: C_GetMechanismList, then
// C_GetMechanismInfo for each mechanism keymig can drive, and the OAEP
// hashes the token accepts, probed with C_EncryptInit on a throwaway
// public session object (a token lists CKM_RSA_PKCS_OAEP whatever hashes
// it takes: SoftHSM 2.6 takes SHA-1 only and says CKR_ARGUMENTS_BAD to
// the others).
type mechanisms struct {
	once  sync.Once
	infos []hsm.MechanismInfo
	err   error
}

// driven are the mechanisms this backend can drive, with the CKM_ of each.
// rsa-aes (CKM_RSA_AES_KEY_WRAP) is not among them yet: a token that has
// it moves keys by session-kek, which needs only RSA-OAEP and AES-KWP.
var driven = []struct {
	m   hsm.Mechanism
	ckm uint
	ck  string
}{
	{hsm.MechAESKWP, pkcs11.CKM_AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD"},
	{hsm.MechAESKW, pkcs11.CKM_AES_KEY_WRAP, "CKM_AES_KEY_WRAP"},
	{hsm.MechRSAOAEP, pkcs11.CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP"},
	{hsm.MechAESGCM, pkcs11.CKM_AES_GCM, "CKM_AES_GCM"},
	{hsm.MechRSAPKCS, pkcs11.CKM_RSA_PKCS, "CKM_RSA_PKCS"},
}

// NativeName is the CKM_ name of a mechanism, for messages.
func NativeName(m hsm.Mechanism) string {
	for _, d := range driven {
		if d.m == m {
			return d.ck
		}
	}
	if m == hsm.MechRSAAES {
		return "CKM_RSA_AES_KEY_WRAP"
	}
	return string(m)
}

// Mechanisms lists what the token offers among the mechanisms keymig
// drives (read once per token).
func (s *Session) Mechanisms(ctx context.Context) ([]hsm.MechanismInfo, error) {
	ms := s.t.mechs
	ms.once.Do(func() { ms.infos, ms.err = s.readMechanisms(ctx) })
	return ms.infos, ms.err
}

func (s *Session) readMechanisms(ctx context.Context) ([]hsm.MechanismInfo, error) {
	api := s.t.mod.api
	list, err := api.GetMechanismList(s.t.slot)
	if err != nil {
		return nil, fmt.Errorf("token %s: listing mechanisms: %s", s.t.name, ckrName(err))
	}
	have := map[uint]bool{}
	for _, m := range list {
		have[m.Mechanism] = true
	}
	var out []hsm.MechanismInfo
	for _, d := range driven {
		if !have[d.ckm] {
			continue
		}
		mi, err := api.GetMechanismInfo(s.t.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(d.ckm, nil)})
		if err != nil {
			continue
		}
		info := hsm.MechanismInfo{Mechanism: d.m, Native: d.ck,
			Wrap: mi.Flags&pkcs11.CKF_WRAP != 0, Unwrap: mi.Flags&pkcs11.CKF_UNWRAP != 0,
			Encrypt: mi.Flags&pkcs11.CKF_ENCRYPT != 0, Decrypt: mi.Flags&pkcs11.CKF_DECRYPT != 0}
		if d.m == hsm.MechRSAOAEP {
			if info.Hashes, err = s.probeOAEP(ctx); err != nil {
				return nil, err
			}
			if len(info.Hashes) == 0 {
				continue
			}
		}
		out = append(out, info)
	}
	return out, nil
}

// probeOAEP returns the OAEP hashes (MGF1 with the same hash) the token
// accepts, by starting an encryption with each under a throwaway public
// session object.
func (s *Session) probeOAEP(ctx context.Context) ([]string, error) {
	k, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		return nil, err
	}
	api := s.t.mod.api
	var hashes []string
	err = s.t.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		h, err := api.CreateObject(sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keymig-transport-probe"),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, k.N.Bytes()), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(k.E)).Bytes()),
		})
		if err != nil {
			return err
		}
		defer api.DestroyObject(sh, h)
		for _, name := range []string{"sha1", "sha224", "sha256", "sha384", "sha512"} {
			m, free, _ := mechanismFor(hsm.MechRSAOAEP, hsm.Params{Hash: name})
			err := api.EncryptInit(sh, m, h)
			if err == nil {
				api.Encrypt(sh, []byte{0}) // ends the operation
				hashes = append(hashes, name)
			}
			free()
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("token %s: probing RSA-OAEP: %s", s.t.name, ckrName(err))
	}
	return hashes, nil
}

// oaepHash maps a hash name to its CKM_ and CKG_MGF1_.
var oaepHash = map[string][2]uint{
	"sha1":   {pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1},
	"sha224": {pkcs11.CKM_SHA224, pkcs11.CKG_MGF1_SHA224},
	"sha256": {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	"sha384": {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	"sha512": {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
}

// mechanismFor builds the PKCS#11 mechanism for m with p; free releases
// what its parameters hold.
func mechanismFor(m hsm.Mechanism, p hsm.Params) ([]*pkcs11.Mechanism, func(), error) {
	nop := func() {}
	switch m {
	case hsm.MechAESKWP:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, nop, nil
	case hsm.MechAESKW:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)}, nop, nil
	case hsm.MechRSAPKCS:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, nop, nil
	case hsm.MechRSAOAEP:
		h, mgf := hashOr(p.Hash), hashOr(p.MGF1Hash)
		if p.MGF1Hash == "" {
			mgf = h
		}
		hh, ok1 := oaepHash[h]
		mh, ok2 := oaepHash[mgf]
		if !ok1 || !ok2 {
			return nil, nop, hsm.Errorf(hsm.CodeUnsupportedMechanism, "", 0, "rsa-oaep with hash %s and MGF1 %s: want sha1, sha224, sha256, sha384 or sha512", h, mgf)
		}
		// CKZ_DATA_SPECIFIED is the only source PKCS#11 defines, label or
		// not; SoftHSM refuses any other.
		op := pkcs11.NewOAEPParams(hh[0], mh[1], pkcs11.CKZ_DATA_SPECIFIED, p.Label)
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, op)}, nop, nil
	}
	return nil, nop, hsm.Errorf(hsm.CodeUnsupportedMechanism, "", 0, "mechanism %s is not one keymig drives on a PKCS#11 token", m)
}

func hashOr(h string) string {
	if h == "" {
		return "sha256"
	}
	return strings.ToLower(h)
}

// supported checks that the token offers m (with p's OAEP hash) for what
// ok asks of it, naming the missing CKM_ when it does not.
func (s *Session) supported(ctx context.Context, op string, m hsm.Mechanism, p hsm.Params, ok func(hsm.MechanismInfo) bool) (hsm.MechanismInfo, error) {
	infos, err := s.Mechanisms(ctx)
	if err != nil {
		return hsm.MechanismInfo{}, err
	}
	for _, i := range infos {
		if i.Mechanism != m || !ok(i) {
			continue
		}
		if m == hsm.MechRSAOAEP && !i.SupportsHash(hashOr(p.Hash)) {
			return i, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "token %s takes %s only with %s, not %s", s.t.name, i.Native, strings.Join(i.Hashes, ", "), hashOr(p.Hash))
		}
		return i, nil
	}
	return hsm.MechanismInfo{}, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "token %s does not offer %s (%s) to %s with", s.t.name, NativeName(m), m, op)
}

// mechanism checks m is offered and builds it.
func (s *Session) mechanism(ctx context.Context, op string, m hsm.Mechanism, p hsm.Params, ok func(hsm.MechanismInfo) bool) ([]*pkcs11.Mechanism, func(), error) {
	if _, err := s.supported(ctx, op, m, p, ok); err != nil {
		return nil, func() {}, err
	}
	return mechanismFor(m, p)
}

// wantsClass reports whether the URI's type= lets keys of class c in.
func (u URI) wantsClass(c uint) bool {
	switch u.Type {
	case "secret-key":
		return c == pkcs11.CKO_SECRET_KEY
	case "private":
		return c == pkcs11.CKO_PRIVATE_KEY
	case "public":
		return c == pkcs11.CKO_PUBLIC_KEY
	}
	return true
}
