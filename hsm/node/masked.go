package node

import (
	"bytes"
	"context"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
	bolt "go.etcd.io/bbolt"
)

// Masked object format, version 1. Every length is checked against the
// bytes that remain, and every field against a maximum:
//
//	header   = "KMMO" | version u8 (=1) | lineage-len u16 | lineage
//	blob     = header | nonce (12) | AES-256-GCM(masking key, payload, AAD = header)
//	payload  = handle u64 | class s8 | type s8 | bits u32 | curve s8 | label s16 |
//	           id b16 | attrs u32 (bit i = hsm.AllAttrs[i]) | kcv b8 | owner s8 |
//	           shares u16 × s8 | material b32
//
// where s8/b8 are a u8 length then bytes, s16/b16 a u16 length, b32 a u32
// length; integers are big-endian.
const (
	maskedMagic   = "KMMO"
	maskedVersion = 1
	maxMaterial   = 16 << 10
	maxShares     = 1024
)

// maskedKey is the decoded content of a masked object.
type maskedKey struct {
	info     hsm.KeyInfo
	material []byte
}

// errLineage is the message of a masked object from another lineage.
const errLineageMsg = "masked object is from another cluster lineage (%q, this hsm is %q); only clones share a masking key"

func maskedHeader(lineage string) []byte {
	h := make([]byte, 0, 7+len(lineage))
	h = append(h, maskedMagic...)
	h = append(h, maskedVersion)
	h = binary.BigEndian.AppendUint16(h, uint16(len(lineage)))
	return append(h, lineage...)
}

// parseMaskedHeader splits a blob into its lineage, header (the AAD) and
// sealed body.
func parseMaskedHeader(blob []byte) (lineage string, header, body []byte, err error) {
	if len(blob) < 7 || string(blob[:4]) != maskedMagic {
		return "", nil, nil, errors.New("not a keymig masked object (bad magic)")
	}
	if blob[4] != maskedVersion {
		return "", nil, nil, fmt.Errorf("masked object version %d is not supported (want %d); upgrade keymig", blob[4], maskedVersion)
	}
	l := int(binary.BigEndian.Uint16(blob[5:7]))
	if len(blob) < 7+l {
		return "", nil, nil, errors.New("masked object is truncated in its header")
	}
	return string(blob[7 : 7+l]), blob[:7+l], blob[7+l:], nil
}

// encodeMaskedPayload serialises a key for masking.
func encodeMaskedPayload(info hsm.KeyInfo, material []byte) []byte {
	var b []byte
	s8 := func(s []byte) { b = append(b, byte(len(s))); b = append(b, s...) }
	b = binary.BigEndian.AppendUint64(b, uint64(info.Ref))
	s8([]byte(info.Class))
	s8([]byte(info.Type))
	b = binary.BigEndian.AppendUint32(b, uint32(info.Bits))
	s8([]byte(info.Curve))
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.Label)))
	b = append(b, info.Label...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.ID)))
	b = append(b, info.ID...)
	var mask uint32
	for i, a := range hsm.AllAttrs {
		if v, _ := info.Attrs.Get(a); v {
			mask |= 1 << i
		}
	}
	b = binary.BigEndian.AppendUint32(b, mask)
	s8(info.KCV)
	s8([]byte(info.Owner))
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.SharedWith)))
	for _, u := range info.SharedWith {
		s8([]byte(u))
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(material)))
	return append(b, material...)
}

