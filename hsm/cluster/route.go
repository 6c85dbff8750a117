package cluster

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
)

// keyMap is the client's knowledge of which HSMs hold which token keys. It
// is built by listing every HSM once and then kept up to date as the
// client creates, copies and deletes keys; a quorum refusal re-checks the
// HSMs, since another process may have copied the key meanwhile.
type keyMap struct {
	mu      sync.RWMutex
	holders map[hsm.KeyRef][]string // sorted HSM ids
	loaded  bool
	pending int // token keys being created, counted against capacity

	loadMu sync.Mutex // one loader at a time
}

func (k *keyMap) init() { k.holders = map[hsm.KeyRef][]string{} }

func (k *keyMap) markLoaded() {
	k.mu.Lock()
	k.loaded = true
	k.mu.Unlock()
}

func (k *keyMap) isLoaded() bool {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.loaded
}

func (k *keyMap) get(ref hsm.KeyRef) ([]string, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	h, ok := k.holders[ref]
	return h, ok
}

func (k *keyMap) count() int {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.holders)
}

func (k *keyMap) add(ref hsm.KeyRef, ids ...string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	h := k.holders[ref]
	for _, id := range ids {
		if !slices.Contains(h, id) {
			h = append(slices.Clone(h), id)
		}
	}
	sort.Strings(h)
	k.holders[ref] = h
}

func (k *keyMap) removeFrom(ref hsm.KeyRef, id string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	h, ok := k.holders[ref]
	if !ok {
		return
	}
	h = slices.DeleteFunc(slices.Clone(h), func(x string) bool { return x == id })
	if len(h) == 0 {
		delete(k.holders, ref)
		return
	}
	k.holders[ref] = h
}

func (k *keyMap) remove(ref hsm.KeyRef) {
	k.mu.Lock()
	delete(k.holders, ref)
	k.mu.Unlock()
}

// dropHSM forgets everything held by a removed HSM.
func (k *keyMap) dropHSM(id string) {
	k.mu.Lock()
	refs := make([]hsm.KeyRef, 0, len(k.holders))
	for ref := range k.holders {
		refs = append(refs, ref)
	}
	k.mu.Unlock()
	for _, ref := range refs {
		k.removeFrom(ref, id)
	}
}

// reserve counts n keys about to be created against the capacity.
func (k *keyMap) reserve(n, capacity int) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if capacity > 0 && len(k.holders)+k.pending+n > capacity {
		return false
	}
	k.pending += n
	return true
}

func (k *keyMap) release(n int) {
	k.mu.Lock()
	k.pending -= n
	k.mu.Unlock()
}

// ensureKeyMap lists every reachable HSM once to learn which token keys
// each holds. Later calls return at once.
func (c *Cluster) ensureKeyMap(ctx context.Context) error {
	if c.keys.isLoaded() {
		return nil
	}
	c.keys.loadMu.Lock()
	defer c.keys.loadMu.Unlock()
	if c.keys.isLoaded() {
		return nil
	}
	listings := c.listAll(ctx)
	if len(listings) == 0 && len(c.liveMembers()) > 0 {
		return hsm.Errorf(hsm.CodeUnavailable, "login", 0, "cluster %s: no HSM answered a key listing", c.clusterID())
	}
	for id, keys := range listings {
		for _, k := range keys {
			c.keys.add(k.Ref, id)
		}
	}
	c.keys.markLoaded()
	return nil
}

