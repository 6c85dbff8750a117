package cluster

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// CreateUser creates the user on every reachable HSM. An HSM that is down
// gets the user at the next Sync; a reachable HSM that refuses it is named
// in the error.
func (s *session) CreateUser(ctx context.Context, name string, role hsm.Role, password string) error {
	return s.userChange(ctx, "create-user", true, func(ctx context.Context, ms hsm.FullSession) error {
		return ms.CreateUser(ctx, name, role, password)
	})
}

// DeleteUser deletes the user on every HSM; HSMs that cannot be reached
// are named in the error, since Sync would not remove the user there.
func (s *session) DeleteUser(ctx context.Context, name string) error {
	return s.userChange(ctx, "delete-user", false, func(ctx context.Context, ms hsm.FullSession) error {
		return ms.DeleteUser(ctx, name)
	})
}

// ChangePassword changes the password on every HSM; HSMs that cannot be
// reached are named in the error.
func (s *session) ChangePassword(ctx context.Context, name, password string) error {
	return s.userChange(ctx, "change-password", false, func(ctx context.Context, ms hsm.FullSession) error {
		return ms.ChangePassword(ctx, name, password)
	})
}

// userChange applies a user change on every HSM at once. If every HSM
// refuses it the same way, that refusal is returned as is; if some took it
// and others did not, the error names both. Down HSMs count as missed
// unless downOK (a creation, which Sync completes).
func (s *session) userChange(ctx context.Context, op string, downOK bool, fn func(ctx context.Context, ms hsm.FullSession) error) error {
	members := s.c.memberList()
	errs := make([]error, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		if m.forcedDown.Load() {
			errs[i] = hsm.Errorf(hsm.CodeUnavailable, op, 0, "HSM %s is down", m.id)
			continue
		}
		wg.Go(func() {
			ms, err := s.sessionFor(ctx, m, false)
			if err == nil {
				err = s.c.call(ctx, m, func(ctx context.Context) error { return fn(ctx, ms) })
			}
			errs[i] = err
		})
	}
	wg.Wait()
	var done, missed []string
	var refusal error
	for i, err := range errs {
		switch {
		case err == nil:
			done = append(done, members[i].id)
		case hsm.CodeOf(err) == hsm.CodeUnavailable && downOK:
			// Sync brings the user there; Open does once it is back.
			s.c.markBehind(members[i].id)
		default:
			missed = append(missed, fmt.Sprintf("%s (%v)", members[i].id, err))
			if refusal == nil || hsm.CodeOf(refusal) == hsm.CodeUnavailable {
				refusal = err
			}
		}
	}
	if refusal == nil {
		if len(done) == 0 {
			return hsm.Errorf(hsm.CodeUnavailable, op, 0, "cluster %s has no reachable HSM", s.c.clusterID())
		}
		return nil
	}
	if len(done) == 0 {
		return refusal
	}
	code := hsm.CodeOf(refusal)
	if code == "" {
		code = hsm.CodeUnavailable
	}
	return hsm.Errorf(code, op, 0, "applied on %s but not on %s; repeat the change once every HSM is up", strings.Join(done, ", "), strings.Join(missed, ", "))
}

// ListUsers merges the users of every reachable HSM, with the HSMs that
// know each user as its coverage.
func (s *session) ListUsers(ctx context.Context) ([]hsm.User, error) {
	var mu sync.Mutex
	byHSM := map[string][]hsm.User{}
	_, err := s.perHSM(ctx, func(ctx context.Context, m *member, ms hsm.FullSession) error {
		users, err := ms.ListUsers(ctx)
		if err != nil {
			return err
		}
		mu.Lock()
		byHSM[m.id] = users
		mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s.c.mergeUsers(byHSM), nil
}

// Users lists the users of every reachable HSM, as ListUsers does, without
// a login: CloudHSM's user list needs none. It shows names, roles and lock
// state, never a password hash.
func (c *Cluster) Users(ctx context.Context) ([]hsm.User, error) {
	members := c.liveMembers()
	var mu sync.Mutex
	byHSM := map[string][]hsm.User{}
	var wg sync.WaitGroup
	for _, m := range members {
		wg.Go(func() {
			var recs []hsm.UserRecord
			if err := c.call(ctx, m, func(ctx context.Context) (err error) {
				recs, err = m.m.PeerUsers(ctx)
				return err
			}); err != nil {
				return
			}
			users := make([]hsm.User, len(recs))
			for i, u := range recs {
				users[i] = hsm.User{Name: strings.ToLower(u.Name), Role: u.Role, Locked: u.Locked}
			}
			mu.Lock()
			byHSM[m.id] = users
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(byHSM) == 0 {
		return nil, hsm.Errorf(hsm.CodeUnavailable, "user-list", 0, "cluster %s has no reachable HSM; see keymig hsm status", c.clusterID())
	}
	return c.mergeUsers(byHSM), nil
}

// mergeUsers combines per-HSM user lists into one ordered by name, with the
// HSMs that know each user as its coverage; a user locked on any HSM is
// shown locked.
func (c *Cluster) mergeUsers(byHSM map[string][]hsm.User) []hsm.User {
	byName := map[string]hsm.User{}
	holders := map[string][]string{}
	for id, users := range byHSM {
		for _, u := range users {
			if prev, ok := byName[u.Name]; !ok || (u.Locked && !prev.Locked) {
				byName[u.Name] = u
			}
			holders[u.Name] = append(holders[u.Name], id)
		}
	}
	out := make([]hsm.User, 0, len(byName))
	for name, u := range byName {
		cov := hsm.Coverage{HSMs: holders[name]}
		sort.Strings(cov.HSMs)
		for _, m := range c.memberList() {
			_, answered := byHSM[m.id]
			switch {
			case slices.Contains(cov.HSMs, m.id):
			case !answered:
				cov.Unreachable = append(cov.Unreachable, m.id)
			default:
				cov.Missing = append(cov.Missing, m.id)
			}
		}
		u.Coverage = cov
		out = append(out, u)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
