package cluster

import (
	"context"
	"slices"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// The key availability quorum at creation and use: a token key is made
// only if it can reach 2 HSMs, and a key found on one HSM while another is
// reachable is copied there before the call goes on (CloudHSM's
// synchronisation "requires no management"). HSMs that miss a change are
// remembered in cluster.json as behind, and Open syncs them once they are
// back.

// checkCreate refuses, before anything is made, a token key that cannot
// reach 2 HSMs because the others are recorded as down.
func (c *Cluster) checkCreate(op string) error {
	if !c.policy().KeyAvailabilityCheck {
		return nil
	}
	var down []string
	up := 0
	for _, m := range c.memberList() {
		if m.forcedDown.Load() {
			down = append(down, m.id)
		} else {
			up++
		}
	}
	if up >= 2 {
		return nil
	}
	c.stats.quorum.Add(1)
	return hsm.QuorumCreateError(op, 0, down)
}

// settleCreate makes sure the new token keys refs reach 2 HSMs; if one
// does not, every key of the call is deleted again (so that a retry makes
// no twin) and the quorum error returned.
func (c *Cluster) settleCreate(ctx context.Context, op string, refs []hsm.KeyRef) error {
	if !c.policy().KeyAvailabilityCheck {
		return nil
	}
	for _, ref := range refs {
		if c.spread(ctx, ref) < 2 {
			c.stats.quorum.Add(1)
			var down []string
			for _, m := range c.memberList() {
				if !c.isLive(m) {
					down = append(down, m.id)
				}
			}
			c.undoCreate(context.WithoutCancel(ctx), refs) // undo even when the caller gave up
			return hsm.QuorumCreateError(op, ref, down)
		}
	}
	return nil
}

// spread copies a token key held by fewer than every HSM from a holder to
// every HSM not recorded as down that lacks it, trying HSMs set aside after
// an unavailable answer too, and returns how many HSMs then hold it.
func (c *Cluster) spread(ctx context.Context, ref hsm.KeyRef) int {
	holders, _ := c.keys.get(ref)
	if len(holders) == 0 {
		return 0
	}
	src := c.memberByID(holders[0])
	var wg sync.WaitGroup
	for _, m := range c.memberList() {
		if src == nil || m.forcedDown.Load() || slices.Contains(holders, m.id) {
			continue
		}
		wg.Go(func() {
			if err := c.copyKey(ctx, src, m, ref); err != nil {
				c.stats.cloneFailures.Add(1)
				return
			}
			c.stats.clones.Add(1)
			c.keys.add(ref, m.id)
		})
	}
	wg.Wait()
	holders, _ = c.keys.get(ref)
	return len(holders)
}

// undoCreate deletes keys a refused create made, wherever they are. A key
// an HSM holding it could not delete is recorded as deleted and that HSM as
// behind: listings leave the key out, the next create deletes it there once
// the HSM is back (finishDeletes), and so does Sync.
func (c *Cluster) undoCreate(ctx context.Context, refs []hsm.KeyRef) {
	var left []hsm.KeyRef
	var missed []string
	for _, ref := range refs {
		holders, _ := c.keys.get(ref)
		for _, id := range holders {
			m := c.memberByID(id)
			if m == nil {
				continue
			}
			err := c.call(ctx, m, func(ctx context.Context) error { return m.m.PeerDeleteKey(ctx, ref) })
			if err != nil && hsm.CodeOf(err) != hsm.CodeNotFound {
				left = append(left, ref)
				missed = append(missed, id)
			}
		}
		c.keys.remove(ref)
	}
	if len(missed) > 0 {
		c.markBehind(missed...)
	}
	if len(left) > 0 {
		_ = c.updateConfig(func(cfg *config) {
			for _, ref := range left {
				if !slices.Contains(cfg.Deleted, ref) {
					cfg.Deleted = append(cfg.Deleted, ref)
				}
			}
		})
	}
}

// markBehind records HSMs that missed a change, so that the next Open
// syncs them once they are back. It writes cluster.json only when the set
// grows.
func (c *Cluster) markBehind(ids ...string) {
	c.mu.RLock()
	var add []string
	for _, id := range ids {
		if !slices.Contains(c.cfg.Behind, id) && !slices.Contains(add, id) {
			add = append(add, id)
		}
	}
	c.mu.RUnlock()
	if len(add) == 0 {
		return
	}
	_ = c.updateConfig(func(cfg *config) {
		for _, id := range add {
			if !slices.Contains(cfg.Behind, id) {
				cfg.Behind = append(cfg.Behind, id)
			}
		}
		slices.Sort(cfg.Behind)
	})
}

// missedBy returns the HSMs other than those in have that a change to
// every HSM did not reach.
func (c *Cluster) missedBy(have []string) []string {
	var out []string
	for _, m := range c.memberList() {
		if !slices.Contains(have, m.id) {
			out = append(out, m.id)
		}
	}
	return out
}

// syncReturned runs Sync at Open when an HSM recorded as behind is no
// longer recorded as down. A failure is not Open's: the HSMs stay behind
// and the next Open or Sync tries again.
func (c *Cluster) syncReturned(ctx context.Context) {
	c.mu.RLock()
	behind := slices.Clone(c.cfg.Behind)
	c.mu.RUnlock()
	back := false
	for _, id := range behind {
		if m := c.memberByID(id); m != nil && !m.forcedDown.Load() {
			back = true
		}
	}
	if back {
		_, _ = c.Sync(ctx)
	}
}
