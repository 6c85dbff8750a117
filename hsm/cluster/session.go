package cluster

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
)

// retryLoginAfter is how long a session waits before trying again to log in
// to an HSM that refused it (for example because the user had not reached
// that HSM yet).
const retryLoginAfter = 2 * time.Second

// session is a user's session on the cluster: one session on every HSM
// that lets the user in, opened at login or later when an HSM comes back.
type session struct {
	c     *Cluster
	creds hsm.Credentials // kept to log in to HSMs that come back; never logged
	user  hsm.User

	mu          sync.Mutex
	byHSM       map[string]hsm.FullSession
	loginFailed map[string]time.Time
	sessionKeys map[hsm.KeyRef]string // session key → the HSM that made it
	closed      bool
}

var _ hsm.FullSession = (*session)(nil)

// Login logs the user in to every reachable HSM of the cluster (users are
// replicated), so that the session can balance load over them. It fails
// only if no HSM lets the user in.
func (c *Cluster) Login(ctx context.Context, cr hsm.Credentials) (hsm.Session, error) {
	c.mu.RLock()
	closed := c.closed
	c.mu.RUnlock()
	if closed {
		return nil, hsm.Errorf(hsm.CodeUnavailable, "login", 0, "cluster %s is closed", c.dir)
	}
	s := &session{c: c, creds: cr, byHSM: map[string]hsm.FullSession{}, loginFailed: map[string]time.Time{}, sessionKeys: map[hsm.KeyRef]string{}}
	members := c.memberList()
	errs := make([]error, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		if m.forcedDown.Load() {
			errs[i] = hsm.Errorf(hsm.CodeUnavailable, "login", 0, "HSM %s is down", m.id)
			continue
		}
		wg.Go(func() {
			_, errs[i] = s.sessionFor(ctx, m, true)
		})
	}
	wg.Wait()
	for i, m := range members {
		if errs[i] == nil {
			s.user = s.byHSM[m.id].User()
			break
		}
	}
	if len(s.byHSM) == 0 {
		// Prefer the HSMs' own verdict (wrong password, locked user) over
		// "unavailable".
		var first error
		for _, err := range errs {
			if err == nil {
				continue
			}
			if first == nil || (hsm.CodeOf(first) == hsm.CodeUnavailable && hsm.CodeOf(err) != hsm.CodeUnavailable) {
				first = err
			}
		}
		if first == nil {
			first = hsm.Errorf(hsm.CodeUnavailable, "login", 0, "cluster %s has no reachable HSM", c.clusterID())
		}
		return nil, first
	}
	if err := c.ensureKeyMap(ctx); err != nil {
		s.Logout(ctx)
		return nil, err
	}
	return s, nil
}

// sessionFor returns the user's session on HSM m, logging in if needed.
func (s *session) sessionFor(ctx context.Context, m *member, atLogin bool) (hsm.FullSession, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, hsm.Errorf(hsm.CodePermission, "", 0, "the session has been logged out")
	}
	if ms, ok := s.byHSM[m.id]; ok {
		s.mu.Unlock()
		return ms, nil
	}
	if t, ok := s.loginFailed[m.id]; ok && !atLogin && time.Since(t) < retryLoginAfter {
		s.mu.Unlock()
		return nil, hsm.Errorf(hsm.CodeUnavailable, "login", 0, "HSM %s refused the user %s recently", m.id, s.creds.User)
	}
	s.mu.Unlock()

	var ms hsm.FullSession
	err := s.c.call(ctx, m, func(ctx context.Context) error {
		login, err := m.m.Login(ctx, s.creds)
		if err != nil {
			return err
		}
		full, ok := login.(hsm.FullSession)
		if !ok {
			login.Logout(ctx)
			return hsm.Errorf(hsm.CodeUnsupported, "login", 0, "HSM %s is %s, which lacks what a cluster member needs (shares, attributes, deletion, masked objects, users)", m.id, hsm.BackendName(login))
		}
		ms = full
		return nil
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.loginFailed[m.id] = time.Now()
		return nil, err
	}
	if prev, ok := s.byHSM[m.id]; ok { // another goroutine logged in first
		go ms.Logout(context.WithoutCancel(ctx))
		return prev, nil
	}
	if s.closed {
		go ms.Logout(context.WithoutCancel(ctx))
		return nil, hsm.Errorf(hsm.CodePermission, "", 0, "the session has been logged out")
	}
	delete(s.loginFailed, m.id)
	s.byHSM[m.id] = ms
	return ms, nil
}

