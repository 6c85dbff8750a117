package node

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
	bolt "go.etcd.io/bbolt"
)

// key is a key as held in memory. A *key is never changed once it is in the
// map: a change of metadata publishes a new *key sharing the same material.
type key struct {
	info    hsm.KeyInfo // Coverage is filled in on the way out
	session uint64      // the session that owns a session key; 0 for token keys
	rev     uint64      // revision of the write that produced this version
	mat     *material
}

// material is a key's secret or public material with parsed forms cached.
type material struct {
	class hsm.Class
	der   []byte // raw secret, PKCS#8 private key, or PKIX public key

	once  sync.Once
	err   error
	block cipher.Block
	gcm   cipher.AEAD
	priv  crypto.Signer
	rsaPr *rsa.PrivateKey
	pub   crypto.PublicKey
	rsaPu *rsa.PublicKey
}

// parse fills the cached forms once; RSA private keys are parsed lazily so
// that opening a file with thousands of keys stays fast.
func (m *material) parse() error {
	m.once.Do(func() {
		switch m.class {
		case hsm.ClassSecret:
			m.block, m.err = aes.NewCipher(m.der)
			if m.err == nil {
				m.gcm, m.err = cipher.NewGCM(m.block)
			}
		case hsm.ClassPrivate:
			m.priv, m.err = wrap.ParsePKCS8(m.der)
			if m.err == nil {
				m.pub = m.priv.Public()
				m.rsaPr, _ = m.priv.(*rsa.PrivateKey)
				m.rsaPu, _ = m.pub.(*rsa.PublicKey)
			}
		case hsm.ClassPublic:
			m.pub, m.err = x509.ParsePKIXPublicKey(m.der)
			if m.err == nil {
				m.rsaPu, _ = m.pub.(*rsa.PublicKey)
			}
		default:
			m.err = fmt.Errorf("unknown key class %q", m.class)
		}
	})
	return m.err
}

// keyRecord is a token key as stored in the keys bucket.
type keyRecord struct {
	Info   hsm.KeyInfo `json:"info"`
	Sealed []byte      `json:"sealed"` // material under the storage key, AAD = handle
	Rev    uint64      `json:"rev"`
}

func refKey(r hsm.KeyRef) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(r))
	return b[:]
}

func (n *Node) decodeKeyRecord(v []byte) (*key, error) {
	var rec keyRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, err
	}
	der, err := unseal(n.storage, rec.Sealed, refKey(rec.Info.Ref))
	if err != nil {
		return nil, err
	}
	return &key{info: rec.Info, rev: rec.Rev, mat: &material{class: rec.Info.Class, der: der}}, nil
}

// getRecord reads a token key's record inside tx; nil if absent.
func getRecord(tx *bolt.Tx, ref hsm.KeyRef) (*keyRecord, error) {
	v := tx.Bucket(bktKeys).Get(refKey(ref))
	if v == nil {
		return nil, nil
	}
	var rec keyRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, txAbort{fmt.Errorf("key record %s is corrupt: %w", ref, err)}
	}
	return &rec, nil
}

// seqKey encodes s big-endian in 8 bytes (counters in meta).
func seqKey(s uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], s)
	return b[:]
}

// nextRev increments the file's revision counter inside tx.
func nextRev(tx *bolt.Tx) (uint64, error) {
	meta := tx.Bucket(bktMeta)
	var r uint64
	if v := meta.Get(metaRev); len(v) == 8 {
		r = binary.BigEndian.Uint64(v)
	}
	r++
	return r, meta.Put(metaRev, seqKey(r))
}

func keyCount(tx *bolt.Tx) int {
	if v := tx.Bucket(bktMeta).Get(metaKeyCount); len(v) == 8 {
		return int(binary.BigEndian.Uint64(v))
	}
	return 0
}

func setKeyCount(tx *bolt.Tx, c int) error {
	return tx.Bucket(bktMeta).Put(metaKeyCount, seqKey(uint64(c)))
}

