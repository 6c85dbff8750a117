package cluster

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// SyncReport says what an anti-entropy pass did.
type SyncReport struct {
	KeysCopied  int      `json:"keys-copied"`
	KeysDeleted int      `json:"keys-deleted"` // deleted while an HSM was away, now deleted there too
	UsersCopied int      `json:"users-copied"`
	Problems    []string `json:"problems,omitempty"` // HSMs not reached, copies that failed
}

// syncConcurrency bounds the masked copies a Sync runs at once.
const syncConcurrency = 16

// Sync is the server-side anti-entropy pass: it asks every HSM (including
// those marked down, which it clears if they answer) for its token keys and
// users, copies missing keys as masked objects and missing users as
// records, and deletes keys deleted while an HSM was away. It is safe to
// repeat.
func (c *Cluster) Sync(ctx context.Context) (SyncReport, error) {
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	return c.sync(ctx)
}

func (c *Cluster) sync(ctx context.Context) (SyncReport, error) {
	var rep SyncReport
	members := c.memberList()
	type state struct {
		keys  map[hsm.KeyRef]bool
		users map[string]hsm.UserRecord
		err   error
	}
	states := make([]state, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		if m.forcedDown.Load() {
			states[i].err = fmt.Errorf("HSM %s is down", m.id)
			continue
		}
		wg.Go(func() {
			st := state{keys: map[hsm.KeyRef]bool{}, users: map[string]hsm.UserRecord{}}
			var keys []hsm.KeyInfo
			st.err = c.call(ctx, m, func(ctx context.Context) (err error) {
				keys, err = m.m.PeerListKeys(ctx)
				return err
			})
			if st.err == nil {
				var users []hsm.UserRecord
				st.err = c.call(ctx, m, func(ctx context.Context) (err error) {
					users, err = m.m.PeerUsers(ctx)
					return err
				})
				for _, u := range users {
					st.users[u.Name] = u
				}
			}
			for _, k := range keys {
				if k.Attrs.Token {
					st.keys[k.Ref] = true
				}
			}
			if st.err == nil {
				c.markUp(m)
			}
			states[i] = st
		})
	}
	wg.Wait()

	c.mu.RLock()
	deleted := slices.Clone(c.cfg.Deleted)
	c.mu.RUnlock()

	var live []int
	for i, st := range states {
		if st.err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("HSM %s not synced: %v", members[i].id, st.err))
			continue
		}
		live = append(live, i)
	}
	if len(live) == 0 {
		return rep, hsm.Errorf(hsm.CodeUnavailable, "sync", 0, "cluster %s: no HSM answered", c.clusterID())
	}

	// Keys deleted while an HSM was away are deleted there, not copied back.
	tomb := map[hsm.KeyRef]bool{}
	for _, ref := range deleted {
		tomb[ref] = true
	}
	type job struct {
		ref      hsm.KeyRef
		src, dst *member
		del      bool
	}
	var jobs []job
	union := map[hsm.KeyRef]int{} // ref → index of a live HSM holding it
	for _, i := range live {
		for ref := range states[i].keys {
			if tomb[ref] {
				jobs = append(jobs, job{ref: ref, dst: members[i], del: true})
				continue
			}
			if _, ok := union[ref]; !ok {
				union[ref] = i
			}
		}
	}
	refs := make([]hsm.KeyRef, 0, len(union))
	for ref := range union {
		refs = append(refs, ref)
	}
	slices.Sort(refs)
	for _, ref := range refs {
		for _, i := range live {
			if !states[i].keys[ref] {
				jobs = append(jobs, job{ref: ref, src: members[union[ref]], dst: members[i]})
			} else {
				c.keys.add(ref, members[i].id)
			}
		}
	}

	var mu sync.Mutex
	failed := map[string]bool{} // live HSMs that did not get everything
	sem := make(chan struct{}, syncConcurrency)
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var err error
			if j.del {
				err = c.call(ctx, j.dst, func(ctx context.Context) error { return j.dst.m.PeerDeleteKey(ctx, j.ref) })
				if hsm.CodeOf(err) == hsm.CodeNotFound {
					err = nil
				}
			} else {
				err = c.copyKey(ctx, j.src, j.dst, j.ref)
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				rep.Problems = append(rep.Problems, fmt.Sprintf("key %s on HSM %s: %v", j.ref, j.dst.id, err))
				failed[j.dst.id] = true
			case j.del:
				rep.KeysDeleted++
				c.keys.removeFrom(j.ref, j.dst.id)
			default:
				rep.KeysCopied++
				c.keys.add(j.ref, j.dst.id)
			}
		})
	}
	wg.Wait()

	// Users missing on an HSM are copied from one that has them.
	names := map[string]hsm.UserRecord{}
	for _, i := range live {
		for name, u := range states[i].users {
			if _, ok := names[name]; !ok {
				names[name] = u
			}
		}
	}
	sortedNames := make([]string, 0, len(names))
	for n := range names {
		sortedNames = append(sortedNames, n)
	}
	sort.Strings(sortedNames)
	for _, name := range sortedNames {
		for _, i := range live {
			if _, ok := states[i].users[name]; ok {
				continue
			}
			m := members[i]
			err := c.call(ctx, m, func(ctx context.Context) error { return m.m.PeerPutUser(ctx, names[name]) })
			if err != nil {
				rep.Problems = append(rep.Problems, fmt.Sprintf("user %s on HSM %s: %v", name, m.id, err))
				failed[m.id] = true
				continue
			}
			rep.UsersCopied++
		}
	}

	// HSMs that got everything are no longer behind.
	c.mu.RLock()
	behind := slices.Clone(c.cfg.Behind)
	c.mu.RUnlock()
	var caughtUp []string
	for _, i := range live {
		if id := members[i].id; slices.Contains(behind, id) && !failed[id] {
			caughtUp = append(caughtUp, id)
		}
	}
	if len(caughtUp) > 0 {
		if err := c.updateConfig(func(cfg *config) {
			cfg.Behind = slices.DeleteFunc(cfg.Behind, func(id string) bool { return slices.Contains(caughtUp, id) })
		}); err != nil {
			rep.Problems = append(rep.Problems, err.Error())
		}
	}

	// Tombstones can go once every HSM of the cluster has been cleaned.
	if len(live) == len(members) && len(deleted) > 0 && len(rep.Problems) == 0 {
		if err := c.updateConfig(func(cfg *config) {
			cfg.Deleted = slices.DeleteFunc(cfg.Deleted, func(r hsm.KeyRef) bool { return slices.Contains(deleted, r) })
		}); err != nil {
			rep.Problems = append(rep.Problems, err.Error())
		}
	}
	sort.Strings(rep.Problems)
	return rep, nil
}

// copyKey copies one key from src to dst as a masked object.
func (c *Cluster) copyKey(ctx context.Context, src, dst *member, ref hsm.KeyRef) error {
	var blob []byte
	if err := c.call(ctx, src, func(ctx context.Context) (err error) {
		blob, err = src.m.PeerExportMasked(ctx, ref)
		return err
	}); err != nil {
		return fmt.Errorf("export from HSM %s: %w", src.id, err)
	}
	return c.call(ctx, dst, func(ctx context.Context) error {
		_, err := dst.m.PeerInsertMasked(ctx, blob)
		return err
	})
}
