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
//
// A masked object keeps its handle, so inserting one again can make the
// very key a record names (revive then strikes the record). A pass of
// finishDeletes must not run between such an insert and its revive, or it
// would delete the key just made: token creates hold tombs.gate for
// reading from before they make keys until they are settled, and a pass
// that deletes anything holds it for writing.

// tombs is what a cluster knows of deleted-keys beyond cluster.json.
type tombs struct {
	gate sync.RWMutex // read: a token create in progress; write: a pass that deletes

	mu      sync.Mutex
	cleaned map[hsm.KeyRef]map[string]bool // HSMs known to be clean of a recorded key
}

// holdCreate marks a token create in progress until the returned function
// is called.
func (c *Cluster) holdCreate() (release func()) {
	c.tombs.gate.RLock()
	return c.tombs.gate.RUnlock
}

// finishDeletes deletes each key recorded as deleted on every live HSM not
// yet known to be clean of it; with again, on every live HSM (a key
// recorded as deleted can be copied back to a clean HSM from one that was
// away, by the daemons' own synchronisation, and a create that collides
// with an id is the sign). It runs before a token create, not within one,
// and waits for the creates in progress only when there is something to
// delete. A failure leaves the key for the next pass or Sync. Which HSMs
// are clean is kept in memory only: Sync, which removes the record once
// every HSM is clean, is what makes it durable.
func (c *Cluster) finishDeletes(ctx context.Context, again bool) {
	if !c.anyDeleted() {
		return
	}
	if !again && len(c.deleteJobs(false)) == 0 {
		return
	}
	c.tombs.gate.Lock()
	defer c.tombs.gate.Unlock()
	jobs := c.deleteJobs(again) // again: the creates that held the gate may have changed them
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
			c.tombs.mu.Lock()
			defer c.tombs.mu.Unlock()
			if c.tombs.cleaned[j.ref] == nil {
				c.tombs.cleaned[j.ref] = map[string]bool{}
			}
			c.tombs.cleaned[j.ref][j.m.id] = true
		})
	}
	wg.Wait()
}

// deleteJob is one delete of a recorded key on one HSM.
type deleteJob struct {
	ref hsm.KeyRef
	m   *member
}

// deleteJobs lists the deletes a pass of finishDeletes would make, after
// dropping what it knew of keys no longer recorded (Sync removed them) or,
// with forget, of every key.
func (c *Cluster) deleteJobs(forget bool) []deleteJob {
	deleted := c.deletedSet()
	c.tombs.mu.Lock()
	defer c.tombs.mu.Unlock()
	if forget || c.tombs.cleaned == nil {
		c.tombs.cleaned = map[hsm.KeyRef]map[string]bool{}
	}
	for ref := range c.tombs.cleaned {
		if !deleted[ref] {
			delete(c.tombs.cleaned, ref)
		}
	}
	var jobs []deleteJob
	for _, m := range c.memberList() {
		if !c.isLive(m) {
			continue
		}
		for ref := range deleted {
			if !c.tombs.cleaned[ref][m.id] {
				jobs = append(jobs, deleteJob{ref, m})
			}
		}
	}
	return jobs
}

// revive removes refs from the keys recorded as deleted: a masked object
// keeps its handle, so inserting one again (the retry of an insert that
// was undone, or a key deleted and then copied back from a clone) makes
// the very key the record is about, and Sync must not delete it. A copy
// still on an HSM that was away is that same key. It runs within the
// create (see holdCreate).
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
	c.tombs.mu.Lock()
	for _, ref := range back {
		delete(c.tombs.cleaned, ref)
	}
	c.tombs.mu.Unlock()
	if err := c.updateConfig(func(cfg *config) {
		cfg.Deleted = slices.DeleteFunc(cfg.Deleted, func(r hsm.KeyRef) bool { return slices.Contains(back, r) })
	}); err != nil {
		return fmt.Errorf("key %s was made again, but its earlier deletion could not be struck from cluster.json, so a sync would delete it: %w", back[0], err)
	}
	return nil
}

// anyDeleted reports whether keys are recorded as deleted.
func (c *Cluster) anyDeleted() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.cfg.Deleted) > 0
}

// deletedSet returns the keys recorded as deleted, for lookups; nil when
// there are none.
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