// idKey is the ids-bucket key for an id: unique per owner and class, so the
// two halves of a key pair may share an id as PKCS#11 expects.
func idKey(owner string, class hsm.Class, id []byte) []byte {
	b := make([]byte, 0, len(owner)+len(class)+len(id)+2)
	b = append(b, owner...)
	b = append(b, 0)
	b = append(b, class...)
	b = append(b, 0)
	return append(b, id...)
}

// putKey stores a token key record inside tx (new or changed), keeping the
// id index and key count right. It returns the revision written.
func (n *Node) putKey(tx *bolt.Tx, info hsm.KeyInfo, der []byte, old *keyRecord) (uint64, error) {
	rev, err := nextRev(tx)
	if err != nil {
		return 0, err
	}
	info.Coverage = hsm.Coverage{}
	rec := keyRecord{Info: info, Sealed: seal(n.storage, der, refKey(info.Ref)), Rev: rev}
	v, err := json.Marshal(rec)
	if err != nil {
		return 0, err
	}
	if err := tx.Bucket(bktKeys).Put(refKey(info.Ref), v); err != nil {
		return 0, err
	}
	ids := tx.Bucket(bktIDs)
	if old != nil && len(old.Info.ID) > 0 {
		if err := ids.Delete(idKey(old.Info.Owner, old.Info.Class, old.Info.ID)); err != nil {
			return 0, err
		}
	}
	if len(info.ID) > 0 {
		if err := ids.Put(idKey(info.Owner, info.Class, info.ID), refKey(info.Ref)); err != nil {
			return 0, err
		}
	}
	if old == nil {
		if err := setKeyCount(tx, keyCount(tx)+1); err != nil {
			return 0, err
		}
	}
	return rev, nil
}

// delKey removes a token key inside tx.
func delKey(tx *bolt.Tx, rec *keyRecord) (uint64, error) {
	rev, err := nextRev(tx)
	if err != nil {
		return 0, err
	}
	if err := tx.Bucket(bktKeys).Delete(refKey(rec.Info.Ref)); err != nil {
		return 0, err
	}
	if len(rec.Info.ID) > 0 {
		if err := tx.Bucket(bktIDs).Delete(idKey(rec.Info.Owner, rec.Info.Class, rec.Info.ID)); err != nil {
			return 0, err
		}
	}
	return rev, setKeyCount(tx, keyCount(tx)-1)
}

// sealedMaterial re-reads a record's material (for updates that keep it).
func (n *Node) sealedMaterial(rec *keyRecord) ([]byte, error) {
	der, err := unseal(n.storage, rec.Sealed, refKey(rec.Info.Ref))
	if err != nil {
		return nil, txAbort{fmt.Errorf("key %s: stored material is corrupt: %w", rec.Info.Ref, err)}
	}
	return der, nil
}

// newHandle picks a random non-zero handle unused in memory and in tx.
func (n *Node) newHandle(tx *bolt.Tx) hsm.KeyRef {
	for {
		var b [8]byte
		rand.Read(b[:])
		r := hsm.KeyRef(binary.BigEndian.Uint64(b[:]))
		if r == 0 {
			continue
		}
		n.mu.RLock()
		_, inMem := n.keys[r]
		n.mu.RUnlock()
		if inMem {
			continue
		}
		if tx != nil && tx.Bucket(bktKeys).Get(refKey(r)) != nil {
			continue
		}
		return r
	}
}

// apply publishes a committed change to memory, in revision order; k == nil
// deletes ref.
func (n *Node) apply(ref hsm.KeyRef, rev uint64, k *key) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.revs[ref] >= rev {
		return // a later write already landed
	}
	n.revs[ref] = rev
	if k == nil {
		delete(n.keys, ref)
		return
	}
	k.rev = rev
	n.keys[ref] = k
}

// lookup returns the current in-memory version of a key.
func (n *Node) lookup(ref hsm.KeyRef) *key {
	n.mu.RLock()
	k := n.keys[ref]
	n.mu.RUnlock()
	return k
}

