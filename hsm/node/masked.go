package node

import (
	"bytes"
	"context"
	"slices"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

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
