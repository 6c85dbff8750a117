package node

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"unicode"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

func (n *Node) hashPassword(name string, role hsm.Role, password string) (hsm.UserRecord, error) {
	salt := make([]byte, 16)
	rand.Read(salt)
	h, err := pbkdf2.Key(sha256.New, password, salt, n.kdfIter, 32)
	if err != nil {
		return hsm.UserRecord{}, err
	}
	return hsm.UserRecord{Name: name, Role: role, Hash: h, Salt: salt, Iterations: n.kdfIter}, nil
}

// normUser is a user name as the HSM keeps and shows it: user names are not
// case-sensitive and are always shown in lower case, as in CloudHSM.
func normUser(name string) string { return strings.ToLower(name) }

func checkUserName(op, name string) error {
	if name == "" || len(name) > 64 {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a user name must be 1 to 64 characters")
	}
	for _, r := range name {
		if !(unicode.IsLetter(r) || unicode.IsDigit(r) || r == '_' || r == '-' || r == '.') {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "user name %q: use letters, digits, '_', '-' and '.'", name)
		}
	}
	return nil
}

func checkPassword(op, pw string) error {
	if len(pw) < 7 || len(pw) > 32 {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a password must be 7 to 32 characters (as in cloudhsm)")
	}
	if strings.ContainsRune(pw, ':') {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "a password cannot contain ':' (pins are user:password)")
	}
	return nil
}

func getUser(tx *bolt.Tx, name string) (*hsm.UserRecord, error) {
	v := tx.Bucket(bktUsers).Get([]byte(normUser(name)))
	if v == nil {
		return nil, nil
	}
	var u hsm.UserRecord
	if err := json.Unmarshal(v, &u); err != nil {
		return nil, txAbort{fmt.Errorf("user record %q is corrupt: %w", name, err)}
	}
	return &u, nil
}

func putUser(tx *bolt.Tx, u *hsm.UserRecord) error {
	v, err := json.Marshal(u)
	if err != nil {
		return err
	}
	return tx.Bucket(bktUsers).Put([]byte(normUser(u.Name)), v)
}

// Bootstrap creates the first crypto officer of a new HSM; it fails if any
// user exists.
func (n *Node) Bootstrap(ctx context.Context, officer hsm.Credentials) error {
	const op = "bootstrap"
	officer.User = normUser(officer.User)
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	if err := checkUserName(op, officer.User); err != nil {
		return err
	}
	if err := checkPassword(op, officer.Password); err != nil {
		return err
	}
	u, err := n.hashPassword(officer.User, hsm.RoleCryptoOfficer, officer.Password)
	if err != nil {
		return err
	}
	return n.write(ctx, hsm.AuditRecord{User: officer.User, Op: "user-create", Target: officer.User}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		if k, _ := tx.Bucket(bktUsers).Cursor().First(); k != nil {
			return hsm.Errorf(hsm.CodeExists, op, 0, "hsm %s already has users; log in as a crypto officer to add more", n.opt.ID)
		}
		return putUser(tx, &u)
	})
}

// dummySalt is hashed against for unknown users so that a login takes the
// same time whether or not the user exists.
var dummySalt = []byte("keymig-no-such-user")

func loginFailed() error {
	return hsm.Errorf(hsm.CodePermission, "login", 0, "login failed: wrong user name or password")
}

