package cluster

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// replicate copies the token keys refs from src to every other reachable
// HSM as masked objects, exported from src unless fresh has them (src
// answered the call that made them with them). A copy that fails leaves
// the key with partial coverage, which ListKeys reports and Sync repairs;
// the quorum keeps the key from being used until it is on 2 HSMs.
func (c *Cluster) replicate(ctx context.Context, src *member, refs []hsm.KeyRef, fresh *hsm.MaskedCopies) {
	var others []*member
	var skipped []string
	for _, m := range c.memberList() {
		switch {
		case m == src:
		case c.isLive(m):
			others = append(others, m)
		default:
			skipped = append(skipped, m.id)
		}
	}
	defer func() { c.markBehind(skipped...) }()
	if len(others) == 0 {
		return
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, ref := range refs {
		blob, ok := fresh.Take(ref)
		var err error
		if !ok {
			err = c.call(ctx, src, func(ctx context.Context) (err error) {
				blob, err = src.m.PeerExportMasked(ctx, ref)
				return err
			})
		}
		if err != nil {
			c.stats.cloneFailures.Add(int64(len(others)))
			for _, m := range others {
				skipped = append(skipped, m.id)
			}
			continue
		}
		for _, m := range others {
			wg.Go(func() {
				err := c.call(ctx, m, func(ctx context.Context) error {
					_, err := m.m.PeerInsertMasked(ctx, blob)
					return err
				})
				if err != nil {
					c.stats.cloneFailures.Add(1)
					mu.Lock()
					skipped = append(skipped, m.id)
					mu.Unlock()
					return
				}
				c.stats.clones.Add(1)
				c.keys.add(ref, m.id)
			})
		}
	}
	wg.Wait()
}

// coverageOf is a token key's coverage as the key map knows it.
func (c *Cluster) coverageOf(ref hsm.KeyRef) hsm.Coverage {
	holders, _ := c.keys.get(ref)
	cov := hsm.Coverage{HSMs: slices.Clone(holders)}
	for _, m := range c.memberList() {
		switch {
		case slices.Contains(holders, m.id):
		case !c.isLive(m):
			cov.Unreachable = append(cov.Unreachable, m.id)
		default:
			cov.Missing = append(cov.Missing, m.id)
		}
	}
	return cov
}

// perHSM runs fn with the user's session on every reachable HSM at once and
// returns the answers by HSM id; HSMs that fail are left out, and the first
// error other than unavailability is returned if no HSM answered.
func (s *session) perHSM(ctx context.Context, fn func(ctx context.Context, m *member, ms hsm.FullSession) error) (map[string]bool, error) {
	var w waitForHSM
	for {
		ok, err := s.perHSMOnce(ctx, fn)
		if err == nil || hsm.CodeOf(err) != hsm.CodeUnavailable || !s.c.await(ctx, &w) {
			return ok, err
		}
	}
}

func (s *session) perHSMOnce(ctx context.Context, fn func(ctx context.Context, m *member, ms hsm.FullSession) error) (map[string]bool, error) {
	members := s.c.liveMembers()
	errs := make([]error, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Go(func() {
			ms, err := s.sessionFor(ctx, m, false)
			if err == nil {
				err = s.c.call(ctx, m, func(ctx context.Context) error { return fn(ctx, m, ms) })
			}
			errs[i] = err
		})
	}
	wg.Wait()
	ok := map[string]bool{}
	var firstErr error
	for i, err := range errs {
		if err == nil {
			ok[members[i].id] = true
		} else if firstErr == nil || hsm.CodeOf(firstErr) == hsm.CodeUnavailable {
			firstErr = err
		}
	}
	if len(ok) == 0 {
		if firstErr == nil {
			firstErr = hsm.Errorf(hsm.CodeUnavailable, "", 0, "cluster %s has no reachable HSM", s.c.clusterID())
		}
		return nil, firstErr
	}
	return ok, nil
}

// ListKeys merges the listings of every reachable HSM: each key appears once
// with its coverage (which HSMs hold it, which lack it, and which
// attributes or shares differ between copies).
func (s *session) ListKeys(ctx context.Context, f hsm.Filter) ([]hsm.KeyInfo, error) {
	var w waitForHSM
	for {
		var mu sync.Mutex
		listings := map[string][]hsm.KeyInfo{}
		answered, err := s.perHSM(ctx, func(ctx context.Context, m *member, ms hsm.FullSession) error {
			keys, err := ms.ListKeys(ctx, f)
			if err != nil {
				return err
			}
			mu.Lock()
			listings[m.id] = keys
			mu.Unlock()
			return nil
		})
		if err != nil {
			return nil, err
		}
		if err := s.c.checkSuspects(answered); err != nil {
			if s.c.await(ctx, &w) {
				continue
			}
			return nil, err
		}
		return s.c.merge(listings, answered), nil
	}
}

// GetKey returns one key with its coverage, asking every reachable HSM. A
// key held only by HSMs that do not answer is waited for (see await).
func (s *session) GetKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	var w waitForHSM
	for {
		k, err := s.getKey(ctx, ref)
		var silent *silentHolders
		if !errors.As(err, &silent) || !s.c.await(ctx, &w) {
			return k, err
		}
	}
}

// silentHolders is GetKey's error when only HSMs that do not answer hold
// the key.
type silentHolders struct{ err *hsm.Error }

func (e *silentHolders) Error() string { return e.err.Error() }
func (e *silentHolders) Unwrap() error { return e.err }

