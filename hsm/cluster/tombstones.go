package cluster

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// A token key deleted (or undone after a refused create) while an HSM
// that may hold it could not be reached is recorded in cluster.json's
// deleted-keys, and Sync deletes it there later. Until then the key is
// still on that HSM: listings leave it out (see merge), so that no caller
// adopts a key it was told was not made, and finishDeletes deletes it
// before the next create, so that a retry of the refused create does not
// collide with the id the undone key still holds.

// finishDeletes deletes each key recorded as deleted on every live HSM not
// yet known to be clean of it. It runs before a create when keys are
// recorded; creates wait for a pass in progress, as the pass may be what
// lets them make their key. A failure leaves the key for the next pass or
// Sync. Which HSMs are clean is kept in memory only: Sync, which removes
// the record once every HSM is clean, is what makes it durable.
func (c *Cluster) finishDeletes(ctx context.Context) {
	c.mu.RLock()
	pending := len(c.cfg.Deleted)
	c.mu.RUnlock()
	if pending == 0 {
		return
	}
	c.tombMu.Lock()
	defer c.tombMu.Unlock()
	c.mu.RLock()
	deleted := make(map[hsm.KeyRef]bool, len(c.cfg.Deleted))
	for _, ref := range c.cfg.Deleted {
		deleted[ref] = true
	}
	c.mu.RUnlock()
	if c.cleaned == nil {
		c.cleaned = map[hsm.KeyRef]map[string]bool{}
	}
	for ref := range c.cleaned {
		if !deleted[ref] {
			delete(c.cleaned, ref) // Sync removed the record
		}
	}
	type job struct {
		ref hsm.KeyRef
		m   *member
	}
	var jobs []job
	for _, m := range c.memberList() {
		if !c.isLive(m) {
			continue
		}
		for ref := range deleted {
			if !c.cleaned[ref][m.id] {
				jobs = append(jobs, job{ref, m})
			}
		}
	}
	if len(jobs) == 0 {
		return
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, syncConcurrency)
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			err := c.call(ctx, j.m, func(ctx context.Context) error { return j.m.m.PeerDeleteKey(ctx, j.ref) })
			if err != nil && hsm.CodeOf(err) != hsm.CodeNotFound {
				return
			}
			c.keys.removeFrom(j.ref, j.m.id)
			mu.Lock()
			defer mu.Unlock()
			if c.cleaned[j.ref] == nil {
				c.cleaned[j.ref] = map[string]bool{}
			}
			c.cleaned[j.ref][j.m.id] = true
		})
	}
	wg.Wait()
}

// forgetCleaned drops what finishDeletes knows of clean HSMs, so that its
// next pass tries every live HSM again: a key recorded as deleted can be
// copied back to a clean HSM from one that was away (the daemons' own
// synchronisation does that), and a create that collides with an id is
// the sign.
func (c *Cluster) forgetCleaned() {
	c.tombMu.Lock()
	c.cleaned = nil
	c.tombMu.Unlock()
}

// revive removes refs from the keys recorded as deleted: a masked object
// keeps its handle, so inserting one again (the retry of an insert that
// was undone, or a key deleted and then copied back from a clone) makes
// the very key the record is about, and Sync must not delete it. A copy
// still on an HSM that was away is that same key.
func (c *Cluster) revive(refs []hsm.KeyRef) error {
	deleted := c.deletedSet()
	var back []hsm.KeyRef
	for _, ref := range refs {
		if deleted[ref] {
			back = append(back, ref)
		}
	}
	if len(back) == 0 {
		return nil
	}
	c.tombMu.Lock()
	defer c.tombMu.Unlock()
	for _, ref := range back {
		delete(c.cleaned, ref)
	}
	if err := c.updateConfig(func(cfg *config) {
		cfg.Deleted = slices.DeleteFunc(cfg.Deleted, func(r hsm.KeyRef) bool { return slices.Contains(back, r) })
	}); err != nil {
		return fmt.Errorf("key %s was made again, but its earlier deletion could not be struck from cluster.json, so a sync would delete it: %w", back[0], err)
	}
	return nil
}

// deletedSet returns the keys recorded as deleted, for lookups.
func (c *Cluster) deletedSet() map[hsm.KeyRef]bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if len(c.cfg.Deleted) == 0 {
		return nil
	}
	out := make(map[hsm.KeyRef]bool, len(c.cfg.Deleted))
	for _, ref := range c.cfg.Deleted {
		out[ref] = true
	}
	return out
}
