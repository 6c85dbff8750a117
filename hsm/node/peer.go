package node

import (
	"context"
	"sort"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// The peer API: what the cluster layer calls on an HSM, outside any
// user session, to list, copy and delete token keys and users between the
// HSMs of a cluster (the cluster.Member interface).

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