// publicInfo copies k's info for callers, with coverage of this HSM.
func (n *Node) publicInfo(info hsm.KeyInfo) hsm.KeyInfo {
	info.ID = bytes.Clone(info.ID)
	info.KCV = bytes.Clone(info.KCV)
	info.SharedWith = slices.Clone(info.SharedWith)
	if info.SharedWith == nil {
		info.SharedWith = []string{}
	}
	info.Coverage = hsm.Coverage{HSMs: []string{n.opt.ID}}
	return info
}

// attribute policy ------------------------------------------------------------

// neverByHand are attributes the HSM derives and nobody sets.
var neverByHand = map[hsm.Attr]string{
	hsm.AttrLocal:            "local is true only for keys generated inside the hsm",
	hsm.AttrNeverExtractable: "never-extractable is derived from extractable",
	hsm.AttrAlwaysSensitive:  "always-sensitive is derived from sensitive",
}

// defaultAttrs are CloudHSM's defaults for a new key of class c.
func defaultAttrs(c hsm.Class, session, local bool) hsm.Attributes {
	return hsm.Attributes{
		Token:       !session,
		Private:     true,
		Extractable: true,
		Sensitive:   c != hsm.ClassPublic,
		Local:       local,
		Modifiable:  true,
		Destroyable: true,
	}
}

// buildAttrs applies a template to the defaults. local says whether the key
// was generated inside the HSM; role is the caller's role.
func buildAttrs(op string, c hsm.Class, t hsm.Template, local bool, role hsm.Role) (hsm.Attributes, bool, error) {
	session := t.Session
	if v, ok := t.Attrs[hsm.AttrToken]; ok {
		if v && t.Session {
			return hsm.Attributes{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "the template asks for a session key and token=true; choose one")
		}
		session = !v
	}
	at := defaultAttrs(c, session, local)
	for _, a := range hsm.SortedAttrs(t.Attrs) {
		v := t.Attrs[a]
		if why, ok := neverByHand[a]; ok {
			return hsm.Attributes{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "attribute %s cannot be set in a template: %s", a, why)
		}
		if a == hsm.AttrTrusted && v && role != hsm.RoleCryptoOfficer {
			return hsm.Attributes{}, false, hsm.Errorf(hsm.CodePermission, op, 0, "only a crypto officer may set trusted; create the key, then have a crypto officer set trusted=true")
		}
		if a == hsm.AttrToken {
			continue
		}
		if !at.Set(a, v) {
			return hsm.Attributes{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "unknown attribute %q", a)
		}
	}
	if c == hsm.ClassPublic && at.Sensitive {
		return hsm.Attributes{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a public key cannot be sensitive")
	}
	// PKCS#11: always-sensitive and never-extractable hold only for keys
	// that were generated with those properties; imported keys start false.
	at.AlwaysSensitive = local && at.Sensitive
	at.NeverExtractable = local && !at.Extractable
	return at, session, nil
}

// checkSetAttribute says whether attribute a of a key may change to v by a
// caller of role role; it returns the new attributes.
func checkSetAttribute(info hsm.KeyInfo, a hsm.Attr, v bool, role hsm.Role) (hsm.Attributes, error) {
	const op = "set-attribute"
	ref := info.Ref
	cur, ok := info.Attrs.Get(a)
	if !ok {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "unknown attribute %q", a)
	}
	if why, ok := neverByHand[a]; ok {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "attribute %s of key %s cannot be set by hand: %s", a, ref, why)
	}
	if a == hsm.AttrToken {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "token cannot be changed on key %s: it is fixed when the key is made", ref)
	}
	if a == hsm.AttrExtractable {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "extractable cannot be changed on key %s: it is fixed when the key is made (as in cloudhsm); make a new key with the extractable value you need", ref)
	}
	if a == hsm.AttrPrivate {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "private cannot be changed on key %s: it is fixed when the key is made", ref)
	}
	if a == hsm.AttrTrusted {
		if role != hsm.RoleCryptoOfficer {
			return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "only a crypto officer may set trusted on key %s", ref)
		}
	} else if role == hsm.RoleCryptoOfficer {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "a crypto officer may set only trusted; the owner of key %s (%s) sets %s", ref, info.Owner, a)
	}
	if cur == v {
		return info.Attrs, nil // idempotent, even on a non-modifiable key
	}
	if !info.Attrs.Modifiable {
		return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "key %s is not modifiable (modifiable=false); make a new key with the attributes you need", ref)
	}
	switch a {
	case hsm.AttrWrapWithTrusted:
		if !v {
			return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "wrap-with-trusted can only go from false to true; key %s keeps it", ref)
		}
	case hsm.AttrModifiable:
		if v {
			return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "modifiable can only go from true to false")
		}
	case hsm.AttrSensitive:
		if !v {
			return hsm.Attributes{}, hsm.Errorf(hsm.CodePermission, op, ref, "sensitive can only go from false to true; key %s stays sensitive", ref)
		}
		if info.Class == hsm.ClassPublic {
			return hsm.Attributes{}, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "key %s is a public key, which cannot be sensitive", ref)
		}
	}
	at := info.Attrs
	at.Set(a, v)
	return at, nil
}