// reader reads length-prefixed fields; the first failure sticks.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = fmt.Errorf("masked object is truncated in %s", what)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8(what string) int {
	v := r.take(1, what)
	if v == nil {
		return 0
	}
	return int(v[0])
}
func (r *reader) u16(what string) int {
	v := r.take(2, what)
	if v == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(v))
}
func (r *reader) u32(what string) uint32 {
	v := r.take(4, what)
	if v == nil {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}
func (r *reader) u64(what string) uint64 {
	v := r.take(8, what)
	if v == nil {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}
func (r *reader) s8(what string) string  { return string(r.take(r.u8(what), what)) }
func (r *reader) s16(what string) string { return string(r.take(r.u16(what), what)) }

// decodeMaskedPayload parses a decrypted payload defensively.
func decodeMaskedPayload(b []byte) (maskedKey, error) {
	r := &reader{b: b}
	var info hsm.KeyInfo
	info.Ref = hsm.KeyRef(r.u64("the handle"))
	info.Class = hsm.Class(r.s8("the class"))
	info.Type = hsm.KeyType(r.s8("the key type"))
	info.Bits = int(r.u32("the size"))
	info.Curve = r.s8("the curve")
	info.Label = r.s16("the label")
	if id := r.take(r.u16("the id"), "the id"); len(id) > 0 {
		info.ID = bytes.Clone(id)
	}
	mask := r.u32("the attributes")
	info.KCV = bytes.Clone(r.take(r.u8("the check value"), "the check value"))
	info.Owner = r.s8("the owner")
	n := r.u16("the shares")
	if n > maxShares {
		return maskedKey{}, fmt.Errorf("masked object lists %d shares, more than %d", n, maxShares)
	}
	info.SharedWith = make([]string, 0, n)
	for i := 0; i < n && r.err == nil; i++ {
		info.SharedWith = append(info.SharedWith, r.s8("the shares"))
	}
	ml := r.u32("the material")
	if ml > maxMaterial {
		return maskedKey{}, fmt.Errorf("masked object holds %d bytes of key material, more than %d", ml, maxMaterial)
	}
	mat := bytes.Clone(r.take(int(ml), "the material"))
	if r.err != nil {
		return maskedKey{}, r.err
	}
	if len(r.b) != 0 {
		return maskedKey{}, fmt.Errorf("masked object has %d trailing bytes", len(r.b))
	}
	if mask>>len(hsm.AllAttrs) != 0 {
		return maskedKey{}, fmt.Errorf("masked object sets unknown attribute bits %#x", mask)
	}
	for i, a := range hsm.AllAttrs {
		info.Attrs.Set(a, mask&(1<<i) != 0)
	}
	if info.Ref == 0 {
		return maskedKey{}, errors.New("masked object has handle 0")
	}
	switch info.Class {
	case hsm.ClassSecret, hsm.ClassPrivate, hsm.ClassPublic:
	default:
		return maskedKey{}, fmt.Errorf("masked object has unknown class %q", info.Class)
	}
	switch info.Type {
	case hsm.TypeAES, hsm.TypeRSA, hsm.TypeEC:
	default:
		return maskedKey{}, fmt.Errorf("masked object has unsupported key type %q", info.Type)
	}
	if info.Owner == "" || len(info.KCV) != 3 || len(mat) == 0 {
		return maskedKey{}, errors.New("masked object lacks an owner, a check value or key material")
	}
	return maskedKey{info: info, material: mat}, nil
}

// mask seals a key for other HSMs of the lineage.
func (n *Node) mask(info hsm.KeyInfo, material []byte) []byte {
	header := maskedHeader(n.opt.Lineage)
	pt := encodeMaskedPayload(info, material)
	defer clear(pt)
	return sealWith(n.masking, header, pt)
}

func sealWith(a cipher.AEAD, header, pt []byte) []byte {
	out := make([]byte, len(header)+a.NonceSize(), len(header)+a.NonceSize()+len(pt)+a.Overhead())
	copy(out, header)
	rand.Read(out[len(header):])
	return a.Seal(out, out[len(header):], pt, header)
}

// unmask opens and checks a masked object: lineage, integrity, format, and
// that the material matches its class, type and check value.
func (n *Node) unmask(op string, blob []byte) (maskedKey, error) {
	lineage, header, body, err := parseMaskedHeader(blob)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "%v", err)
	}
	if lineage != n.opt.Lineage {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, errLineageMsg, lineage, n.opt.Lineage)
	}
	ns := n.masking.NonceSize()
	if len(body) < ns+n.masking.Overhead() {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "masked object is truncated")
	}
	pt, err := n.masking.Open(nil, body[:ns], body[ns:], header)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "masked object is corrupt or was altered (it does not authenticate under lineage %s's masking key)", lineage)
	}
	defer clear(pt)
	mk, err := decodeMaskedPayload(pt)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "%v", err)
	}
	if err := n.checkMaterial(op, &mk); err != nil {
		return maskedKey{}, err
	}
	return mk, nil
}

