package node

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// Snapshots: a backup of one HSM, users, token keys (masked) and policy,
// and restoring one into an empty HSM.

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
		if tx.Bucket(bktQuorum) != nil {
			if err := tx.DeleteBucket(bktQuorum); err != nil { // tokens are not restored
				return txAbort{err}
			}
		}
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
		return n.putPolicy(tx, pol)
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

// putPolicy persists the policy's FIPS mode, capacity and quorum in the
// HSM's options inside tx; the caller publishes it with setPolicy after
// the commit.
func (n *Node) putPolicy(tx *bolt.Tx, p hsm.Policy) error {
	opt := n.opt
	opt.FIPS, opt.KeyCapacity, opt.QuorumUserManagement = p.FIPS, p.KeyCapacity, p.QuorumUserManagement
	pj, _ := json.Marshal(opt)
	if err := tx.Bucket(bktMeta).Put(metaOptions, pj); err != nil {
		return txAbort{err}
	}
	return nil
}
