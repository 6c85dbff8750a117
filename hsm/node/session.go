package node

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"slices"
	"sort"
	"sync/atomic"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
	bolt "go.etcd.io/bbolt"
)

// session is a logged-in user of one node. It implements hsm.Session.
type session struct {
	n      *Node
	id     uint64
	user   string
	role   hsm.Role
	closed atomic.Bool
}

var _ hsm.FullSession = (*session)(nil)

// begin admits an operation of this session.
func (s *session) begin(ctx context.Context, op string) (func(), error) {
	if s.closed.Load() {
		return nil, hsm.Errorf(hsm.CodePermission, op, 0, "the session of user %s is logged out; log in again", s.user)
	}
	return s.n.begin(ctx, op)
}

func (s *session) User() hsm.User {
	return hsm.User{Name: s.user, Role: s.role, Coverage: hsm.Coverage{HSMs: []string{s.n.opt.ID}}}
}

func (s *session) Info(ctx context.Context) (hsm.ClusterInfo, error) {
	release, err := s.begin(ctx, "info")
	if err != nil {
		return hsm.ClusterInfo{}, err
	}
	defer release()
	return s.n.info(), nil
}

func (n *Node) info() hsm.ClusterInfo {
	n.mu.RLock()
	count := 0
	for _, k := range n.keys {
		if k.session == 0 {
			count++
		}
	}
	n.mu.RUnlock()
	return hsm.ClusterInfo{
		ID: n.opt.ID, Region: n.opt.AZ, Lineage: n.opt.Lineage,
		HSMs:   []hsm.HSMInfo{{ID: n.opt.ID, AZ: n.opt.AZ, State: "active"}},
		Policy: n.Policy(), Keys: count, Created: n.opt.Created,
	}
}

func (s *session) Logout(ctx context.Context) error {
	if s.closed.Swap(true) {
		return nil
	}
	n := s.n
	var dropped []hsm.KeyRef
	n.mu.Lock()
	delete(n.sessions, s.id)
	for ref, k := range n.keys {
		if k.session == s.id {
			delete(n.keys, ref)
			dropped = append(dropped, ref)
		}
	}
	n.mu.Unlock()
	if n.closed.Load() {
		return nil
	}
	slices.Sort(dropped)
	return n.audit(ctx, s.user, "logout", nil, dropped...)
}

// visibility and permission -----------------------------------------------------

// sees reports whether the session may see a key: its owner, a user it is
// shared with, or a crypto officer; a public key every user (CloudHSM: "key
// list includes all public keys in the cluster"); session keys only in
// their own session.
func (s *session) sees(info hsm.KeyInfo, sess uint64) bool {
	if sess != 0 && sess != s.id {
		return false
	}
	return s.role == hsm.RoleCryptoOfficer || info.Class == hsm.ClassPublic || info.Owner == s.user || slices.Contains(info.SharedWith, s.user)
}

func (s *session) notFound(op string, ref hsm.KeyRef) error {
	if s.role == hsm.RoleCryptoOfficer {
		return hsm.Errorf(hsm.CodeNotFound, op, ref, "key %s not found on hsm %s; list keys to see which exist", ref, s.n.opt.ID)
	}
	return hsm.Errorf(hsm.CodeNotFound, op, ref, "key %s not found: it does not exist on hsm %s or is not shared with user %s; list keys to see which you can use", ref, s.n.opt.ID, s.user)
}

// visible returns the current version of a key the session may see.
func (s *session) visible(op string, ref hsm.KeyRef) (*key, error) {
	k := s.n.lookup(ref)
	if k == nil || !s.sees(k.info, k.session) {
		return nil, s.notFound(op, ref)
	}
	return k, nil
}

// usable returns a key the session may use for op: a crypto user who owns it
// or with whom it is shared.
func (s *session) usable(op string, ref hsm.KeyRef) (*key, error) {
	k, err := s.visible(op, ref)
	if err != nil {
		return nil, err
	}
	if s.role == hsm.RoleCryptoOfficer {
		return nil, hsm.Errorf(hsm.CodePermission, op, ref, "crypto officers do not use keys; log in as the owner of key %s (%s) or a user it is shared with", ref, k.info.Owner)
	}
	return k, nil
}