// checkMaterial verifies that material fits its info and its KCV.
func (n *Node) checkMaterial(op string, mk *maskedKey) error {
	ref := mk.info.Ref
	m := &material{class: mk.info.Class, der: mk.material}
	if err := m.parse(); err != nil {
		return hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s in the masked object has unreadable material: %v", ref, err)
	}
	var kcv []byte
	var err error
	if mk.info.Class == hsm.ClassSecret {
		kcv, err = wrap.KCVSecret(mk.material)
	} else {
		kcv, err = wrap.KCVPublic(m.pub)
	}
	if err != nil || !bytes.Equal(kcv, mk.info.KCV) {
		return hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s in the masked object does not match its check value %x", ref, []byte(mk.info.KCV))
	}
	return nil
}

// ExportMasked returns a token key under the masking key; the owner or a
// crypto officer may export.
func (s *session) ExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	const op = "masked-export"
	release, err := s.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	var out []byte
	k, err := s.visible(op, ref)
	if err == nil && s.role != hsm.RoleCryptoOfficer && k.info.Owner != s.user {
		err = hsm.Errorf(hsm.CodePermission, op, ref, "only the owner of key %s (%s) or a crypto officer may export it masked", ref, k.info.Owner)
	}
	if err == nil && k.session != 0 {
		err = hsm.Errorf(hsm.CodeInvalidInput, op, ref, "key %s is a session key; session keys never leave their hsm", ref)
	}
	if err == nil {
		out = s.n.mask(k.info, k.mat.der)
	}
	if err := s.n.audit(ctx, s.user, op, err, ref); err != nil {
		return nil, err
	}
	return out, nil
}

// InsertMasked stores a masked object under its handle; a crypto officer or
// the key's owner may insert.
func (s *session) InsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	const op = "masked-insert"
	release, err := s.begin(ctx, op)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	mk, err := s.n.unmask(op, blob)
	if err == nil && s.role != hsm.RoleCryptoOfficer && mk.info.Owner != s.user {
		err = hsm.Errorf(hsm.CodePermission, op, mk.info.Ref, "key %s belongs to %s; only its owner or a crypto officer may insert it", mk.info.Ref, mk.info.Owner)
	}
	if err != nil {
		return hsm.KeyInfo{}, s.n.audit(ctx, s.user, op, err, mk.info.Ref)
	}
	return s.n.insertMasked(ctx, s.user, op, mk, false)
}

// insertMasked stores a decoded masked key. A handle that already holds the
// same key (same class and KCV) is left as is, or, with replace, takes the
// blob's label, id, attributes, owner and shares.
func (n *Node) insertMasked(ctx context.Context, user, op string, mk maskedKey, replace bool) (hsm.KeyInfo, error) {
	info := mk.info
	ref := info.Ref
	info.Attrs.Token = true
	slices.Sort(info.SharedWith)
	info.SharedWith = slices.Compact(info.SharedWith)
	var (
		result hsm.KeyInfo
		rev    uint64
		wrote  bool
	)
	err := n.write(ctx, hsm.AuditRecord{User: user, Op: op, Handles: []hsm.KeyRef{ref}}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		wrote, rev = false, 0
		old, err := getRecord(tx, ref)
		if err != nil {
			return err
		}
		if old != nil {
			if old.Info.Class != info.Class || !bytes.Equal(old.Info.KCV, info.KCV) {
				return hsm.Errorf(hsm.CodeExists, op, ref, "handle %s already holds another key (%s, kcv %x; the masked object has %s, kcv %x); it is never overwritten", ref, old.Info.Class, []byte(old.Info.KCV), info.Class, []byte(info.KCV))
			}
			if !replace || sameInfo(old.Info, info) {
				result = old.Info
				return nil
			}
		} else if c := keyCount(tx); c+1 > n.policy().KeyCapacity {
			return hsm.Errorf(hsm.CodeCapacity, op, ref, "hsm %s holds %d of its %d token keys; delete keys or raise the cluster's key capacity", n.opt.ID, c, n.policy().KeyCapacity)
		}
		for _, u := range append([]string{info.Owner}, info.SharedWith...) {
			cur, err := getUser(tx, u)
			if err != nil {
				return err
			}
			if cur == nil {
				return hsm.Errorf(hsm.CodeNotFound, op, ref, "key %s names user %s, who does not exist on hsm %s; create the user (or replicate users) first", ref, u, n.opt.ID)
			}
		}
		if len(info.ID) > 0 {
			if v := tx.Bucket(bktIDs).Get(idKey(info.Owner, info.Class, info.ID)); v != nil && hsm.KeyRef(uint64FromBytes(v)) != ref {
				other := hsm.KeyRef(uint64FromBytes(v))
				return hsm.Errorf(hsm.CodeExists, op, ref, "user %s already has a %s with id %x: key %s, so key %s cannot be inserted", info.Owner, info.Class, []byte(info.ID), other, ref)
			}
		}
		rev, err = n.putKey(tx, info, mk.material, old)
		if err != nil {
			return txAbort{err}
		}
		result, wrote = info, true
		return nil
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	if wrote {
		var mat *material
		if k := n.lookup(ref); k != nil && bytes.Equal(k.mat.der, mk.material) {
			mat = k.mat
		} else {
			mat = &material{class: info.Class, der: mk.material}
		}
		n.apply(ref, rev, &key{info: info, mat: mat})
	}
	return n.publicInfo(result), nil
}

// Peer API ------------------------------------------------------------------------

// PeerListKeys returns every token key of every owner, ordered by handle.
func (n *Node) PeerListKeys(ctx context.Context) ([]hsm.KeyInfo, error) {
	release, err := n.begin(ctx, "peer-list")
	if err != nil {
		return nil, err
	}
	defer release()
	var out []hsm.KeyInfo
	n.mu.RLock()
	for _, k := range n.keys {
		if k.session == 0 {
			out = append(out, k.info)
		}
	}
	n.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	for i := range out {
		out[i] = n.publicInfo(out[i])
	}
	return out, nil
}

// PeerExportMasked returns any token key as a masked object.
func (n *Node) PeerExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	const op = "peer-masked-export"
	release, err := n.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	k := n.lookup(ref)
	var out []byte
	if k == nil || k.session != 0 {
		err = hsm.Errorf(hsm.CodeNotFound, op, ref, "key %s not found on hsm %s", ref, n.opt.ID)
	} else {
		out = n.mask(k.info, k.mat.der)
	}
	if err := n.audit(ctx, "peer", op, err, ref); err != nil {
		return nil, err
	}
	return out, nil
}

