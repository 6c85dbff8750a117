package node

import (
	"go.etcd.io/bbolt"

	"github.com/keymig/keymig/hsm"
)

// LineageSecret returns a copy of the lineage secret, read from the HSM's
// file. The cluster layer seals backups with a key derived from it; it is
// not reachable through any user session.
func (n *Node) LineageSecret() ([]byte, error) {
	var secret []byte
	err := n.db.View(func(tx *bbolt.Tx) error {
		meta := tx.Bucket(bktMeta)
		if meta == nil {
			return hsm.Errorf(hsm.CodeIntegrity, "lineage-secret", 0, "hsm %s: no metadata in %s", n.opt.ID, n.path)
		}
		s, err := unseal(n.storage, meta.Get(metaLineage), metaLineage)
		if err != nil {
			return hsm.Errorf(hsm.CodeIntegrity, "lineage-secret", 0, "hsm %s: reading the lineage secret: %v", n.opt.ID, err)
		}
		secret = s
		return nil
	})
	return secret, err
}
