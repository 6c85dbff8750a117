package cluster

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
)

// This file is the one place the cluster meets a concrete HSM: the opener
// of members that live as files in the cluster directory.

// Opener makes and opens the members of a cluster. The cluster asks it for
// an HSM by the description in cluster.json and talks to what it returns
// only through Member, so local HSMs, remote ones and test doubles are
// interchangeable.
type Opener interface {
	// Create makes a new, empty HSM of the cluster whose directory is dir.
	Create(dir string, spec MemberSpec) (Member, error)
	// Open opens an existing HSM of the cluster, waiting up to timeout for
	// another process that holds it.
	Open(dir string, spec MemberSpec, timeout time.Duration) (Member, error)
	// Remove deletes what an HSM that left the cluster kept; it is closed.
	Remove(dir, id string) error
}

// MemberSpec is one HSM as the cluster describes it to an Opener.
type MemberSpec struct {
	ID, AZ  string
	Lineage string
	// LineageSecret is the secret the masking key is derived from; only
	// Create gets it.
	LineageSecret []byte
	// Policy is the cluster's: FIPS mode, capacity, concurrency, password
	// hashing cost.
	Policy hsm.Policy
}

// LocalHSMs is the Opener of HSMs that are bbolt files (hsm/node) in the
// cluster directory: DIR/HSM-ID.db and its audit log beside it. It is the
// default.
type LocalHSMs struct{}

var _ Member = (*node.Node)(nil)

// localPath is the bbolt file of HSM id in dir.
func localPath(dir, id string) string { return filepath.Join(dir, id+".db") }

// Create makes the bbolt file of a new HSM.
func (LocalHSMs) Create(dir string, s MemberSpec) (Member, error) {
	return node.Create(localPath(dir, s.ID), node.Options{
		ID:               s.ID,
		AZ:               s.AZ,
		Lineage:          s.Lineage,
		LineageSecret:    s.LineageSecret,
		FIPS:             s.Policy.FIPS,
		KeyCapacity:      s.Policy.KeyCapacity,
		MaxConcurrentOps: s.Policy.MaxConcurrentOps,
		KDFIterations:    s.Policy.KDFIterations,
	})
}

// Open opens the bbolt file of an HSM.
func (LocalHSMs) Open(dir string, s MemberSpec, timeout time.Duration) (Member, error) {
	return node.Open(localPath(dir, s.ID), node.OpenOptions{Timeout: timeout, KDFIterations: s.Policy.KDFIterations})
}

// Remove deletes an HSM's bbolt file and audit log.
func (LocalHSMs) Remove(dir, id string) error {
	var errs []error
	for _, p := range []string{localPath(dir, id), node.AuditPath(localPath(dir, id))} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove HSM %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}