// Login authenticates a user and opens a session.
func (n *Node) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	const op = "login"
	c.User = normUser(c.User)
	release, err := n.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	defer release()
	var u *hsm.UserRecord
	if err := n.db.View(func(tx *bolt.Tx) error {
		var err error
		u, err = getUser(tx, c.User)
		return err
	}); err != nil {
		return nil, err
	}
	salt, iter := dummySalt, n.kdfIter
	if u != nil {
		salt, iter = u.Salt, u.Iterations
	}
	got, err := pbkdf2.Key(sha256.New, c.Password, salt, max(iter, 1), 32)
	if err != nil {
		return nil, err
	}
	ok := u != nil && subtle.ConstantTimeCompare(got, u.Hash) == 1
	var role hsm.Role
	auditOp := "login"
	if !ok {
		auditOp = "login-failed"
	}
	err = n.write(ctx, hsm.AuditRecord{User: c.User, Op: auditOp}, func(tx *bolt.Tx, rec *hsm.AuditRecord) error {
		cur, err := getUser(tx, c.User)
		if err != nil {
			return err
		}
		if cur == nil || u == nil || !bytesEqual(cur.Hash, u.Hash) {
			if cur != nil && cur.Locked {
				return lockedError(c.User)
			}
			return loginFailed() // unknown user, or the password changed meanwhile
		}
		if cur.Locked {
			return lockedError(c.User)
		}
		if !ok {
			cur.Failures++
			if cur.Failures >= MaxLoginFailures {
				cur.Locked = true
			}
			if err := putUser(tx, cur); err != nil {
				return txAbort{err}
			}
			return loginFailed()
		}
		role = cur.Role
		if cur.Failures != 0 {
			cur.Failures = 0
			if err := putUser(tx, cur); err != nil {
				return txAbort{err}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s := &session{n: n, id: n.nextSession.Add(1), user: c.User, role: role}
	n.mu.Lock()
	n.sessions[s.id] = s
	n.mu.Unlock()
	return s, nil
}

func bytesEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }

func lockedError(user string) error {
	return hsm.Errorf(hsm.CodePermission, "login", 0, "user %s is locked after %d failed logins; a crypto officer must change its password to unlock it", user, MaxLoginFailures)
}

// user management through a session -------------------------------------------

func (s *session) CreateUser(ctx context.Context, name string, role hsm.Role, password string) error {
	const op = "user-create"
	name = normUser(name)
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	var u hsm.UserRecord
	pre := func() error {
		if s.role != hsm.RoleCryptoOfficer {
			return hsm.Errorf(hsm.CodePermission, op, 0, "only a crypto officer may create users; log in as one")
		}
		if err := checkUserName(op, name); err != nil {
			return err
		}
		if role != hsm.RoleCryptoOfficer && role != hsm.RoleCryptoUser {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "role %q: want crypto-officer or crypto-user", role)
		}
		if err := checkPassword(op, password); err != nil {
			return err
		}
		u, err = n.hashPassword(name, role, password)
		return err
	}
	if err := pre(); err != nil {
		return s.refuse(ctx, op, name, err)
	}
	var spent string
	err = n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: name}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		spent = ""
		cur, err := getUser(tx, name)
		if err != nil {
			return err
		}
		if cur != nil {
			return hsm.Errorf(hsm.CodeExists, op, 0, "user %s already exists (role %s); choose another name or delete it first", name, cur.Role)
		}
		if spent, err = n.spendQuorum(tx, op, s.user); err != nil {
			return err
		}
		return putUser(tx, &u)
	})
	if err == nil {
		s.auditSpend(spent)
	}
	return err
}

func (s *session) DeleteUser(ctx context.Context, name string) error {
	const op = "user-delete"
	name = normUser(name)
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	var spent string
	err = n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: name}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		spent = ""
		if s.role != hsm.RoleCryptoOfficer {
			return hsm.Errorf(hsm.CodePermission, op, 0, "only a crypto officer may delete users")
		}
		if name == s.user {
			return hsm.Errorf(hsm.CodePermission, op, 0, "user %s cannot delete itself; log in as another crypto officer", name)
		}
		cur, err := getUser(tx, name)
		if err != nil {
			return err
		}
		if cur == nil {
			return hsm.Errorf(hsm.CodeNotFound, op, 0, "user %s not found; list users to see who exists", name)
		}
		if owned := ownedKeys(tx, name); owned > 0 {
			return hsm.Errorf(hsm.CodePermission, op, 0, "user %s owns %d keys, and only their owner can delete them: log in as %s, delete its keys, then delete the user", name, owned, name)
		}
		if m := n.quorumM(); m > 1 && cur.Role == hsm.RoleCryptoOfficer && len(cur.QuorumKey) > 0 {
			left, err := officersWithKeys(tx, name)
			if err != nil {
				return err
			}
			if left < m {
				return hsm.Errorf(hsm.CodePermission, op, 0, "deleting crypto officer %s would leave %d officers with quorum keys, fewer than the user-management quorum of %d, and the cluster could no longer be administered: register another officer's quorum key first, or lower the quorum", name, left, m)
			}
		}
		if spent, err = n.spendQuorum(tx, op, s.user); err != nil {
			return err
		}
		return tx.Bucket(bktUsers).Delete([]byte(name))
	})
	if err == nil {
		s.auditSpend(spent)
	}
	return err
}

// ownedKeys counts the token keys a user owns.
func ownedKeys(tx *bolt.Tx, user string) int {
	c := tx.Bucket(bktKeys).Cursor()
	count := 0
	for k, v := c.First(); k != nil; k, v = c.Next() {
		var rec struct {
			Info struct {
				Owner string `json:"owner"`
			} `json:"info"`
		}
		if json.Unmarshal(v, &rec) == nil && strings.EqualFold(rec.Info.Owner, user) {
			count++
		}
	}
	return count
}

