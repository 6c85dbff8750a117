package node

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// Quorum authentication: quorum keys live in the user records (so they
// replicate and back up with them), the policy in the HSM's options, and
// tokens in their own bucket until they expire.

var bktQuorum = []byte("quorum-tokens")

var _ hsm.Quorum = (*session)(nil)

// tokenRecord is a quorum token as the HSM keeps it.
type tokenRecord struct {
	Token     hsm.QuorumToken `json:"token"`
	Approvers []string        `json:"approvers,omitempty"` // officers whose approval verified
	Spent     bool            `json:"spent,omitempty"`
}

func getToken(tx *bolt.Tx, id []byte) (*tokenRecord, error) {
	b := tx.Bucket(bktQuorum)
	if b == nil {
		return nil, nil
	}
	v := b.Get(id)
	if v == nil {
		return nil, nil
	}
	var r tokenRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, txAbort{fmt.Errorf("quorum token %x is corrupt: %w", id, err)}
	}
	return &r, nil
}

func putToken(tx *bolt.Tx, r *tokenRecord) error {
	b, err := tx.CreateBucketIfNotExists(bktQuorum)
	if err != nil {
		return txAbort{err}
	}
	v, _ := json.Marshal(r)
	if err := b.Put(r.Token.ID, v); err != nil {
		return txAbort{err}
	}
	return nil
}

// quorumM is the user-management quorum in force (1 when off).
func (n *Node) quorumM() int { return max(n.policy().QuorumUserManagement, 1) }

// refuse records a refusal found before any transaction and returns it.
func (s *session) refuse(ctx context.Context, op, target string, err error) error {
	return s.n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: target, Outcome: outcome(err)}, func(*bolt.Tx, *hsm.AuditRecord) error { return err })
}

// officersWithKeys counts the crypto officers with a quorum key, leaving
// out the user named except.
func officersWithKeys(tx *bolt.Tx, except string) (int, error) {
	count := 0
	err := tx.Bucket(bktUsers).ForEach(func(k, v []byte) error {
		var u hsm.UserRecord
		if err := json.Unmarshal(v, &u); err != nil {
			return txAbort{fmt.Errorf("user record %q is corrupt: %w", k, err)}
		}
		if u.Role == hsm.RoleCryptoOfficer && len(u.QuorumKey) > 0 && normUser(u.Name) != except {
			count++
		}
		return nil
	})
	return count, err
}

// spendQuorum spends one of user's approved tokens inside tx when the
// quorum is on, and returns its id ("" when off).
func (n *Node) spendQuorum(tx *bolt.Tx, op, user string) (string, error) {
	m := n.quorumM()
	if m <= 1 {
		return "", nil
	}
	now := n.now()
	var expired *tokenRecord
	if b := tx.Bucket(bktQuorum); b != nil {
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			var r tokenRecord
			if json.Unmarshal(v, &r) != nil || r.Token.User != user || r.Token.Service != hsm.ServiceUserManagement || r.Spent || len(r.Approvers) < m {
				continue
			}
			if now.After(r.Token.Expires) {
				expired = &r
				continue
			}
			r.Spent = true
			if err := putToken(tx, &r); err != nil {
				return "", err
			}
			return hex.EncodeToString(r.Token.ID), nil
		}
	}
	if expired != nil {
		return "", hsm.Errorf(hsm.CodePermission, op, 0, "quorum token %s expired at %s before it was used; generate a new one and have %d crypto officers approve it", expired.Token.ID, expired.Token.Expires.UTC().Format("15:04:05Z"), m)
	}
	return "", hsm.Errorf(hsm.CodePermission, op, 0, "user management on hsm %s needs a quorum token approved by %d crypto officers, and user %s has none approved: generate a token, have %d officers sign it, and approve it", n.opt.ID, m, user, m)
}

// auditSpend records that an operation spent a quorum token.
func (s *session) auditSpend(token string) {
	if token != "" {
		s.n.record(hsm.AuditRecord{User: s.user, Op: "quorum-token-spend", Target: token, Outcome: "ok"})
	}
}