// User is the logged-in user's name and role.
func (s *session) User() hsm.User { return s.user }

// Info describes the cluster.
func (s *session) Info(ctx context.Context) (hsm.ClusterInfo, error) { return s.c.Info(), nil }

// Logout ends the session on every HSM, which destroys its session keys.
func (s *session) Logout(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	byHSM := s.byHSM
	s.byHSM = map[string]hsm.FullSession{}
	s.sessionKeys = map[hsm.KeyRef]string{}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, ms := range byHSM {
		wg.Go(func() { _ = ms.Logout(ctx) })
	}
	wg.Wait()
	return nil
}

// on runs fn on one HSM chosen from cands and fails over to another when an
// HSM is unavailable. For an operation that makes a key (create), it fails
// over only when the first HSM certainly did nothing: an HSM that timed
// out may have made the key, and trying elsewhere could make it twice.
func (s *session) on(ctx context.Context, op string, cands []*member, create bool, fn func(ctx context.Context, ms hsm.FullSession) error) (*member, error) {
	tried := map[string]bool{}
	var lastErr error
	var w waitForHSM
	for {
		m := s.c.pick(cands, tried)
		if m == nil {
			// Every HSM that could serve the call is down or answered
			// unavailable, which means it did nothing: wait for one to come
			// back.
			if (lastErr == nil || hsm.CodeOf(lastErr) == hsm.CodeUnavailable) && s.c.await(ctx, &w) {
				clear(tried)
				continue
			}
			if lastErr != nil {
				return nil, lastErr
			}
			return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "cluster %s: no HSM that can serve this request is available", s.c.clusterID())
		}
		if len(tried) > 0 {
			s.c.stats.failovers.Add(1)
			s.c.stats.retries.Add(1)
		}
		tried[m.id] = true
		ms, err := s.sessionFor(ctx, m, false)
		if err != nil {
			lastErr = err
			if ctx.Err() != nil {
				return nil, err
			}
			continue
		}
		err = s.c.call(ctx, m, func(ctx context.Context) error { return fn(ctx, ms) })
		if err == nil {
			return m, nil
		}
		lastErr = err
		if create && outcomeUnknown(err) {
			s.c.markSuspect(m.id)
			return m, hsm.Errorf(hsm.CodeUnavailable, op, 0, "%v; the key may or may not have been made: look for it before trying again", err)
		}
		if hsm.CodeOf(err) != hsm.CodeUnavailable || ctx.Err() != nil {
			return m, err
		}
	}
}

// isSessionKey returns the HSM that holds ref if it is one of this
// session's session keys.
func (s *session) isSessionKey(ref hsm.KeyRef) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.sessionKeys[ref]
	return id, ok
}

// targets returns the HSMs on which an operation using every key of refs
// may run: the HSM of a session key, or the HSMs holding a token key. A
// token key on fewer than 2 HSMs is re-checked on the HSMs and, if the
// availability check is on, refused with CloudHSM's quorum error.
func (s *session) targets(ctx context.Context, op string, quorum bool, refs ...hsm.KeyRef) ([]*member, error) {
	var ids []string
	for i, ref := range refs {
		var holders []string
		if id, ok := s.isSessionKey(ref); ok {
			holders = []string{id}
		} else {
			h, known := s.c.keys.get(ref)
			check := quorum && s.c.policy().KeyAvailabilityCheck
			if !known || (check && len(h) < 2) {
				h = s.recheck(ctx, ref)
			}
			if len(h) == 0 {
				// Let an HSM give its own answer (not found, or no permission).
				return s.c.liveMembers(), nil
			}
			if check && len(h) < 2 && s.c.spread(ctx, ref) >= 2 {
				h, _ = s.c.keys.get(ref) // copied to an HSM that is back
			}
			if check && len(h) < 2 {
				s.c.stats.quorum.Add(1)
				return nil, hsm.QuorumError(op, ref)
			}
			holders = h
		}
		if i == 0 {
			ids = holders
		} else {
			ids = slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return !slices.Contains(holders, id) })
		}
	}
	var out []*member
	for _, id := range ids {
		if m := s.c.memberByID(id); m != nil {
			out = append(out, m)
		}
	}
	if len(out) == 0 {
		return nil, hsm.Errorf(hsm.CodeUnavailable, op, refs[0], "no HSM of cluster %s holds every key this operation needs", s.c.clusterID())
	}
	return out, nil
}