func (s *session) ChangePassword(ctx context.Context, name, password string) error {
	const op = "user-change-password"
	name = normUser(name)
	release, err := s.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	n := s.n
	var u hsm.UserRecord
	pre := func() error {
		if s.role != hsm.RoleCryptoOfficer && name != s.user {
			return hsm.Errorf(hsm.CodePermission, op, 0, "a crypto user may change only its own password; ask a crypto officer")
		}
		if err := checkPassword(op, password); err != nil {
			return err
		}
		u, err = n.hashPassword(name, "", password)
		return err
	}
	if err := pre(); err != nil {
		return s.refuse(ctx, op, name, err)
	}
	var spent string
	err = n.write(ctx, hsm.AuditRecord{User: s.user, Op: op, Target: name}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		spent = ""
		cur, err := getUser(tx, name)
		if err != nil {
			return err
		}
		if cur == nil {
			return hsm.Errorf(hsm.CodeNotFound, op, 0, "user %s not found; list users to see who exists", name)
		}
		if name != s.user { // one's own password needs no quorum
			if spent, err = n.spendQuorum(tx, op, s.user); err != nil {
				return err
			}
		}
		nu := *cur
		nu.Hash, nu.Salt, nu.Iterations, nu.Failures, nu.Locked = u.Hash, u.Salt, u.Iterations, 0, false
		return putUser(tx, &nu)
	})
	if err == nil {
		s.auditSpend(spent)
	}
	return err
}

func (s *session) ListUsers(ctx context.Context) ([]hsm.User, error) {
	release, err := s.begin(ctx, "user-list")
	if err != nil {
		return nil, err
	}
	defer release()
	recs, err := s.n.users()
	if err != nil {
		return nil, err
	}
	out := make([]hsm.User, len(recs))
	for i, u := range recs {
		out[i] = hsm.User{Name: normUser(u.Name), Role: u.Role, Locked: u.Locked, Coverage: hsm.Coverage{HSMs: []string{s.n.opt.ID}}}
	}
	return out, nil
}

// users returns every user record, ordered by name.
func (n *Node) users() ([]hsm.UserRecord, error) {
	var out []hsm.UserRecord
	err := n.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bktUsers).ForEach(func(k, v []byte) error {
			var u hsm.UserRecord
			if err := json.Unmarshal(v, &u); err != nil {
				return fmt.Errorf("user record %q is corrupt: %w", k, err)
			}
			out = append(out, u)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// PeerUsers returns every user with its password hash, for the cluster
// layer to replicate.
func (n *Node) PeerUsers(ctx context.Context) ([]hsm.UserRecord, error) {
	release, err := n.begin(ctx, "peer-users")
	if err != nil {
		return nil, err
	}
	defer release()
	return n.users()
}

// PeerPutUser creates or replaces a user record as is (hash, lock state and
// all), for the cluster layer's replication.
func (n *Node) PeerPutUser(ctx context.Context, u hsm.UserRecord) error {
	const op = "peer-put-user"
	u.Name = normUser(u.Name)
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	if err := checkUserName(op, u.Name); err != nil {
		return err
	}
	if u.Role != hsm.RoleCryptoOfficer && u.Role != hsm.RoleCryptoUser {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "user %s: role %q: want crypto-officer or crypto-user", u.Name, u.Role)
	}
	if len(u.Hash) != 32 || len(u.Salt) == 0 || u.Iterations <= 0 {
		return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "user %s: the record has no valid password hash", u.Name)
	}
	return n.write(ctx, hsm.AuditRecord{User: "peer", Op: op, Target: u.Name}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		return putUser(tx, &u)
	})
}

// PeerDeleteUser removes a user, for the cluster layer's replication. Like
// DeleteUser it refuses a user who owns keys; deleting an absent user is not
// an error.
func (n *Node) PeerDeleteUser(ctx context.Context, name string) error {
	const op = "peer-delete-user"
	name = normUser(name)
	release, err := n.begin(ctx, op)
	if err != nil {
		return err
	}
	defer release()
	return n.write(ctx, hsm.AuditRecord{User: "peer", Op: op, Target: name}, func(tx *bolt.Tx, _ *hsm.AuditRecord) error {
		if owned := ownedKeys(tx, name); owned > 0 {
			return hsm.Errorf(hsm.CodePermission, op, 0, "user %s owns %d keys on hsm %s; delete them first", name, owned, n.opt.ID)
		}
		return tx.Bucket(bktUsers).Delete([]byte(name))
	})
}
