package node_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
)

// quorumKeys are generated once: RSA-2048 is slow under -race.
var quorumKeys = sync.OnceValue(func() []*rsa.PrivateKey {
	var ks []*rsa.PrivateKey
	for range 4 {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		ks = append(ks, k)
	}
	return ks
})

func pubPEM(t *testing.T, k *rsa.PrivateKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// quorumFixture is an HSM with officers admin, co2 and co3 (quorum keys 0,
// 1, 2), crypto user cu (key 3), a user-management quorum of 2, and a
// clock the test moves.
type quorumFixture struct {
	n            *node.Node
	now          time.Time
	admin, co2   hsm.FullSession
	co3, cu      hsm.FullSession
	officerSigns []*rsa.PrivateKey
}

func newQuorumFixture(t *testing.T) *quorumFixture {
	ctx := context.Background()
	f := &quorumFixture{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	f.n = newNode(t, node.Options{Now: func() time.Time { return f.now }})
	f.admin = loginFull(t, f.n, officer)
	ks := quorumKeys()
	for _, u := range []struct {
		name string
		role hsm.Role
	}{{"co2", hsm.RoleCryptoOfficer}, {"co3", hsm.RoleCryptoOfficer}, {"cu", hsm.RoleCryptoUser}} {
		if err := f.admin.CreateUser(ctx, u.name, u.role, "user-password"); err != nil {
			t.Fatal(err)
		}
	}
	f.co2 = loginFull(t, f.n, hsm.Credentials{User: "co2", Password: "user-password"})
	f.co3 = loginFull(t, f.n, hsm.Credentials{User: "co3", Password: "user-password"})
	f.cu = loginFull(t, f.n, hsm.Credentials{User: "cu", Password: "user-password"})
	for i, s := range []hsm.FullSession{f.admin, f.co2, f.co3, f.cu} {
		if err := s.(hsm.Quorum).RegisterQuorumKey(ctx, s.User().Name, pubPEM(t, ks[i])); err != nil {
			t.Fatalf("register %s: %v", s.User().Name, err)
		}
	}
	if err := f.admin.(hsm.Quorum).SetQuorumPolicy(ctx, hsm.ServiceUserManagement, 2); err != nil {
		t.Fatal(err)
	}
	return f
}

func loginFull(t *testing.T, n *node.Node, c hsm.Credentials) hsm.FullSession {
	s, err := n.Login(context.Background(), c)
	if err != nil {
		t.Fatalf("login %s: %v", c.User, err)
	}
	return s.(hsm.FullSession)
}

func sign(t *testing.T, tok hsm.QuorumToken, k *rsa.PrivateKey) hsm.QuorumApproval {
	a, err := hsm.SignQuorumToken(tok, k)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestQuorumRefusals is every refusal of quorum authentication, each with
// one reason and one action.
func TestQuorumRefusals(t *testing.T) {
	ctx := context.Background()
	ks := quorumKeys()
	tests := []struct {
		name string
		run  func(t *testing.T, f *quorumFixture) error
		code hsm.Code
		want []string
	}{
		{"user management without a token", func(t *testing.T, f *quorumFixture) error {
			return f.admin.CreateUser(ctx, "erin", hsm.RoleCryptoUser, "user-password")
		}, hsm.CodePermission, []string{"needs a quorum token approved by 2 crypto officers", "generate a token"}},
		{"too few approvals", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0])})
		}, hsm.CodePermission, []string{"too few approvals: 1 crypto officer(s)", "quorum is 2", "1 more officer(s) sign it"}},
		{"the same officer twice", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[0])})
		}, hsm.CodePermission, []string{"too few approvals"}},
		{"a signature from a non-officer", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[3])})
		}, hsm.CodePermission, []string{"by cu, a crypto user", "have an officer sign it"}},
		{"a key no one registered", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			other, _ := rsa.GenerateKey(rand.Reader, 1024) // not registered; size does not matter here
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, other)})
		}, hsm.CodePermission, []string{"signed with a key no user registered"}},
		{"a signature of another token", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			other, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			forged := sign(t, other, ks[1])
			forged.TokenID = tok.ID
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), forged})
		}, hsm.CodePermission, []string{"approval by co2 does not verify", "have co2 sign token"}},
		{"an expired token at approval", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			f.now = f.now.Add(hsm.QuorumTokenLifetime + time.Second)
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[1])})
		}, hsm.CodePermission, []string{"expired at 03:14:05Z", "generate a new one"}},
		{"an expired token at use", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			if err := f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[1])}); err != nil {
				t.Fatal(err)
			}
			f.now = f.now.Add(hsm.QuorumTokenLifetime + time.Second)
			return f.admin.DeleteUser(ctx, "cu")
		}, hsm.CodePermission, []string{"expired at 03:14:05Z before it was used"}},
		{"a spent token", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			approvals := []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[1])}
			if err := f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, approvals); err != nil {
				t.Fatal(err)
			}
			if err := f.admin.CreateUser(ctx, "erin", hsm.RoleCryptoUser, "user-password"); err != nil {
				t.Fatalf("create with an approved token: %v", err)
			}
			if err := f.admin.CreateUser(ctx, "frank", hsm.RoleCryptoUser, "user-password"); err == nil {
				t.Fatal("a second create with one token succeeded")
			}
			return f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, approvals)
		}, hsm.CodePermission, []string{"was already spent", "generate a new one"}},
		{"another officer's token", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			return f.co2.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[1])})
		}, hsm.CodePermission, []string{"belongs to admin", "log in as admin"}},
		{"a policy larger than the officers with keys", func(t *testing.T, f *quorumFixture) error {
			return f.admin.(hsm.Quorum).SetQuorumPolicy(ctx, hsm.ServiceUserManagement, 4)
		}, hsm.CodeInvalidInput, []string{"a quorum of 4 needs 4 crypto officers with quorum keys", "has 3", "register more officers' keys"}},
		{"deleting an officer below the quorum", func(t *testing.T, f *quorumFixture) error {
			tok, _ := f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			if err := f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[1]), sign(t, tok, ks[2])}); err != nil {
				t.Fatal(err)
			}
			if err := f.admin.DeleteUser(ctx, "co3"); err != nil {
				t.Fatalf("delete co3, leaving 2 officers with keys: %v", err)
			}
			tok, _ = f.admin.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			if err := f.admin.(hsm.Quorum).ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[0]), sign(t, tok, ks[1])}); err != nil {
				t.Fatal(err)
			}
			return f.admin.DeleteUser(ctx, "co2")
		}, hsm.CodePermission, []string{"would leave 1 officers with quorum keys, fewer than the user-management quorum of 2", "register another officer's quorum key first"}},
		{"registering another user's key", func(t *testing.T, f *quorumFixture) error {
			return f.admin.(hsm.Quorum).RegisterQuorumKey(ctx, "co2", pubPEM(t, ks[0]))
		}, hsm.CodePermission, []string{"registered by its own user", "log in as co2"}},
		{"a crypto user generating a token", func(t *testing.T, f *quorumFixture) error {
			_, err := f.cu.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
			return err
		}, hsm.CodePermission, []string{"only one may generate", "log in as one"}},
		{"lowering the policy without a token", func(t *testing.T, f *quorumFixture) error {
			return f.admin.(hsm.Quorum).SetQuorumPolicy(ctx, hsm.ServiceUserManagement, 1)
		}, hsm.CodePermission, []string{"needs a quorum token approved by 2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newQuorumFixture(t)
			err := tc.run(t, f)
			if hsm.CodeOf(err) != tc.code {
				t.Fatalf("got %v (code %q), want code %s", err, hsm.CodeOf(err), tc.code)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestQuorumFlow: a token approved by 2 officers lets one operation run,
// every step is audited, and snapshots keep the policy and quorum keys.
func TestQuorumFlow(t *testing.T) {
	ctx := context.Background()
	ks := quorumKeys()
	f := newQuorumFixture(t)
	q := f.admin.(hsm.Quorum)
	tok, err := q.GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
	if err != nil {
		t.Fatal(err)
	}
	if !tok.Expires.Equal(f.now.Add(10 * time.Minute)) {
		t.Errorf("token expires %v, want 10 minutes after %v", tok.Expires, f.now)
	}
	if err := q.ApproveQuorumToken(ctx, tok.ID, []hsm.QuorumApproval{sign(t, tok, ks[1]), sign(t, tok, ks[2])}); err != nil {
		t.Fatal(err)
	}
	if err := f.admin.ChangePassword(ctx, "cu", "new-password"); err != nil {
		t.Fatalf("change cu's password with the token: %v", err)
	}
	// One's own password needs no token.
	if err := f.cu.ChangePassword(ctx, "cu", "newer-password"); err != nil {
		t.Fatalf("cu changes its own password: %v", err)
	}
	var ops []string
	f.n.Audit(func(r hsm.AuditRecord) error {
		if strings.HasPrefix(r.Op, "quorum-") {
			ops = append(ops, r.Op+":"+r.Outcome)
		}
		return nil
	})
	got := strings.Join(ops, " ")
	for _, w := range []string{"quorum-register:ok", "quorum-policy-set:ok", "quorum-token-generate:ok", "quorum-token-approve:ok", "quorum-token-spend:ok"} {
		if !strings.Contains(got, w) {
			t.Errorf("audit log %q lacks %s", got, w)
		}
	}
	snap, err := f.n.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n2 := newNode(t, node.Options{Lineage: f.n.Lineage(), LineageSecret: mustSecret(t, f.n)})
	if err := n2.RestoreSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if m := n2.Policy().QuorumUserManagement; m != 2 {
		t.Errorf("restored quorum = %d, want 2", m)
	}
	s2 := loginFull(t, n2, officer)
	if err := s2.CreateUser(ctx, "erin", hsm.RoleCryptoUser, "user-password"); !strings.Contains(err.Error(), "needs a quorum token") {
		t.Errorf("create on the restored HSM without a token: %v", err)
	}
	tok2, _ := s2.(hsm.Quorum).GenerateQuorumToken(ctx, hsm.ServiceUserManagement)
	if err := s2.(hsm.Quorum).ApproveQuorumToken(ctx, tok2.ID, []hsm.QuorumApproval{sign(t, tok2, ks[0]), sign(t, tok2, ks[2])}); err != nil {
		t.Errorf("approve on the restored HSM with the officers' keys: %v", err)
	}
}

func mustSecret(t *testing.T, n *node.Node) []byte {
	s, err := n.LineageSecret()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