// PeerInsertMasked stores a masked object with InsertMasked's rules but no
// user check: idempotent for the same key, an exists error for another.
func (n *Node) PeerInsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	return n.peerInsert(ctx, "peer-masked-insert", blob, false)
}

// PeerPutMasked is PeerInsertMasked that, when the handle already holds the
// same key (same KCV), replaces its label, id, attributes, owner and shares
// with the blob's, so that anti-entropy can converge metadata.
func (n *Node) PeerPutMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	return n.peerInsert(ctx, "peer-masked-put", blob, true)
}

func (n *Node) peerInsert(ctx context.Context, op string, blob []byte, replace bool) (hsm.KeyInfo, error) {
	release, err := n.begin(ctx, op)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	mk, err := n.unmask(op, blob)
	if err != nil {
		return hsm.KeyInfo{}, n.audit(ctx, "peer", op, err, mk.info.Ref)
	}
	return n.insertMasked(ctx, "peer", op, mk, replace)
}

// PeerDeleteKey deletes a token key whatever its owner or destroyable
// attribute, for the cluster layer to propagate a delete.
func (n *Node) PeerDeleteKey(ctx context.Context, ref hsm.KeyRef) error {
	const op = "peer-delete"
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	var rev uint64
	err = n.write(ctx, hsm.AuditRecord{User: "peer", Op: op, Handles: []hsm.KeyRef{ref}}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		old, err := getRecord(tx, ref)
		if err != nil {
			return err
		}
		if old == nil {
			return hsm.Errorf(hsm.CodeNotFound, op, ref, "key %s not found on hsm %s", ref, n.opt.ID)
		}
		if rev, err = delKey(tx, old); err != nil {
			return txAbort{err}
		}
		return nil
	})
	if err != nil {
		return err
	}
	n.apply(ref, rev, nil)
	return nil
}

// Snapshots ----------------------------------------------------------------------

// snapshot is a backup of one HSM: no plaintext key material, only masked
// objects and password hashes.
type snapshot struct {
	Format  string           `json:"format"`
	Version int              `json:"version"`
	HSM     string           `json:"hsm-id"`
	Lineage string           `json:"lineage"`
	Policy  hsm.Policy       `json:"policy"`
	Users   []hsm.UserRecord `json:"users"`
	Keys    [][]byte         `json:"keys"` // masked objects
}

const snapshotFormat = "keymig-hsm-snapshot"

