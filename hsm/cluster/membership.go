package cluster

import (
	"context"
	"fmt"
	"slices"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
)

// AddHSM adds an HSM in availability zone az (default: the zone with the
// fewest HSMs of the cluster's zones). It takes a backup first, fills the
// new HSM from it, then syncs, as CloudHSM does. A cluster whose key
// availability check was off only because it had one HSM gets the check
// at its second HSM.
func (c *Cluster) AddHSM(ctx context.Context, az string) (hsm.HSMInfo, error) {
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	info, snap, err := c.backup(ctx, "")
	if err != nil {
		return hsm.HSMInfo{}, fmt.Errorf("add HSM: backup first: %w", err)
	}
	src := c.memberByID(info.SourceHSM)
	if src == nil {
		return hsm.HSMInfo{}, fmt.Errorf("add HSM: HSM %s left the cluster during the backup", info.SourceHSM)
	}
	secret, err := c.lineageSecret(src)
	if err != nil {
		return hsm.HSMInfo{}, fmt.Errorf("add HSM: %w", err)
	}
	defer clear(secret)
	c.mu.RLock()
	cfg := c.cfg.clone()
	c.mu.RUnlock()
	if az == "" {
		az = leastUsedAZ(cfg)
	}
	h := hsmConfig{ID: "hsm-" + randomID(), AZ: az}
	m, err := c.createMember(cfg, h, secret)
	if err != nil {
		return hsm.HSMInfo{}, err
	}
	if err := m.RestoreSnapshot(ctx, snap); err != nil {
		m.Close()
		c.opener.Remove(c.dir, h.ID)
		return hsm.HSMInfo{}, fmt.Errorf("add HSM %s: restore backup %s: %w", h.ID, info.ID, err)
	}
	c.mu.Lock()
	c.members = append(c.members, &member{id: h.ID, az: h.AZ, m: m})
	c.cfg.HSMs = append(c.cfg.HSMs, h)
	if c.cfg.OneHSMCheckOff && len(c.cfg.HSMs) > 1 {
		c.cfg.OneHSMCheckOff = false
		c.cfg.Policy.KeyAvailabilityCheck = true
	}
	c.mu.Unlock()
	if err := c.saveConfig(); err != nil {
		return hsm.HSMInfo{}, err
	}
	if _, err := c.sync(ctx); err != nil {
		return hsm.HSMInfo{ID: h.ID, AZ: h.AZ, State: "active"}, fmt.Errorf("add HSM %s: added, but sync failed (run keymig hsm sync): %w", h.ID, err)
	}
	return hsm.HSMInfo{ID: h.ID, AZ: h.AZ, State: "active"}, nil
}

// RemoveHSM takes a backup, then removes HSM id from the cluster and
// deletes its files. The last HSM cannot be removed.
func (c *Cluster) RemoveHSM(ctx context.Context, id string) error {
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	m := c.memberByID(id)
	if m == nil {
		c.mu.RLock()
		_, err := c.cfg.selectHSMs(id)
		c.mu.RUnlock()
		return err
	}
	if len(c.memberList()) == 1 {
		return hsm.Errorf(hsm.CodeInvalidInput, "remove-hsm", 0, "HSM %s is the last HSM of cluster %s; a cluster needs one", id, c.clusterID())
	}
	if _, _, err := c.backup(ctx, ""); err != nil {
		return fmt.Errorf("remove HSM %s: backup first: %w", id, err)
	}
	c.mu.Lock()
	c.members = slices.DeleteFunc(c.members, func(x *member) bool { return x == m })
	c.cfg.HSMs = slices.DeleteFunc(c.cfg.HSMs, func(h hsmConfig) bool { return h.ID == id })
	c.mu.Unlock()
	if err := c.saveConfig(); err != nil {
		return err
	}
	c.keys.dropHSM(id)
	if err := m.m.Close(); err != nil {
		return fmt.Errorf("remove HSM %s: %w", id, err)
	}
	if err := c.opener.Remove(c.dir, id); err != nil {
		return err
	}
	if fs, err := Faults(c.dir); err == nil {
		if _, ok := fs[id]; ok {
			delete(fs, id)
			_ = writeJSONAtomic(c.dir+"/"+faultsFile, fs, 0o644)
		}
	}
	return atomicfile.SyncDir(c.dir)
}

func leastUsedAZ(cfg config) string {
	count := map[string]int{}
	var order []string
	for _, h := range cfg.HSMs {
		if _, ok := count[h.AZ]; !ok {
			order = append(order, h.AZ)
		}
		count[h.AZ]++
	}
	for _, az := range defaultAZs(cfg.Region, nil) {
		if _, ok := count[az]; !ok {
			order = append(order, az)
			count[az] = 0
		}
	}
	best := order[0]
	for _, az := range order {
		if count[az] < count[best] {
			best = az
		}
	}
	return best
}
