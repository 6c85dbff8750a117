package pkcs11

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
	"math/big"
	"sort"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
	"github.com/miekg/pkcs11"
)

// object is a key on the token as found once: its handle in this process
// and what keymig knows of it.
type object struct {
	h       pkcs11.ObjectHandle
	info    hsm.KeyInfo
	pub     any      // *rsa.PublicKey or *ecdsa.PublicKey of a key pair half, if readable
	session bool     // a session object: gone when its session closes
	owner   *Session // the hsm session that made a session object
}

// keyCache is the token's keys, found once with C_FindObjects and then
// kept up to date by this process's own creates and deletes. Keys made on
// the token by another program during a run are not seen.
type keyCache struct {
	mu     sync.Mutex
	loaded bool
	byRef  map[hsm.KeyRef]*object
}

func newKeyCache() *keyCache { return &keyCache{byRef: map[hsm.KeyRef]*object{}} }

// add files o under a ref derived from its identity (see refFor).
func (c *keyCache) add(o *object) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.addLocked(o)
}

func (c *keyCache) addLocked(o *object) {
	for n := 0; ; n++ {
		ref := refFor(o.info.Class, o.info.ID, o.info.Label, o.info.KCV, n)
		if prev, ok := c.byRef[ref]; !ok || prev.h == o.h {
			o.info.Ref = ref
			c.byRef[ref] = o
			return
		}
	}
}

func (c *keyCache) get(ref hsm.KeyRef) (*object, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o, ok := c.byRef[ref]
	return o, ok
}

// update replaces the cached description of info.Ref.
func (c *keyCache) update(info hsm.KeyInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if o, ok := c.byRef[info.Ref]; ok {
		o.info = info
	}
}

func (c *keyCache) remove(ref hsm.KeyRef) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.byRef, ref)
}

// list returns every cached key, ordered by handle.
func (c *keyCache) list() []*object {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*object, 0, len(c.byRef))
	for _, o := range c.byRef {
		out = append(out, o)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].info.Ref < out[j].info.Ref })
	return out
}

// dropSessionObjects forgets the session objects, gone with their sessions.
func (c *keyCache) dropSessionObjects() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for r, o := range c.byRef {
		if o.session {
			delete(c.byRef, r)
		}
	}
}

// refFor derives a key's stable 64-bit handle from what identifies it on
// the token: its class and CKA_ID, or, for a key without an id, its label.
// PKCS#11 object handles are valid only inside one process, so they cannot
// be the contract's handles, which plans and journals keep across runs.
// Keys that share class and id (or label) are told apart by check value,
// then by the order found (n): only such duplicates can change handle
// between runs, and plan refuses to move them.
func refFor(class hsm.Class, id []byte, label string, kcv []byte, n int) hsm.KeyRef {
	h := sha256.New()
	h.Write([]byte("keymig/pkcs11/v1\x00"))
	h.Write([]byte(class))
	if len(id) > 0 {
		h.Write([]byte("\x00id\x00"))
		h.Write(id)
	} else {
		h.Write([]byte("\x00label\x00"))
		h.Write([]byte(label))
	}
	if n > 0 {
		h.Write([]byte("\x00kcv\x00"))
		h.Write(kcv)
		if n > 1 {
			binary.Write(h, binary.BigEndian, uint32(n))
		}
	}
	v := binary.BigEndian.Uint64(h.Sum(nil)[:8]) >> 1 // positive, so it prints the same as CloudHSM's
	if v == 0 {
		v = 1
	}
	return hsm.KeyRef(v)
}

// attribute lists read per class. GetAttributeValue fails as a whole if
// any asked attribute is not one of the object's, so each class asks for
// its own; a token that still refuses one is asked one attribute at a time.
var (
	commonAttrs = []uint{pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE, pkcs11.CKA_LABEL, pkcs11.CKA_ID, pkcs11.CKA_TOKEN,
		pkcs11.CKA_PRIVATE, pkcs11.CKA_MODIFIABLE, pkcs11.CKA_LOCAL, pkcs11.CKA_DERIVE}
	secretAttrs = []uint{pkcs11.CKA_VALUE_LEN, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE,
		pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP,
		pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_TRUSTED, pkcs11.CKA_WRAP_WITH_TRUSTED, pkcs11.CKA_CHECK_VALUE}
	privateAttrs = []uint{pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_ALWAYS_SENSITIVE,
		pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_UNWRAP, pkcs11.CKA_WRAP_WITH_TRUSTED}
	publicAttrs = []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_VERIFY, pkcs11.CKA_WRAP, pkcs11.CKA_TRUSTED}
	rsaAttrs    = []uint{pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT}
	ecAttrs     = []uint{pkcs11.CKA_EC_PARAMS}
	ecPubAttrs  = []uint{pkcs11.CKA_EC_POINT}
)

// attrs is one object's attribute values by type.
type attrs map[uint][]byte

func (a attrs) bool(t uint) bool { v := a[t]; return len(v) > 0 && v[0] != 0 }

func (a attrs) ulong(t uint) uint64 {
	v := a[t]
	var n uint64
	// CK_ULONG in host byte order: little-endian on the hosts keymig runs on.
	for i := len(v) - 1; i >= 0; i-- {
		n = n<<8 | uint64(v[i])
	}
	return n
}