// ownerCheck refuses anyone but the owner of a key (a crypto user).
func (s *session) ownerCheck(op, verb string, info hsm.KeyInfo) error {
	if s.role == hsm.RoleCryptoOfficer {
		return hsm.Errorf(hsm.CodePermission, op, info.Ref, "crypto officers cannot %s keys; only the owner of key %s (%s) may", verb, info.Ref, info.Owner)
	}
	if info.Owner != s.user {
		return hsm.Errorf(hsm.CodePermission, op, info.Ref, "only the owner of key %s (%s) may %s it; user %s may only use it", info.Ref, info.Owner, verb, s.user)
	}
	return nil
}

func (s *session) mustBeUser(op, what string) error {
	if s.role != hsm.RoleCryptoUser {
		return hsm.Errorf(hsm.CodePermission, op, 0, "crypto officers do not own keys, so they cannot %s; log in as a crypto user", what)
	}
	return nil
}

// key creation ------------------------------------------------------------------

// newKey is a key about to be stored; info.Ref zero means "pick a handle".
type newKey struct {
	info    hsm.KeyInfo
	der     []byte
	mat     *material
	session bool
}

// create stores new keys (one, or the two halves of a pair) atomically and
// returns their infos. Session keys stay in memory; token keys go to disk.
func (s *session) create(ctx context.Context, op string, keys []newKey, related ...hsm.KeyRef) ([]hsm.KeyInfo, error) {
	n := s.n
	if keys[0].session {
		// Session keys: checked and inserted under the map lock.
		n.mu.Lock()
		for i := range keys {
			nk := &keys[i]
			if len(nk.info.ID) > 0 {
				for _, k := range n.keys {
					if k.info.Owner == nk.info.Owner && k.info.Class == nk.info.Class && bytes.Equal(k.info.ID, nk.info.ID) && (k.session == 0 || k.session == s.id) {
						n.mu.Unlock()
						err := hsm.Errorf(hsm.CodeExists, op, 0, "user %s already has a %s with id %x: key %s; choose another id", nk.info.Owner, nk.info.Class, nk.info.ID, k.info.Ref)
						return nil, n.audit(ctx, s.user, op, err, related...)
					}
				}
			}
		}
		var refs []hsm.KeyRef
		out := make([]hsm.KeyInfo, len(keys))
		for i := range keys {
			nk := &keys[i]
			for nk.info.Ref == 0 {
				var b [8]byte
				rand.Read(b[:])
				r := hsm.KeyRef(uint64(b[0])<<56 | uint64(b[1])<<48 | uint64(b[2])<<40 | uint64(b[3])<<32 | uint64(b[4])<<24 | uint64(b[5])<<16 | uint64(b[6])<<8 | uint64(b[7]))
				if _, taken := n.keys[r]; r != 0 && !taken {
					nk.info.Ref = r
				}
			}
			n.keys[nk.info.Ref] = &key{info: nk.info, session: s.id, mat: nk.mat}
			refs = append(refs, nk.info.Ref)
			out[i] = n.publicInfo(nk.info)
		}
		n.mu.Unlock()
		if err := n.audit(ctx, s.user, op, nil, append(related, refs...)...); err != nil {
			n.mu.Lock()
			for _, r := range refs {
				delete(n.keys, r)
			}
			n.mu.Unlock()
			return nil, err
		}
		return out, nil
	}
	infos, revs, err := n.storeNew(ctx, s.user, op, keys, related...)
	if err != nil {
		return nil, err
	}
	out := make([]hsm.KeyInfo, len(keys))
	for i, nk := range keys {
		n.apply(infos[i].Ref, revs[i], &key{info: infos[i], mat: nk.mat})
		out[i] = n.publicInfo(infos[i])
	}
	return out, nil
}