// recheck asks every reachable HSM whether it holds ref, updates the key
// map with the answers and returns the HSMs that hold it.
func (s *session) recheck(ctx context.Context, ref hsm.KeyRef) []string {
	var wg sync.WaitGroup
	for _, m := range s.c.liveMembers() {
		wg.Go(func() {
			ms, err := s.sessionFor(ctx, m, false)
			if err != nil {
				return
			}
			var ki hsm.KeyInfo
			err = s.c.call(ctx, m, func(ctx context.Context) (err error) {
				ki, err = ms.GetKey(ctx, ref)
				return err
			})
			switch {
			case err == nil && ki.Attrs.Token:
				s.c.keys.add(ref, m.id)
			case hsm.CodeOf(err) == hsm.CodeNotFound:
				s.c.keys.removeFrom(ref, m.id)
			}
		})
	}
	wg.Wait()
	h, _ := s.c.keys.get(ref)
	return h
}

// create runs a key-making operation on one HSM of cands, records the new
// keys, and copies the token keys among them to every other reachable HSM
// as masked objects before returning. tokenKeys is how many token keys the
// call may make, counted against the cluster's capacity.
func (s *session) create(ctx context.Context, op string, cands []*member, tokenKeys int, fn func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error)) ([]hsm.KeyInfo, error) {
	if tokenKeys > 0 {
		if err := s.c.checkCreate(op); err != nil {
			return nil, err
		}
		p := s.c.policy()
		if !s.c.keys.reserve(tokenKeys, p.KeyCapacity) {
			return nil, hsm.Errorf(hsm.CodeCapacity, op, 0, "cluster %s holds %d token keys, its capacity is %d: delete keys or raise the cluster's key capacity", s.c.clusterID(), s.c.keys.count(), p.KeyCapacity)
		}
		defer s.c.keys.release(tokenKeys)
	}
	if tokenKeys == 0 {
		home, ok := s.sessionHome(cands)
		if !ok {
			return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "HSM %s, which holds this session's session keys, is not available; log in again to start over", home)
		}
		if home != "" {
			cands = slices.DeleteFunc(slices.Clone(cands), func(m *member) bool { return m.id != home })
		}
	}
	var infos []hsm.KeyInfo
	// A remote HSM answers with the new token keys' masked objects, which
	// replicate then copies without exporting them again.
	var fresh *hsm.MaskedCopies
	makeCtx := ctx
	if tokenKeys > 0 && len(s.c.memberList()) > 1 {
		fresh = new(hsm.MaskedCopies)
		makeCtx = hsm.WithMaskedCopies(ctx, fresh)
	}
	makeKeys := func() (*member, error) {
		return s.on(makeCtx, op, cands, true, func(ctx context.Context, ms hsm.FullSession) (err error) {
			infos, err = fn(ctx, ms)
			return err
		})
	}
	release := func() {}
	defer func() { release() }()
	if tokenKeys > 0 {
		s.c.finishDeletes(ctx, false)
		release = s.c.holdCreate()
	}
	m, err := makeKeys()
	if tokenKeys > 0 && hsm.CodeOf(err) == hsm.CodeExists && s.c.anyDeleted() {
		// The id may be held by a key recorded as deleted that came back
		// to an HSM finishDeletes had cleaned: clean them all again, outside
		// this create, and make the keys once more.
		release()
		s.c.finishDeletes(ctx, true)
		release = s.c.holdCreate()
		m, err = makeKeys()
	}
	if err != nil {
		return nil, err
	}
	var tokens []hsm.KeyRef
	for i := range infos {
		if infos[i].Attrs.Token {
			s.c.keys.add(infos[i].Ref, m.id)
			tokens = append(tokens, infos[i].Ref)
		} else {
			s.mu.Lock()
			s.sessionKeys[infos[i].Ref] = m.id
			s.mu.Unlock()
			infos[i].Coverage = hsm.Coverage{HSMs: []string{m.id}}
		}
	}
	if len(tokens) > 0 {
		if err := failpoint.Hit(failpoint.ClusterAfterHomeWrite); err != nil {
			return nil, err
		}
		s.c.replicate(ctx, m, tokens, fresh)
		if err := failpoint.Hit(failpoint.ClusterAfterCopy); err != nil {
			return nil, err
		}
		if err := s.c.settleCreate(ctx, op, tokens); err != nil {
			return nil, err
		}
		if err := s.c.revive(tokens); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		for i := range infos {
			if infos[i].Attrs.Token {
				infos[i].Coverage = s.c.coverageOf(infos[i].Ref)
			}
		}
	}
	return infos, nil
}