func (s *session) RegisterQuorumKey(ctx context.Context, user string, publicPEM []byte) error {
	const op = "quorum-register"
	user = normUser(user)
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	if user != s.user {
		return s.refuse(ctx, op, user, hsm.Errorf(hsm.CodePermission, op, 0, "a quorum key is registered by its own user, so that no one else can sign for it; log in as %s", user))
	}
	der, err := pemDecode(publicPEM, "PUBLIC KEY")
	var pub *rsa.PublicKey
	if err == nil {
		var k any
		if k, err = x509.ParsePKIXPublicKey(der); err == nil {
			pub, _ = k.(*rsa.PublicKey)
		}
	}
	if pub == nil || pub.N.BitLen() < 2048 {
		return s.refuse(ctx, op, user, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a quorum key must be an RSA public key of 2048 bits or more, as PEM \"BEGIN PUBLIC KEY\" (as in cloudhsm)"))
	}
	return s.n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: user}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		cur, err := getUser(tx, user)
		if err != nil || cur == nil {
			return err
		}
		cur.QuorumKey = der
		return putUser(tx, cur)
	})
}

func (s *session) SetQuorumPolicy(ctx context.Context, svc hsm.QuorumService, m int) error {
	const op = "quorum-policy-set"
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	target := fmt.Sprintf("%s=%d", svc, m)
	switch {
	case s.role != hsm.RoleCryptoOfficer:
		return s.refuse(ctx, op, target, hsm.Errorf(hsm.CodePermission, op, 0, "only a crypto officer may set a quorum policy; log in as one"))
	case svc != hsm.ServiceUserManagement:
		return s.refuse(ctx, op, target, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "quorum service %q: the service is user-management", svc))
	case m < 1:
		return s.refuse(ctx, op, target, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "quorum value %d: want 1 (no quorum) or more", m))
	}
	var spent string
	err = n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: target}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		spent = ""
		if have, err := officersWithKeys(tx, ""); err != nil {
			return err
		} else if m > have {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a quorum of %d needs %d crypto officers with quorum keys, and hsm %s has %d: register more officers' keys first (keep at least M+1 officers)", m, m, n.opt.ID, have)
		}
		var err error
		if spent, err = n.spendQuorum(tx, op, s.user); err != nil {
			return err
		}
		p := n.policy()
		p.QuorumUserManagement = m
		return n.putPolicy(tx, p)
	})
	if err != nil {
		return err
	}
	p := n.policy()
	p.QuorumUserManagement = m
	n.setPolicy(p)
	s.auditSpend(spent)
	return nil
}

func (s *session) GenerateQuorumToken(ctx context.Context, svc hsm.QuorumService) (hsm.QuorumToken, error) {
	const op = "quorum-token-generate"
	release, err := s.begin(ctx, op)
	if err != nil {
		return hsm.QuorumToken{}, err
	}
	defer release()
	n := s.n
	if s.role != hsm.RoleCryptoOfficer {
		return hsm.QuorumToken{}, s.refuse(ctx, op, "", hsm.Errorf(hsm.CodePermission, op, 0, "only a crypto officer manages users, so only one may generate a user-management quorum token; log in as one"))
	}
	if svc != hsm.ServiceUserManagement {
		return hsm.QuorumToken{}, s.refuse(ctx, op, "", hsm.Errorf(hsm.CodeInvalidInput, op, 0, "quorum service %q: the service is user-management", svc))
	}
	id := make([]byte, 16)
	rand.Read(id)
	now := n.now().UTC()
	t := hsm.QuorumToken{ID: id, Service: svc, User: s.user, Lineage: n.opt.Lineage, Issued: now, Expires: now.Add(hsm.QuorumTokenLifetime)}
	if err := n.putTokenAudited(ctx, s.user, op, t); err != nil {
		return hsm.QuorumToken{}, err
	}
	return t, nil
}

// putTokenAudited stores a new token, dropping expired ones.
func (n *Node) putTokenAudited(ctx context.Context, user, op string, t hsm.QuorumToken) error {
	return n.write(ctx, hsm.AuditRecord{User: user, Op: op, Target: hex.EncodeToString(t.ID)}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		if b := tx.Bucket(bktQuorum); b != nil {
			var old [][]byte
			b.ForEach(func(k, v []byte) error {
				var r tokenRecord
				if json.Unmarshal(v, &r) == nil && n.now().After(r.Token.Expires) {
					old = append(old, slices.Clone(k))
				}
				return nil
			})
			for _, k := range old {
				if err := b.Delete(k); err != nil {
					return txAbort{err}
				}
			}
		}
		if cur, err := getToken(tx, t.ID); err != nil || cur != nil {
			return err // the same token again: nothing to do
		}
		return putToken(tx, &tokenRecord{Token: t})
	})
}