// storeNew writes new token keys in one transaction, checking capacity, id
// uniqueness and handles there. Keys with a preset Ref keep it.
func (n *Node) storeNew(ctx context.Context, user, op string, keys []newKey, related ...hsm.KeyRef) ([]hsm.KeyInfo, []uint64, error) {
	var (
		infos []hsm.KeyInfo
		revs  []uint64
	)
	err := n.write(ctx, hsm.AuditRecord{User: user, Op: op, Handles: related}, func(tx *bolt.Tx, rec *hsm.AuditRecord) error {
		infos, revs = nil, nil
		if c := keyCount(tx); c+len(keys) > n.policy().KeyCapacity {
			return hsm.Errorf(hsm.CodeCapacity, op, 0, "hsm %s holds %d of its %d token keys; delete keys or raise the cluster's key capacity", n.opt.ID, c, n.policy().KeyCapacity)
		}
		for _, nk := range keys {
			if len(nk.info.ID) == 0 {
				continue
			}
			if v := tx.Bucket(bktIDs).Get(idKey(nk.info.Owner, nk.info.Class, nk.info.ID)); v != nil {
				other := hsm.KeyRef(uint64FromBytes(v))
				return hsm.Errorf(hsm.CodeExists, op, other, "user %s already has a %s with id %x: key %s; choose another id", nk.info.Owner, nk.info.Class, []byte(nk.info.ID), other)
			}
		}
		for _, nk := range keys {
			info := nk.info
			if info.Ref == 0 {
				info.Ref = n.newHandle(tx)
			}
			rec.Handles = append(rec.Handles, info.Ref)
			rev, err := n.putKey(tx, info, nk.der, nil)
			if err != nil {
				return txAbort{err}
			}
			infos = append(infos, info)
			revs = append(revs, rev)
		}
		return nil
	})
	return infos, revs, err
}

func uint64FromBytes(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

// baseInfo builds the info of a new key from a template.
func (s *session) baseInfo(op string, c hsm.Class, t hsm.KeyType, bits int, curve string, kcv []byte, tmpl hsm.Template, local bool) (hsm.KeyInfo, bool, error) {
	at, session, err := buildAttrs(op, c, tmpl, local, s.role)
	if err != nil {
		return hsm.KeyInfo{}, false, err
	}
	if len(tmpl.Label) > 127 {
		return hsm.KeyInfo{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a label is at most 127 bytes")
	}
	if len(tmpl.ID) > 255 {
		return hsm.KeyInfo{}, false, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "an id is at most 255 bytes")
	}
	return hsm.KeyInfo{Label: tmpl.Label, ID: bytes.Clone(tmpl.ID), Class: c, Type: t, Bits: bits, Curve: curve,
		Attrs: at, KCV: kcv, Owner: s.user, SharedWith: []string{}}, session, nil
}

func (s *session) GenerateKey(ctx context.Context, spec hsm.KeySpec) (hsm.KeyInfo, error) {
	const op = "generate"
	release, err := s.begin(ctx, op)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	info, err := s.generateKey(ctx, spec)
	if err != nil {
		return hsm.KeyInfo{}, s.settle(ctx, op, err)
	}
	return info, nil
}

// storedErr marks an error already recorded in the audit log.
type storedErr struct{ error }

func (e storedErr) Unwrap() error { return e.error }

// settle returns err after making sure it is in the audit log.
func (s *session) settle(ctx context.Context, op string, err error, handles ...hsm.KeyRef) error {
	if se, ok := err.(storedErr); ok {
		return se.error
	}
	return s.n.audit(ctx, s.user, op, err, handles...)
}

func (s *session) generateKey(ctx context.Context, spec hsm.KeySpec) (hsm.KeyInfo, error) {
	const op = "generate"
	if err := s.mustBeUser(op, "generate keys"); err != nil {
		return hsm.KeyInfo{}, err
	}
	if spec.Type != hsm.TypeAES {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "GenerateKey makes aes keys; use GenerateKeyPair for %q", spec.Type)
	}
	if err := checkAESBits(op, spec.Bits); err != nil {
		return hsm.KeyInfo{}, err
	}
	raw := make([]byte, spec.Bits/8)
	rand.Read(raw)
	kcv, err := wrap.KCVSecret(raw)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	info, session, err := s.baseInfo(op, hsm.ClassSecret, hsm.TypeAES, spec.Bits, "", kcv, spec.Template, true)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	out, err := s.create(ctx, op, []newKey{{info: info, der: raw, mat: &material{class: hsm.ClassSecret, der: raw}, session: session}})
	if err != nil {
		return hsm.KeyInfo{}, storedErr{err}
	}
	return out[0], nil
}