// sessionHome returns the HSM that holds this session's session keys ("" if
// it has none) and whether it is among cands. Every session key of a
// session lives on that one HSM, as a PKCS#11 session is bound to one HSM
// of a CloudHSM cluster, so that an operation using two of them (wrap a
// session key under another) finds both in one place.
func (s *session) sessionHome(cands []*member) (string, bool) {
	s.mu.Lock()
	home := ""
	for _, id := range s.sessionKeys {
		home = id
		break
	}
	s.mu.Unlock()
	if home == "" {
		return "", true
	}
	for _, m := range cands {
		if m.id == home {
			return home, true
		}
	}
	return home, false
}

// tokenCount is 1 unless the template asks for a session key.
func tokenCount(t hsm.Template) int {
	if t.Session {
		return 0
	}
	return 1
}

// GenerateKey makes a secret key on one HSM and replicates it.
func (s *session) GenerateKey(ctx context.Context, spec hsm.KeySpec) (hsm.KeyInfo, error) {
	infos, err := s.create(ctx, "generate", s.c.liveMembers(), tokenCount(spec.Template), func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error) {
		ki, err := ms.GenerateKey(ctx, spec)
		return []hsm.KeyInfo{ki}, err
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return infos[0], nil
}

// GenerateKeyPair makes a key pair on one HSM and replicates both halves.
func (s *session) GenerateKeyPair(ctx context.Context, spec hsm.KeyPairSpec) (pub, priv hsm.KeyInfo, err error) {
	n := tokenCount(spec.Public) + tokenCount(spec.Private)
	infos, err := s.create(ctx, "generate-key-pair", s.c.liveMembers(), n, func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error) {
		pub, priv, err := ms.GenerateKeyPair(ctx, spec)
		return []hsm.KeyInfo{pub, priv}, err
	})
	if err != nil {
		return hsm.KeyInfo{}, hsm.KeyInfo{}, err
	}
	return infos[0], infos[1], nil
}

