package cluster

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// Quorum authentication across the HSMs: each HSM checks and spends its own
// copy of a token, so a token generated on one HSM is copied to the others,
// and registrations, policy changes and approvals go to every HSM like
// other user changes.

var _ hsm.Quorum = (*session)(nil)

// RegisterQuorumKey registers the caller's quorum key on every HSM.
func (s *session) RegisterQuorumKey(ctx context.Context, user string, publicPEM []byte) error {
	return s.userChange(ctx, "register-quorum", false, func(ctx context.Context, ms hsm.FullSession) error {
		return quorumOf(ms).RegisterQuorumKey(ctx, user, publicPEM)
	})
}

// SetQuorumPolicy sets the policy on every HSM and in cluster.json, so that
// backups and clones keep it.
func (s *session) SetQuorumPolicy(ctx context.Context, svc hsm.QuorumService, m int) error {
	err := s.userChange(ctx, "quorum-policy-set", false, func(ctx context.Context, ms hsm.FullSession) error {
		return quorumOf(ms).SetQuorumPolicy(ctx, svc, m)
	})
	if err != nil {
		return err
	}
	return s.c.updateConfig(func(cfg *config) { cfg.Policy.QuorumUserManagement = m })
}

// GenerateQuorumToken makes a token on one HSM and copies it to every other
// reachable one; an HSM that misses it is named.
func (s *session) GenerateQuorumToken(ctx context.Context, svc hsm.QuorumService) (hsm.QuorumToken, error) {
	var tok hsm.QuorumToken
	first, err := s.on(ctx, "quorum-token-generate", s.c.liveMembers(), false, func(ctx context.Context, ms hsm.FullSession) (err error) {
		tok, err = quorumOf(ms).GenerateQuorumToken(ctx, svc)
		return err
	})
	if err != nil {
		return hsm.QuorumToken{}, err
	}
	var mu sync.Mutex
	var missed []string
	var wg sync.WaitGroup
	for _, m := range s.c.liveMembers() {
		if m == first {
			continue
		}
		wg.Go(func() {
			if err := s.c.call(ctx, m, func(ctx context.Context) error { return m.m.PeerPutQuorumToken(ctx, tok) }); err != nil {
				mu.Lock()
				missed = append(missed, fmt.Sprintf("%s (%v)", m.id, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(missed) > 0 {
		return hsm.QuorumToken{}, hsm.Errorf(hsm.CodeUnavailable, "quorum-token-generate", 0, "quorum token %s reached %s but not %s; generate another once every HSM is up", tok.ID, first.id, strings.Join(missed, ", "))
	}
	return tok, nil
}

// ApproveQuorumToken submits the approvals to every HSM.
func (s *session) ApproveQuorumToken(ctx context.Context, id hsm.Bytes, approvals []hsm.QuorumApproval) error {
	return s.userChange(ctx, "quorum-token-approve", false, func(ctx context.Context, ms hsm.FullSession) error {
		return quorumOf(ms).ApproveQuorumToken(ctx, id, approvals)
	})
}

// quorumOf is a member session's quorum capability; every HSM of the
// included cluster has it.
func quorumOf(ms hsm.FullSession) hsm.Quorum {
	if q, ok := ms.(hsm.Quorum); ok {
		return q
	}
	return noQuorum{}
}

// noQuorum answers for a member without quorum authentication.
type noQuorum struct{}

func (noQuorum) err() error {
	return hsm.Errorf(hsm.CodeUnsupported, "quorum", 0, "an HSM of this cluster has no quorum authentication")
}
func (q noQuorum) RegisterQuorumKey(context.Context, string, []byte) error { return q.err() }
func (q noQuorum) SetQuorumPolicy(context.Context, hsm.QuorumService, int) error {
	return q.err()
}
func (q noQuorum) GenerateQuorumToken(context.Context, hsm.QuorumService) (hsm.QuorumToken, error) {
	return hsm.QuorumToken{}, q.err()
}
func (q noQuorum) ApproveQuorumToken(context.Context, hsm.Bytes, []hsm.QuorumApproval) error {
	return q.err()
}