func (s *session) GenerateKeyPair(ctx context.Context, spec hsm.KeyPairSpec) (pub, priv hsm.KeyInfo, err error) {
	const op = "generate"
	release, err := s.begin(ctx, op)
	if err != nil {
		return pub, priv, err
	}
	defer release()
	pub, priv, err = s.generateKeyPair(ctx, spec)
	if err != nil {
		return hsm.KeyInfo{}, hsm.KeyInfo{}, s.settle(ctx, op, err)
	}
	return pub, priv, nil
}

func (s *session) generateKeyPair(ctx context.Context, spec hsm.KeyPairSpec) (pub, priv hsm.KeyInfo, err error) {
	const op = "generate"
	if err := s.mustBeUser(op, "generate keys"); err != nil {
		return pub, priv, err
	}
	var signer crypto.Signer
	var privKey any
	switch spec.Type {
	case hsm.TypeRSA:
		if err := s.n.checkRSA(op, spec.Bits, 65537, true); err != nil {
			return pub, priv, err
		}
		if err := ctx.Err(); err != nil {
			return pub, priv, err
		}
		k, err := rsa.GenerateKey(rand.Reader, spec.Bits)
		if err != nil {
			return pub, priv, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "generating rsa-%d: %v", spec.Bits, err)
		}
		k.Precompute()
		privKey = k
		signer = k
	case hsm.TypeEC:
		c, _, ok := curveOf(spec.Curve)
		if !ok {
			return pub, priv, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "ec curve %q is not supported: use P-256 or P-384", spec.Curve)
		}
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			return pub, priv, err
		}
		privKey = k
		signer = k
	default:
		return pub, priv, hsm.Errorf(hsm.CodeUnsupportedMechanism, op, 0, "GenerateKeyPair makes rsa or ec key pairs, not %q; use GenerateKey for aes", spec.Type)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return pub, priv, err
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(privKey)
	if err != nil {
		return pub, priv, err
	}
	t, bits, curve, kcv, err := s.n.describePublic(op, signer.Public())
	if err != nil {
		return pub, priv, err
	}
	pubInfo, pubSession, err := s.baseInfo(op, hsm.ClassPublic, t, bits, curve, kcv, spec.Public, true)
	if err != nil {
		return pub, priv, err
	}
	privInfo, privSession, err := s.baseInfo(op, hsm.ClassPrivate, t, bits, curve, kcv, spec.Private, true)
	if err != nil {
		return pub, priv, err
	}
	if pubSession != privSession {
		return pub, priv, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "both halves of a key pair must be session keys, or both token keys")
	}
	pm := &material{class: hsm.ClassPublic, der: pubDER}
	vm := &material{class: hsm.ClassPrivate, der: privDER}
	out, err := s.create(ctx, op, []newKey{
		{info: pubInfo, der: pubDER, mat: pm, session: pubSession},
		{info: privInfo, der: privDER, mat: vm, session: privSession},
	})
	if err != nil {
		return pub, priv, storedErr{err}
	}
	return out[0], out[1], nil
}

// listing -----------------------------------------------------------------------

