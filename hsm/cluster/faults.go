package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
)

// faultsFile records injected faults, so that the next keymig process that
// opens the cluster sees them.
const faultsFile = "faults.json"

// AllHSMs selects every HSM of the cluster in SetFault and ClearFault.
const AllHSMs = "all"

// Fault is a fault injected into one HSM for tests and demos.
type Fault struct {
	Down     bool          `json:"down,omitempty"`      // every call fails as unavailable
	Throttle float64       `json:"throttle,omitempty"`  // fraction of calls answered "throttled"
	Latency  time.Duration `json:"latency,omitempty"`   // added to every call: a network round trip
	FailNext int           `json:"fail-next,omitempty"` // the next N calls fail as unavailable
}

// IsZero reports whether f injects nothing.
func (f Fault) IsZero() bool { return f == Fault{} }

// String describes the fault for listings.
func (f Fault) String() string {
	if f.IsZero() {
		return "none"
	}
	s := ""
	add := func(p string) {
		if s != "" {
			s += " "
		}
		s += p
	}
	if f.Down {
		add("down")
	}
	if f.Throttle > 0 {
		add(fmt.Sprintf("throttle=%g", f.Throttle))
	}
	if f.Latency > 0 {
		add("latency=" + f.Latency.String())
	}
	if f.FailNext > 0 {
		add(fmt.Sprintf("fail-next=%d", f.FailNext))
	}
	return s
}

func (f Fault) node() node.Fault {
	return node.Fault{Down: f.Down, FailNext: f.FailNext, Throttle: f.Throttle, Latency: f.Latency}
}

func (f Fault) validate() error {
	if f.Throttle < 0 || f.Throttle > 1 {
		return hsm.Errorf(hsm.CodeInvalidInput, "fault", 0, "throttle %g: want a fraction between 0 and 1", f.Throttle)
	}
	if f.Latency < 0 || f.FailNext < 0 {
		return hsm.Errorf(hsm.CodeInvalidInput, "fault", 0, "latency and fail-next must not be negative")
	}
	return nil
}

// Faults returns the faults recorded for the cluster at dir, by HSM id.
func Faults(dir string) (map[string]Fault, error) {
	b, err := os.ReadFile(filepath.Join(dir, faultsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]Fault{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read faults of cluster %s: %w", dir, err)
	}
	m := map[string]Fault{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, faultsFile), err)
	}
	return m, nil
}

// SetFault records a fault for HSM hsmID (or AllHSMs) of the cluster at dir,
// to take effect when the cluster is next opened. To change an open
// cluster, use Cluster.SetFault.
func SetFault(dir, hsmID string, f Fault) error {
	if err := f.validate(); err != nil {
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
func ClearFault(dir, hsmID string) error { return SetFault(dir, hsmID, Fault{}) }

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
