package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/keymig/keymig/hsm"
)

// faultsFile records injected faults, so that the next keymig process that
// opens the cluster sees them.
const faultsFile = "faults.json"

// AllHSMs selects every HSM of the cluster in SetFault and ClearFault.
const AllHSMs = "all"

// Faults returns the faults recorded for the cluster at dir, by HSM id.
func Faults(dir string) (map[string]hsm.Fault, error) {
	b, err := os.ReadFile(filepath.Join(dir, faultsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]hsm.Fault{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read faults of cluster %s: %w", dir, err)
	}
	m := map[string]hsm.Fault{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, faultsFile), err)
	}
	return m, nil
}

// SetFault records a fault for HSM hsmID (or AllHSMs) of the cluster at dir,
// to take effect when the cluster is next opened. To change an open
// cluster, use Cluster.SetFault.
func SetFault(dir, hsmID string, f hsm.Fault) error {
	if err := f.Validate(); err != nil {
		return err
	}
	cfg, err := readConfig(dir)
	if err != nil {
		return err
	}
	ids, err := cfg.selectHSMs(hsmID)
	if err != nil {
		return err
	}
	m, err := Faults(dir)
	if err != nil {
		return err
	}
	for _, id := range ids {
		if f.IsZero() {
			delete(m, id)
		} else {
			m[id] = f
		}
	}
	return writeJSONAtomic(filepath.Join(dir, faultsFile), m, 0o644)
}

// ClearFault removes the fault recorded for hsmID (or AllHSMs).
func ClearFault(dir, hsmID string) error { return SetFault(dir, hsmID, hsm.Fault{}) }

// selectHSMs resolves an HSM id or AllHSMs to the ids it names.
func (cfg *config) selectHSMs(hsmID string) ([]string, error) {
	var ids []string
	for _, h := range cfg.HSMs {
		if hsmID == AllHSMs || h.ID == hsmID {
			ids = append(ids, h.ID)
		}
	}
	if len(ids) == 0 {
		known := make([]string, 0, len(cfg.HSMs))
		for _, h := range cfg.HSMs {
			known = append(known, h.ID)
		}
		sort.Strings(known)
		return nil, hsm.Errorf(hsm.CodeNotFound, "", 0, "cluster %s has no HSM %q (it has %v)", cfg.ID, hsmID, known)
	}
	return ids, nil
}