func (s *session) ListKeys(ctx context.Context, f hsm.Filter) ([]hsm.KeyInfo, error) {
	release, err := s.begin(ctx, "list")
	if err != nil {
		return nil, err
	}
	defer release()
	n := s.n
	var out []hsm.KeyInfo
	n.mu.RLock()
	for _, k := range n.keys {
		if s.sees(k.info, k.session) && f.Match(k.info) {
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

func (s *session) GetKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	release, err := s.begin(ctx, "get")
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	k, err := s.visible("get", ref)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return s.n.publicInfo(k.info), nil
}

// changes to existing keys --------------------------------------------------------

// change applies fn to a key the session can see: in memory for session
// keys, in a transaction for token keys. fn returns the new info, or nil to
// delete the key; returning the same info unchanged writes nothing but the
// audit record.
func (s *session) change(ctx context.Context, op, target string, ref hsm.KeyRef, fn func(info hsm.KeyInfo) (*hsm.KeyInfo, error)) error {
	n := s.n
	rec := hsm.AuditRecord{User: s.user, Op: op, Handles: []hsm.KeyRef{ref}, Target: target}
	if k := n.lookup(ref); k != nil && k.session != 0 {
		if k.session != s.id {
			return n.audit(ctx, s.user, op, s.notFound(op, ref), ref)
		}
		n.mu.Lock()
		cur := n.keys[ref]
		if cur == nil {
			n.mu.Unlock()
			return n.audit(ctx, s.user, op, s.notFound(op, ref), ref)
		}
		ni, err := fn(cur.info)
		if err == nil {
			if ni == nil {
				delete(n.keys, ref)
			} else {
				n.keys[ref] = &key{info: *ni, session: cur.session, mat: cur.mat}
			}
		}
		n.mu.Unlock()
		rec.Outcome = outcome(err)
		if werr := n.record(rec); werr != nil {
			return werr
		}
		return err
	}
	var (
		newInfo *hsm.KeyInfo
		rev     uint64
		mat     *material
		deleted bool
	)
	err := n.write(ctx, rec, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		newInfo, rev, deleted = nil, 0, false
		old, err := getRecord(tx, ref)
		if err != nil {
			return err
		}
		if old == nil || !s.sees(old.Info, 0) {
			return s.notFound(op, ref)
		}
		ni, err := fn(old.Info)
		if err != nil {
			return err
		}
		if ni == nil {
			rev, err = delKey(tx, old)
			if err != nil {
				return txAbort{err}
			}
			deleted = true
			return nil
		}
		if sameInfo(*ni, old.Info) {
			return nil
		}
		der, err := n.sealedMaterial(old)
		if err != nil {
			return err
		}
		rev, err = n.putKey(tx, *ni, der, old)
		if err != nil {
			return txAbort{err}
		}
		newInfo = ni
		return nil
	})
	if err != nil {
		return err
	}
	switch {
	case deleted:
		n.apply(ref, rev, nil)
	case newInfo != nil:
		if k := n.lookup(ref); k != nil {
			mat = k.mat
		}
		if mat == nil {
			return nil // deleted meanwhile by a later write
		}
		n.apply(ref, rev, &key{info: *newInfo, mat: mat})
	}
	return nil
}

func sameInfo(a, b hsm.KeyInfo) bool {
	return a.Label == b.Label && bytes.Equal(a.ID, b.ID) && a.Attrs == b.Attrs && a.Owner == b.Owner && slices.Equal(a.SharedWith, b.SharedWith)
}

func (s *session) ShareKey(ctx context.Context, ref hsm.KeyRef, user string) error {
	return s.share(ctx, "share", ref, user, true)
}

func (s *session) UnshareKey(ctx context.Context, ref hsm.KeyRef, user string) error {
	return s.share(ctx, "unshare", ref, user, false)
}

func (s *session) share(ctx context.Context, op string, ref hsm.KeyRef, user string, add bool) error {
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	// Whether the user exists is read outside the key transaction; a user
	// deleted at the same moment keeps a dangling share, which is harmless.
	user = normUser(user)
	var target *hsm.UserRecord
	if err := n.db.View(func(tx *bolt.Tx) error { target, err = getUser(tx, user); return err }); err != nil {
		return err
	}
	return s.change(ctx, op, user, ref, func(info hsm.KeyInfo) (*hsm.KeyInfo, error) {
		if info.Class == hsm.ClassPublic {
			return nil, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "key %s is a public key, which every user of the cluster can already see and use; public keys cannot be shared or unshared, so there is nothing to do", ref)
		}
		if err := s.ownerCheck(op, op, info); err != nil {
			return nil, err
		}
		has := slices.Contains(info.SharedWith, user)
		if add {
			if target == nil {
				return nil, hsm.Errorf(hsm.CodeNotFound, op, ref, "cannot share key %s with user %s: no such user on hsm %s; create it first", ref, user, n.opt.ID)
			}
			if target.Role != hsm.RoleCryptoUser {
				return nil, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "cannot share key %s with %s: keys are shared with crypto users only", ref, user)
			}
			if user == info.Owner {
				return nil, hsm.Errorf(hsm.CodeInvalidInput, op, ref, "user %s owns key %s; it need not be shared with its owner", user, ref)
			}
			if has {
				return &info, nil
			}
			ni := info
			ni.SharedWith = append(slices.Clone(info.SharedWith), user)
			slices.Sort(ni.SharedWith)
			return &ni, nil
		}
		if !has {
			return &info, nil
		}
		ni := info
		ni.SharedWith = slices.DeleteFunc(slices.Clone(info.SharedWith), func(u string) bool { return u == user })
		return &ni, nil
	})
}