// Snapshot returns a JSON backup of users, token keys (as masked objects)
// and policy. It holds no plaintext key material; the cluster encrypts it.
func (n *Node) Snapshot(ctx context.Context) ([]byte, error) {
	const op = "snapshot"
	release, err := n.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	users, err := n.users()
	if err != nil {
		return nil, err
	}
	snap := snapshot{Format: snapshotFormat, Version: 1, HSM: n.opt.ID, Lineage: n.opt.Lineage, Policy: n.policy(), Users: users, Keys: [][]byte{}}
	n.mu.RLock()
	keys := make([]*key, 0, len(n.keys))
	for _, k := range n.keys {
		if k.session == 0 {
			keys = append(keys, k)
		}
	}
	n.mu.RUnlock()
	sort.Slice(keys, func(i, j int) bool { return keys[i].info.Ref < keys[j].info.Ref })
	for _, k := range keys {
		snap.Keys = append(snap.Keys, n.mask(k.info, k.mat.der))
	}
	out, err := json.Marshal(snap)
	if err != nil {
		return nil, err
	}
	if err := n.audit(ctx, "peer", op, nil); err != nil {
		return nil, err
	}
	return out, nil
}

// RestoreSnapshot replaces this HSM's users, token keys and policy with a
// snapshot's. The snapshot must come from the same lineage. Session keys
// and the audit log are kept (the restore is audited).
func (n *Node) RestoreSnapshot(ctx context.Context, data []byte) error {
	const op = "restore"
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	var snap snapshot
	if err := json.Unmarshal(data, &snap); err != nil || snap.Format != snapshotFormat {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "not a keymig hsm snapshot")
	}
	if snap.Version != 1 {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "snapshot version %d is not supported; upgrade keymig", snap.Version)
	}
	if snap.Lineage != n.opt.Lineage {
		return hsm.Errorf(hsm.CodeIntegrity, op, 0, "snapshot of hsm %s is from lineage %q, this hsm is %q; only clones share a masking key", snap.HSM, snap.Lineage, n.opt.Lineage)
	}
	mks := make([]maskedKey, 0, len(snap.Keys))
	for i, b := range snap.Keys {
		mk, err := n.unmask(op, b)
		if err != nil {
			return fmt.Errorf("snapshot key %d: %w", i, err)
		}
		mks = append(mks, mk)
	}
	pol := snap.Policy
	if pol.KeyCapacity <= 0 {
		pol.KeyCapacity = DefaultKeyCapacity
	}
	pol.MaxConcurrentOps = n.policy().MaxConcurrentOps // a per-HSM setting, not restored
	var (
		revs   []uint64
		delRev uint64
	)
	err = n.write(ctx, hsm.AuditRecord{User: "peer", Op: op}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		revs = nil
		for _, b := range [][]byte{bktUsers, bktKeys, bktIDs} {
			if err := tx.DeleteBucket(b); err != nil {
				return txAbort{err}
			}
			if _, err := tx.CreateBucket(b); err != nil {
				return txAbort{err}
			}
		}
		if err := setKeyCount(tx, 0); err != nil {
			return txAbort{err}
		}
		var err error
		if delRev, err = nextRev(tx); err != nil {
			return txAbort{err}
		}
		for i := range snap.Users {
			if err := putUser(tx, &snap.Users[i]); err != nil {
				return txAbort{err}
			}
		}
		for _, mk := range mks {
			rev, err := n.putKey(tx, mk.info, mk.material, nil)
			if err != nil {
				return txAbort{err}
			}
			revs = append(revs, rev)
		}
		opt := n.opt
		opt.FIPS, opt.KeyCapacity = pol.FIPS, pol.KeyCapacity
		pj, _ := json.Marshal(opt)
		if err := tx.Bucket(bktMeta).Put(metaOptions, pj); err != nil {
			return txAbort{err}
		}
		return nil
	})
	if err != nil {
		return err
	}
	n.setPolicy(pol)
	n.mu.RLock()
	var drop []hsm.KeyRef
	for ref, k := range n.keys {
		if k.session == 0 {
			drop = append(drop, ref)
		}
	}
	n.mu.RUnlock()
	for _, ref := range drop {
		n.apply(ref, delRev, nil)
	}
	for i, mk := range mks {
		n.apply(mk.info.Ref, revs[i], &key{info: mk.info, mat: &material{class: mk.info.Class, der: mk.material}})
	}
	return nil
}