// ImportPublicKey stores a public key on one HSM and replicates it.
func (s *session) ImportPublicKey(ctx context.Context, pem []byte, t hsm.Template) (hsm.KeyInfo, error) {
	infos, err := s.create(ctx, "import-public-key", s.c.liveMembers(), tokenCount(t), func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error) {
		ki, err := ms.ImportPublicKey(ctx, pem, t)
		return []hsm.KeyInfo{ki}, err
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return infos[0], nil
}

// UnwrapKey imports a wrapped key on an HSM holding the unwrapping key and
// replicates it. It is not retried on another HSM when the outcome is
// unknown.
func (s *session) UnwrapKey(ctx context.Context, r hsm.UnwrapRequest) (hsm.KeyInfo, error) {
	cands, err := s.targets(ctx, "unwrap", true, r.UnwrappingKey)
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	infos, err := s.create(ctx, "unwrap", cands, tokenCount(r.Template), func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error) {
		ki, err := ms.UnwrapKey(ctx, r)
		return []hsm.KeyInfo{ki}, err
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return infos[0], nil
}

// InsertMasked stores a masked object (checked by the HSM for lineage and
// permission) on one HSM and replicates it. It is idempotent.
func (s *session) InsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	infos, err := s.create(ctx, "insert-masked", s.c.liveMembers(), 1, func(ctx context.Context, ms hsm.FullSession) ([]hsm.KeyInfo, error) {
		ki, err := ms.InsertMasked(ctx, blob)
		return []hsm.KeyInfo{ki}, err
	})
	if err != nil {
		return hsm.KeyInfo{}, err
	}
	return infos[0], nil
}

// ExportMasked exports a key as a masked object from an HSM that holds it.
func (s *session) ExportMasked(ctx context.Context, key hsm.KeyRef) ([]byte, error) {
	var out []byte
	err := s.use(ctx, "export-masked", func(ctx context.Context, ms hsm.FullSession) (err error) {
		out, err = ms.ExportMasked(ctx, key)
		return err
	}, key)
	return out, err
}

// use runs a read-only operation on the keys refs on one HSM that holds
// them all, under the availability quorum, failing over freely.
func (s *session) use(ctx context.Context, op string, fn func(ctx context.Context, ms hsm.FullSession) error, refs ...hsm.KeyRef) error {
	cands, err := s.targets(ctx, op, true, refs...)
	if err != nil {
		return err
	}
	_, err = s.on(ctx, op, cands, false, fn)
	return err
}

// WrapKey wraps a key on an HSM that holds both keys.
func (s *session) WrapKey(ctx context.Context, r hsm.WrapRequest) ([]byte, error) {
	var out []byte
	err := s.use(ctx, "wrap", func(ctx context.Context, ms hsm.FullSession) (err error) {
		out, err = ms.WrapKey(ctx, r)
		return err
	}, r.Payload, r.WrappingKey)
	return out, err
}

// Encrypt encrypts on an HSM that holds the key.
func (s *session) Encrypt(ctx context.Context, key hsm.KeyRef, m hsm.Mechanism, p hsm.Params, plaintext []byte) ([]byte, error) {
	var out []byte
	err := s.use(ctx, "encrypt", func(ctx context.Context, ms hsm.FullSession) (err error) {
		out, err = ms.Encrypt(ctx, key, m, p, plaintext)
		return err
	}, key)
	return out, err
}

// Decrypt decrypts on an HSM that holds the key.
func (s *session) Decrypt(ctx context.Context, key hsm.KeyRef, m hsm.Mechanism, p hsm.Params, ciphertext []byte) ([]byte, error) {
	var out []byte
	err := s.use(ctx, "decrypt", func(ctx context.Context, ms hsm.FullSession) (err error) {
		out, err = ms.Decrypt(ctx, key, m, p, ciphertext)
		return err
	}, key)
	return out, err
}

// ExportPublicKey returns a public key from any HSM that holds it; reading
// a public key is not a use of the key, so the quorum does not apply.
func (s *session) ExportPublicKey(ctx context.Context, key hsm.KeyRef) ([]byte, error) {
	cands, err := s.targets(ctx, "export-public-key", false, key)
	if err != nil {
		return nil, err
	}
	var out []byte
	_, err = s.on(ctx, "export-public-key", cands, false, func(ctx context.Context, ms hsm.FullSession) (err error) {
		out, err = ms.ExportPublicKey(ctx, key)
		return err
	})
	return out, err
}

// ShareKey shares the key on every HSM that holds it.
func (s *session) ShareKey(ctx context.Context, key hsm.KeyRef, user string) error {
	return s.change(ctx, "share", key, func(ctx context.Context, ms hsm.FullSession) error { return ms.ShareKey(ctx, key, user) })
}

// UnshareKey withdraws a share on every HSM that holds the key.
func (s *session) UnshareKey(ctx context.Context, key hsm.KeyRef, user string) error {
	return s.change(ctx, "unshare", key, func(ctx context.Context, ms hsm.FullSession) error { return ms.UnshareKey(ctx, key, user) })
}

// SetAttribute changes an attribute on every HSM that holds the key.
func (s *session) SetAttribute(ctx context.Context, key hsm.KeyRef, a hsm.Attr, v bool) error {
	return s.change(ctx, "set-attribute", key, func(ctx context.Context, ms hsm.FullSession) error { return ms.SetAttribute(ctx, key, a, v) })
}

// change applies an idempotent change to a key on every HSM holding it:
// first on one (which checks permission and policy), then on the others at
// once. HSMs that miss it are named in the error.
func (s *session) change(ctx context.Context, op string, key hsm.KeyRef, fn func(ctx context.Context, ms hsm.FullSession) error) error {
	cands, err := s.targets(ctx, op, true, key)
	if err != nil {
		return err
	}
	first, err := s.on(ctx, op, cands, false, fn)
	if err != nil {
		return err
	}
	var rest []*member
	for _, m := range cands {
		if m != first {
			rest = append(rest, m)
		}
	}
	return s.everywhere(ctx, op, key, rest, []string{first.id}, fn)
}

// everywhere runs fn on every member of ms at once and reports those that
// did not take the change, next to those (done) that did.
func (s *session) everywhere(ctx context.Context, op string, key hsm.KeyRef, ms []*member, done []string, fn func(ctx context.Context, ms hsm.FullSession) error) error {
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() {
			sess, err := s.sessionFor(ctx, m, false)
			if err == nil {
				err = s.c.call(ctx, m, func(ctx context.Context) error { return fn(ctx, sess) })
			}
			errs[i] = err
		})
	}
	wg.Wait()
	var missed []string
	var first error
	for i, err := range errs {
		if err != nil {
			missed = append(missed, fmt.Sprintf("%s (%v)", ms[i].id, err))
			if first == nil {
				first = err
			}
		} else {
			done = append(done, ms[i].id)
		}
	}
	if first == nil {
		return nil
	}
	code := hsm.CodeOf(first)
	if code == "" {
		code = hsm.CodeUnavailable
	}
	sort.Strings(done)
	return hsm.Errorf(code, op, key, "applied on %s but not on %s; run keymig hsm sync or repeat the change", orNone(done), strings.Join(missed, ", "))
}