func (s *session) SetAttribute(ctx context.Context, ref hsm.KeyRef, a hsm.Attr, v bool) error {
	const op = "set-attribute"
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	return s.change(ctx, op, string(a), ref, func(info hsm.KeyInfo) (*hsm.KeyInfo, error) {
		if a != hsm.AttrTrusted {
			if err := s.ownerCheck(op, "change", info); err != nil {
				return nil, err
			}
		}
		at, err := checkSetAttribute(info, a, v, s.role)
		if err != nil {
			return nil, err
		}
		ni := info
		ni.Attrs = at
		return &ni, nil
	})
}

func (s *session) DeleteKey(ctx context.Context, ref hsm.KeyRef) error {
	const op = "delete"
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	return s.change(ctx, op, "", ref, func(info hsm.KeyInfo) (*hsm.KeyInfo, error) {
		if err := s.ownerCheck(op, "delete", info); err != nil {
			return nil, err
		}
		if !info.Attrs.Destroyable {
			return nil, hsm.Errorf(hsm.CodePermission, op, ref, "key %s is not destroyable (destroyable=false); it cannot be deleted", ref)
		}
		return nil, nil
	})
}

// public keys -------------------------------------------------------------------

func (s *session) ExportPublicKey(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	const op = "export-public"
	release, err := s.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	k, err := s.visible(op, ref)
	if err == nil && k.info.Class == hsm.ClassSecret {
		err = hsm.Errorf(hsm.CodeInvalidInput, op, ref, "key %s is a secret key; only rsa and ec keys have a public half", ref)
	}
	var out []byte
	if err == nil {
		if err = k.mat.parse(); err == nil {
			var der []byte
			der, err = x509.MarshalPKIXPublicKey(k.mat.pub)
			if err == nil {
				out = pemEncode("PUBLIC KEY", der)
			}
		}
	}
	if err != nil && hsm.CodeOf(err) == "" {
		err = hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s: stored material is unreadable: %v", ref, err)
	}
	if err := s.n.audit(ctx, s.user, op, err, ref); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *session) ImportPublicKey(ctx context.Context, pemBytes []byte, t hsm.Template) (hsm.KeyInfo, error) {
	const op = "import"
	release, err := s.begin(ctx, op)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	defer release()
	info, err := s.importPublic(ctx, pemBytes, t)
	if err != nil {
		return hsm.KeyInfo{}, s.settle(ctx, op, err)
	}
	return info, nil
}

func (s *session) importPublic(ctx context.Context, pemBytes []byte, t hsm.Template) (hsm.KeyInfo, error) {
	const op = "import"
	if err := s.mustBeUser(op, "import keys"); err != nil {
		return hsm.KeyInfo{}, err
	}
	der, err := pemDecode(pemBytes, "PUBLIC KEY")
	if err != nil {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "%v", err)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return hsm.KeyInfo{}, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "not a public key (want a PEM SubjectPublicKeyInfo, \"BEGIN PUBLIC KEY\"): %v", err)
	}
	kt, bits, curve, kcv, err := s.n.describePublic(op, pub)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	// Store the canonical encoding.
	der, _ = x509.MarshalPKIXPublicKey(pub)
	info, session, err := s.baseInfo(op, hsm.ClassPublic, kt, bits, curve, kcv, t, false)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	out, err := s.create(ctx, op, []newKey{{info: info, der: der, mat: &material{class: hsm.ClassPublic, der: der}, session: session}})
	if err != nil {
		return hsm.KeyInfo{}, storedErr{err}
	}
	return out[0], nil
}