// PeerPutQuorumToken stores a token another HSM of the cluster generated,
// so that approvals and the operation find it on every HSM.
func (n *Node) PeerPutQuorumToken(ctx context.Context, t hsm.QuorumToken) error {
	const op = "peer-quorum-token"
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	if len(t.ID) != 16 || t.Lineage != n.opt.Lineage || t.Service != hsm.ServiceUserManagement {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "not a quorum token of lineage %s", n.opt.Lineage)
	}
	return n.putTokenAudited(ctx, "peer", op, t)
}

func (s *session) ApproveQuorumToken(ctx context.Context, id hsm.Bytes, approvals []hsm.QuorumApproval) error {
	const op = "quorum-token-approve"
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	return n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: hex.EncodeToString(id)}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		r, err := getToken(tx, id)
		switch {
		case err != nil:
			return err
		case r == nil:
			return hsm.Errorf(hsm.CodeNotFound, op, 0, "quorum token %s is not on hsm %s: it expired and was dropped, or was made for another cluster; generate a new one", id, n.opt.ID)
		case r.Token.User != s.user:
			return hsm.Errorf(hsm.CodePermission, op, 0, "quorum token %s belongs to %s, who generated it; log in as %s to approve and use it", id, r.Token.User, r.Token.User)
		case r.Spent:
			return hsm.Errorf(hsm.CodePermission, op, 0, "quorum token %s was already spent on an operation; generate a new one", id)
		case n.now().After(r.Token.Expires):
			return hsm.Errorf(hsm.CodePermission, op, 0, "quorum token %s expired at %s; generate a new one and have it signed again", id, r.Token.Expires.UTC().Format("15:04:05Z"))
		}
		approvers, err := verifyApprovals(tx, op, r.Token, approvals)
		if err != nil {
			return err
		}
		if m := n.quorumM(); len(approvers) < m {
			return hsm.Errorf(hsm.CodePermission, op, 0, "too few approvals: %d crypto officer(s) approved quorum token %s and the user-management quorum is %d; have %d more officer(s) sign it", len(approvers), id, m, m-len(approvers))
		}
		r.Approvers = approvers
		return putToken(tx, r)
	})
}

// verifyApprovals checks each approval against the registered quorum keys
// and returns the distinct crypto officers who approved t.
func verifyApprovals(tx *bolt.Tx, op string, t hsm.QuorumToken, approvals []hsm.QuorumApproval) ([]string, error) {
	type reg struct {
		user hsm.UserRecord
		pub  *rsa.PublicKey
	}
	byKey := map[string]reg{}
	err := tx.Bucket(bktUsers).ForEach(func(_, v []byte) error {
		var u hsm.UserRecord
		if json.Unmarshal(v, &u) != nil || len(u.QuorumKey) == 0 {
			return nil
		}
		k, err := x509.ParsePKIXPublicKey(u.QuorumKey)
		if pub, ok := k.(*rsa.PublicKey); err == nil && ok {
			h := sha256.Sum256(u.QuorumKey)
			byKey[string(h[:])] = reg{u, pub}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	digest := sha256.Sum256(t.SignedBytes())
	var out []string
	for _, a := range approvals {
		r, ok := byKey[string(a.Signer)]
		switch {
		case !slices.Equal(a.TokenID, t.ID):
			return nil, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "an approval is for quorum token %s, not %s; sign this token", a.TokenID, t.ID)
		case !ok:
			return nil, hsm.Errorf(hsm.CodePermission, op, 0, "an approval of quorum token %s is signed with a key no user registered; sign with a crypto officer's registered quorum key", t.ID)
		case r.user.Role != hsm.RoleCryptoOfficer:
			return nil, hsm.Errorf(hsm.CodePermission, op, 0, "an approval of quorum token %s is by %s, a crypto user; only crypto officers approve user management: have an officer sign it", t.ID, normUser(r.user.Name))
		case rsa.VerifyPKCS1v15(r.pub, crypto.SHA256, digest[:], a.Signature) != nil:
			return nil, hsm.Errorf(hsm.CodePermission, op, 0, "the approval by %s does not verify with its registered quorum key: it signs another token or was altered; have %s sign token %s again", normUser(r.user.Name), normUser(r.user.Name), t.ID)
		}
		if name := normUser(r.user.Name); !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out, nil
}