func orNone(ids []string) string {
	if len(ids) == 0 {
		return "no HSM"
	}
	return strings.Join(ids, ", ")
}

// DeleteKey deletes the key on every HSM that holds it. A token key that an
// unreachable HSM may still hold is remembered, so that Sync deletes it
// there rather than copying it back.
func (s *session) DeleteKey(ctx context.Context, key hsm.KeyRef) error {
	if id, ok := s.isSessionKey(key); ok {
		m := s.c.memberByID(id)
		if m == nil {
			return hsm.Errorf(hsm.CodeNotFound, "delete", key, "the HSM that held this session key has left the cluster")
		}
		_, err := s.on(ctx, "delete", []*member{m}, false, func(ctx context.Context, ms hsm.FullSession) error { return ms.DeleteKey(ctx, key) })
		if err == nil || hsm.CodeOf(err) == hsm.CodeNotFound {
			s.mu.Lock()
			delete(s.sessionKeys, key)
			s.mu.Unlock()
		}
		return err
	}
	cands, err := s.targets(ctx, "delete", false, key)
	if err != nil {
		return err
	}
	del := func(ctx context.Context, ms hsm.FullSession) error { return ms.DeleteKey(ctx, key) }
	first, err := s.on(ctx, "delete", cands, false, del)
	if err != nil {
		return err
	}
	s.c.keys.removeFrom(key, first.id)
	var rest []*member
	for _, m := range s.c.memberList() {
		if m != first && s.c.isLive(m) {
			rest = append(rest, m)
		}
	}
	// The other HSMs: a not-found answer there means the key is gone too.
	var wg sync.WaitGroup
	reached := make([]bool, len(rest))
	for i, m := range rest {
		wg.Go(func() {
			err := s.c.call(ctx, m, func(ctx context.Context) error { return m.m.PeerDeleteKey(ctx, key) })
			if err == nil || hsm.CodeOf(err) == hsm.CodeNotFound {
				reached[i] = true
				s.c.keys.removeFrom(key, m.id)
			}
		})
	}
	wg.Wait()
	all := len(rest)+1 == len(s.c.memberList())
	have := []string{first.id}
	for i, ok := range reached {
		all = all && ok
		if ok {
			have = append(have, rest[i].id)
		}
	}
	if !all {
		s.c.markBehind(s.c.missedBy(have)...)
		if err := s.c.updateConfig(func(cfg *config) {
			if !slices.Contains(cfg.Deleted, key) {
				cfg.Deleted = append(cfg.Deleted, key)
			}
		}); err != nil {
			return fmt.Errorf("delete %s: deleted on the reachable HSMs but could not record it for the others: %w", key, err)
		}
	}
	s.c.keys.remove(key)
	return nil
}