// classOf maps CKO_/CKK_ to the contract's class and type.
func classOf(a attrs) (hsm.Class, hsm.KeyType, bool) {
	var c hsm.Class
	switch a.ulong(pkcs11.CKA_CLASS) {
	case pkcs11.CKO_SECRET_KEY:
		c = hsm.ClassSecret
	case pkcs11.CKO_PRIVATE_KEY:
		c = hsm.ClassPrivate
	case pkcs11.CKO_PUBLIC_KEY:
		c = hsm.ClassPublic
	default:
		return "", "", false
	}
	switch a.ulong(pkcs11.CKA_KEY_TYPE) {
	case pkcs11.CKK_AES:
		return c, hsm.TypeAES, true
	case pkcs11.CKK_RSA:
		return c, hsm.TypeRSA, true
	case pkcs11.CKK_EC:
		return c, hsm.TypeEC, true
	case pkcs11.CKK_GENERIC_SECRET:
		return c, hsm.TypeGeneric, true
	}
	return c, "", false
}

// infoOf builds a key's description from its attributes. The KCV is
// CKA_CHECK_VALUE for a secret key, when the token keeps it, and for a
// key pair half the SHA-1 of its public key, computed here from the
// public values (which are not secret).
func infoOf(a attrs, token string) (hsm.KeyInfo, any) {
	c, typ, _ := classOf(a)
	k := hsm.KeyInfo{
		Label: string(a[pkcs11.CKA_LABEL]), ID: hsm.Bytes(a[pkcs11.CKA_ID]), Class: c, Type: typ,
		Owner: UserName, Coverage: hsm.Coverage{HSMs: []string{token}},
	}
	if len(k.ID) == 0 {
		k.ID = nil
	}
	k.Attrs = hsm.Attributes{
		Token: a.bool(pkcs11.CKA_TOKEN), Private: a.bool(pkcs11.CKA_PRIVATE), Modifiable: a.bool(pkcs11.CKA_MODIFIABLE),
		Local: a.bool(pkcs11.CKA_LOCAL), Derive: a.bool(pkcs11.CKA_DERIVE), Destroyable: true,
		Extractable: a.bool(pkcs11.CKA_EXTRACTABLE), Sensitive: a.bool(pkcs11.CKA_SENSITIVE),
		NeverExtractable: a.bool(pkcs11.CKA_NEVER_EXTRACTABLE), AlwaysSensitive: a.bool(pkcs11.CKA_ALWAYS_SENSITIVE),
		Encrypt: a.bool(pkcs11.CKA_ENCRYPT), Decrypt: a.bool(pkcs11.CKA_DECRYPT), Wrap: a.bool(pkcs11.CKA_WRAP),
		Unwrap: a.bool(pkcs11.CKA_UNWRAP), Sign: a.bool(pkcs11.CKA_SIGN), Verify: a.bool(pkcs11.CKA_VERIFY),
		Trusted: a.bool(pkcs11.CKA_TRUSTED), WrapWithTrusted: a.bool(pkcs11.CKA_WRAP_WITH_TRUSTED),
	}
	if c == hsm.ClassPublic {
		k.Attrs.Extractable = true // a public key is never secret
	}
	var pub any
	switch typ {
	case hsm.TypeAES, hsm.TypeGeneric:
		k.Bits = int(a.ulong(pkcs11.CKA_VALUE_LEN)) * 8
		if cv := a[pkcs11.CKA_CHECK_VALUE]; len(cv) >= 3 && typ == hsm.TypeAES {
			k.KCV = hsm.Bytes(append([]byte(nil), cv[:3]...))
		}
	case hsm.TypeRSA:
		if n, e := a[pkcs11.CKA_MODULUS], a[pkcs11.CKA_PUBLIC_EXPONENT]; len(n) > 0 && len(e) > 0 {
			p := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
			k.Bits = p.N.BitLen()
			if kcv, err := wrap.KCVPublic(p); err == nil {
				k.KCV = kcv
			}
			pub = p
		}
	case hsm.TypeEC:
		curve, name := curveOf(a[pkcs11.CKA_EC_PARAMS])
		k.Curve = name
		if curve != nil {
			k.Bits = curve.Params().BitSize
			if p := ecPoint(curve, a[pkcs11.CKA_EC_POINT]); p != nil {
				if kcv, err := wrap.KCVPublic(p); err == nil {
					k.KCV = kcv
				}
				pub = p
			}
		}
	}
	return k, pub
}

var (
	oidP256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384 = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
)

func curveOf(params []byte) (elliptic.Curve, string) {
	var oid asn1.ObjectIdentifier
	if _, err := asn1.Unmarshal(params, &oid); err != nil {
		return nil, ""
	}
	switch {
	case oid.Equal(oidP256):
		return elliptic.P256(), "P-256"
	case oid.Equal(oidP384):
		return elliptic.P384(), "P-384"
	}
	return nil, oid.String()
}

// ecPoint decodes CKA_EC_POINT: a DER OCTET STRING holding the point.
func ecPoint(curve elliptic.Curve, v []byte) *ecdsa.PublicKey {
	if len(v) == 0 {
		return nil
	}
	var raw []byte
	if _, err := asn1.Unmarshal(v, &raw); err != nil {
		raw = v
	}
	p, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
	if err != nil {
		return nil
	}
	return p
}