// key material helpers --------------------------------------------------------

// fipsRSA checks an RSA key size and exponent against FIPS policy.
func (n *Node) checkRSA(op string, bits, e int, generate bool) error {
	if generate && n.policy().FIPS && bits != 2048 && bits != 3072 && bits != 4096 {
		return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "rsa-%d is not allowed in fips mode: generate rsa-2048, rsa-3072 or rsa-4096", bits)
	}
	if n.policy().FIPS {
		if bits < 2048 || bits > 4096 || bits%8 != 0 {
			return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "rsa-%d is not allowed in fips mode: rsa keys must be 2048 to 4096 bits", bits)
		}
		if e != 65537 {
			return hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "rsa public exponent %d is not allowed in fips mode: it must be 65537", e)
		}
	} else if bits < 1024 || bits > 8192 {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "rsa-%d: the hsm supports 1024 to 8192 bits", bits)
	}
	return nil
}

func checkAESBits(op string, bits int) error {
	switch bits {
	case 128, 192, 256:
		return nil
	}
	return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "aes-%d: aes keys are 128, 192 or 256 bits", bits)
}

func curveOf(name string) (elliptic.Curve, string, bool) {
	switch name {
	case "P-256", "p-256", "secp256r1", "prime256v1":
		return elliptic.P256(), "P-256", true
	case "P-384", "p-384", "secp384r1":
		return elliptic.P384(), "P-384", true
	}
	return nil, "", false
}

// describePublic returns type, size, curve and KCV of a public key.
func (n *Node) describePublic(op string, pub crypto.PublicKey) (hsm.KeyType, int, string, []byte, error) {
	var (
		t     hsm.KeyType
		bits  int
		curve string
	)
	switch p := pub.(type) {
	case *rsa.PublicKey:
		t, bits = hsm.TypeRSA, p.N.BitLen()
		if err := n.checkRSA(op, bits, p.E, false); err != nil {
			return "", 0, "", nil, err
		}
	case *ecdsa.PublicKey:
		_, name, ok := curveOf(p.Curve.Params().Name)
		if !ok {
			return "", 0, "", nil, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "ec curve %s is not supported: use P-256 or P-384", p.Curve.Params().Name)
		}
		t, bits, curve = hsm.TypeEC, p.Curve.Params().BitSize, name
	default:
		return "", 0, "", nil, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "%T keys are not supported: use rsa or ec", pub)
	}
	kcv, err := wrap.KCVPublic(pub)
	if err != nil {
		return "", 0, "", nil, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "%v", err)
	}
	return t, bits, curve, kcv, nil
}