// listAll returns PeerListKeys of every live HSM, by HSM id; HSMs that fail
// are marked down and left out.
func (c *Cluster) listAll(ctx context.Context) map[string][]hsm.KeyInfo {
	members := c.liveMembers()
	out := make(map[string][]hsm.KeyInfo, len(members))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range members {
		wg.Go(func() {
			var keys []hsm.KeyInfo
			err := c.call(ctx, m, func(ctx context.Context) (err error) {
				keys, err = m.m.PeerListKeys(ctx)
				return err
			})
			if err != nil {
				return
			}
			mu.Lock()
			out[m.id] = keys
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// isLive reports whether m is worth trying: not recorded as down, and not
// recently found unavailable.
func (c *Cluster) isLive(m *member) bool {
	return !m.forcedDown.Load() && time.Now().UnixNano() >= m.downUntil.Load()
}

func (c *Cluster) liveMembers() []*member {
	var out []*member
	for _, m := range c.memberList() {
		if c.isLive(m) {
			out = append(out, m)
		}
	}
	return out
}

// markDown sets m aside for a while after it answered unavailable or
// timed out; it is tried again afterwards.
func (c *Cluster) markDown(m *member) {
	m.downUntil.Store(time.Now().Add(c.retry.downFor).UnixNano())
	c.stats.markedDown.Add(1)
}

// markUp clears a transient down mark after m answered.
func (c *Cluster) markUp(m *member) {
	if m.downUntil.Load() != 0 {
		m.downUntil.Store(0)
	}
}

// call runs fn against member m, retrying "throttled" answers with
// full-jitter exponential backoff: sleep = random(0, min(cap, base·2^n)),
// ThrottleAttempts tries in all. A throttled answer means the HSM did
// nothing, so this is safe for every operation. Unavailable answers mark m
// down; on, its caller, fails over and waits (see the package doc).
func (c *Cluster) call(ctx context.Context, m *member, fn func(ctx context.Context) error) error {
	p := c.retry
	for attempt := 0; ; attempt++ {
		cctx, cancel := ctx, context.CancelFunc(func() {})
		if p.callTimeout > 0 {
			cctx, cancel = context.WithTimeout(ctx, p.callTimeout)
		}
		m.inflight.Add(1)
		err := fn(cctx)
		m.inflight.Add(-1)
		timedOut := err != nil && cctx.Err() != nil && ctx.Err() == nil
		cancel()
		if err == nil {
			c.markUp(m)
			return nil
		}
		if timedOut {
			c.markDown(m)
			return &callError{err: hsm.Errorf(hsm.CodeUnavailable, "", 0, "HSM %s did not answer within %s", m.id, p.callTimeout), unknownOutcome: true}
		}
		switch hsm.CodeOf(err) {
		case hsm.CodeThrottled:
			c.stats.throttled.Add(1)
			if attempt+1 >= p.attempts {
				return err
			}
			c.stats.retries.Add(1)
			if serr := sleepCtx(ctx, backoff(p, attempt)); serr != nil {
				return err
			}
			continue
		case hsm.CodeUnavailable:
			if ctx.Err() != nil {
				return &callError{err: err, unknownOutcome: true}
			}
			c.markDown(m)
		}
		if ctx.Err() != nil && !isHSMError(err) {
			// The caller gave up while the HSM was working on it.
			return &callError{err: err, unknownOutcome: true}
		}
		return err
	}
}

// waitForHSM is the state of one call waiting for an HSM to come back.
type waitForHSM struct {
	since time.Time
	round int
}

// await sleeps before a call that no HSM could serve (every one down or
// unavailable, so none did anything) tries again, and reports whether it
// should: for up to retry.waitFor from the first time it waits, with
// full-jitter backoff.
func (c *Cluster) await(ctx context.Context, w *waitForHSM) bool {
	p := c.retry
	if w.since.IsZero() {
		w.since = time.Now()
	}
	if time.Since(w.since) >= p.waitFor || ctx.Err() != nil {
		return false
	}
	if sleepCtx(ctx, backoff(retryPolicy{base: p.waitBase, cap: p.waitCap}, w.round)) != nil {
		return false
	}
	w.round++
	c.stats.retries.Add(1)
	return true
}

// callError marks an error after which the HSM may or may not have done
// the operation (it timed out, or the caller gave up while it ran).
type callError struct {
	err            error
	unknownOutcome bool
}

func (e *callError) Error() string { return e.err.Error() }
func (e *callError) Unwrap() error { return e.err }

func outcomeUnknown(err error) bool {
	var ce *callError
	if errors.As(err, &ce) && ce.unknownOutcome {
		return true
	}
	var mu interface{ OutcomeUnknown() bool }
	return errors.As(err, &mu) && mu.OutcomeUnknown()
}

// markSuspect records that HSM id may hold a key whose creation's answer
// was lost (its connection broke, or it timed out): until it answers a
// listing again, listings wait for it, so that a caller looking for that
// key before trying the create again does not miss it and make it twice.
func (c *Cluster) markSuspect(id string) {
	c.suspectMu.Lock()
	defer c.suspectMu.Unlock()
	if c.suspect == nil {
		c.suspect = map[string]bool{}
	}
	c.suspect[id] = true
}

// checkSuspects clears the suspects that answered a listing and returns an
// unavailable error naming one that did not.
func (c *Cluster) checkSuspects(answered map[string]bool) error {
	c.suspectMu.Lock()
	defer c.suspectMu.Unlock()
	var silent []string
	for id := range c.suspect {
		if answered[id] {
			delete(c.suspect, id)
		} else {
			silent = append(silent, id)
		}
	}
	if len(silent) == 0 {
		return nil
	}
	sort.Strings(silent)
	return hsm.Errorf(hsm.CodeUnavailable, "list", 0, "HSM %s may hold a key whose creation's answer was lost, and does not answer: listings wait for it so that no key is made twice; retry once it is back", strings.Join(silent, ", "))
}

func isHSMError(err error) bool {
	var e *hsm.Error
	return errors.As(err, &e)
}

// backoff is the full-jitter sleep before retry number attempt+1.
func backoff(p retryPolicy, attempt int) time.Duration {
	d := p.cap
	if attempt < 30 {
		d = min(p.cap, p.base<<attempt)
	}
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// pick chooses among candidates by the power of two choices on operations
// in flight, preferring HSMs not marked down. It returns nil if none is left.
func (c *Cluster) pick(cands []*member, tried map[string]bool) *member {
	var live, down []*member
	for _, m := range cands {
		if tried[m.id] || m.forcedDown.Load() {
			continue
		}
		if c.isLive(m) {
			live = append(live, m)
		} else {
			down = append(down, m)
		}
	}
	pool := live
	if len(pool) == 0 {
		pool = down
	}
	switch len(pool) {
	case 0:
		return nil
	case 1:
		return pool[0]
	}
	a, b := pool[rand.IntN(len(pool))], pool[rand.IntN(len(pool))]
	if b.inflight.Load() < a.inflight.Load() {
		return b
	}
	return a
}