func (s *session) getKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	var mu sync.Mutex
	listings := map[string][]hsm.KeyInfo{}
	var notFound error
	answered, err := s.perHSM(ctx, func(ctx context.Context, m *member, ms hsm.FullSession) error {
		ki, err := ms.GetKey(ctx, ref)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err == nil:
			listings[m.id] = []hsm.KeyInfo{ki}
		case hsm.CodeOf(err) == hsm.CodeNotFound:
			if notFound == nil {
				notFound = err
			}
			listings[m.id] = nil
		default:
			return err
		}
		return nil
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	keys := s.c.merge(listings, answered)
	if len(keys) == 0 {
		// Not found on the HSMs that answered is not "not found" if the
		// key map says an HSM that did not answer holds it.
		if holders, _ := s.c.keys.get(ref); len(holders) > 0 {
			var silent []string
			for _, id := range holders {
				if !answered[id] {
					silent = append(silent, id)
				}
			}
			if len(silent) > 0 {
				return hsm.KeyInfo{}, &silentHolders{hsm.Errorf(hsm.CodeUnavailable, "get", ref, "the key is held by HSM %s, which is not answering; try again when it is back", strings.Join(silent, ", "))}
			}
		}
		if notFound == nil {
			notFound = hsm.Errorf(hsm.CodeNotFound, "get", ref, "no such key")
		}
		return hsm.KeyInfo{}, notFound
	}
	k := keys[0]
	if k.Attrs.Token && len(k.Coverage.HSMs) > 0 && s.repair(ctx, ref, listings, answered) {
		cov := s.c.coverageOf(ref)
		cov.Inconsistent = k.Coverage.Inconsistent
		k.Coverage = cov
	}
	return k, nil
}

// repair copies a token key that some answering HSMs hold and others lack
// to those others, as the client's key sync would have done had it not been
// interrupted (a process killed between creating a key and cloning it). It
// reports whether it copied anything.
func (s *session) repair(ctx context.Context, ref hsm.KeyRef, listings map[string][]hsm.KeyInfo, answered map[string]bool) bool {
	var holder *member
	missing := false
	for id := range answered {
		if len(listings[id]) > 0 {
			if holder == nil {
				holder = s.c.memberByID(id)
			}
		} else {
			missing = true
		}
	}
	if holder == nil || !missing {
		return false
	}
	s.c.replicate(ctx, holder, []hsm.KeyRef{ref}, nil)
	return true
}

// merge combines per-HSM listings into one list ordered by handle, with
// coverage, and updates the key map with what the HSMs said. A key this
// cluster deleted (or undid after a refused create) while an HSM that holds
// it could not be reached is left out: it is deleted, and Sync deletes it
// there. Listing it would let a caller adopt it as its own (migrate looks
// on the target before it makes a key again) and lose it at that Sync.
func (c *Cluster) merge(listings map[string][]hsm.KeyInfo, answered map[string]bool) []hsm.KeyInfo {
	type entry struct {
		info   hsm.KeyInfo
		copies map[string]hsm.KeyInfo
	}
	if deleted := c.deletedSet(); deleted != nil {
		for id, keys := range listings {
			listings[id] = slices.DeleteFunc(slices.Clone(keys), func(k hsm.KeyInfo) bool { return deleted[k.Ref] })
		}
	}
	byRef := map[hsm.KeyRef]*entry{}
	ids := make([]string, 0, len(listings))
	for id := range listings {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		for _, k := range listings[id] {
			e := byRef[k.Ref]
			if e == nil {
				e = &entry{info: k, copies: map[string]hsm.KeyInfo{}}
				byRef[k.Ref] = e
			}
			e.copies[id] = k
		}
	}
	members := c.memberList()
	out := make([]hsm.KeyInfo, 0, len(byRef))
	for ref, e := range byRef {
		k := e.info
		var cov hsm.Coverage
		if !k.Attrs.Token {
			for id := range e.copies {
				cov.HSMs = append(cov.HSMs, id)
			}
		} else {
			known, _ := c.keys.get(ref)
			for _, m := range members {
				_, has := e.copies[m.id]
				switch {
				case has:
					cov.HSMs = append(cov.HSMs, m.id)
					c.keys.add(ref, m.id)
				case !answered[m.id] && slices.Contains(known, m.id):
					// Unreachable now; the key map says it holds the key.
					cov.HSMs = append(cov.HSMs, m.id)
				case !answered[m.id]:
					cov.Unreachable = append(cov.Unreachable, m.id)
				default:
					cov.Missing = append(cov.Missing, m.id)
				}
			}
		}
		sort.Strings(cov.HSMs)
		cov.Inconsistent = differences(e.copies)
		k.Coverage = cov
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}

// differences names the fields that differ between copies of one key.
func differences(copies map[string]hsm.KeyInfo) []string {
	if len(copies) < 2 {
		return nil
	}
	ids := make([]string, 0, len(copies))
	for id := range copies {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	ref := copies[ids[0]]
	seen := map[string]bool{}
	for _, id := range ids[1:] {
		k := copies[id]
		for _, a := range ref.Attrs.Diff(k.Attrs) {
			seen[string(a)] = true
		}
		if !sameSet(ref.SharedWith, k.SharedWith) {
			seen["shared-users"] = true
		}
		if ref.Label != k.Label {
			seen["label"] = true
		}
		if !bytes.Equal(ref.ID, k.ID) {
			seen["id"] = true
		}
		if !bytes.Equal(ref.KCV, k.KCV) {
			seen["check-value"] = true
		}
		if ref.Owner != k.Owner {
			seen["owner"] = true
		}
	}
	if len(seen) == 0 {
		return nil
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	x, y := slices.Clone(a), slices.Clone(b)
	sort.Strings(x)
	sort.Strings(y)
	return slices.Equal(x, y)
}
