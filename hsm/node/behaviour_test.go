package node_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
	bolt "go.etcd.io/bbolt"
)

func login(t testing.TB, n *node.Node, c hsm.Credentials) hsm.Session {
	t.Helper()
	s, err := n.Login(context.Background(), c)
	if err != nil {
		t.Fatalf("login %s: %v", c.User, err)
	}
	return s
}

var alice = hsm.Credentials{User: "alice", Password: "alice-password"}

// withAlice returns a node with crypto user alice logged in.
func withAlice(t testing.TB, o node.Options) (*node.Node, hsm.Session) {
	t.Helper()
	n := newNode(t, o)
	co := login(t, n, officer)
	if err := co.CreateUser(context.Background(), alice.User, hsm.RoleCryptoUser, alice.Password); err != nil {
		t.Fatal(err)
	}
	return n, login(t, n, alice)
}

func TestPersistence(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{FIPS: true, KeyCapacity: 77, AZ: "us-east-1b"})
	tok, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "tok", ID: []byte{1},
		Attrs: map[hsm.Attr]bool{hsm.AttrEncrypt: true, hsm.AttrDecrypt: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ses, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Session: true}})
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
	if err != nil {
		t.Fatal(err)
	}
	ct, err := s.Encrypt(ctx, tok.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("survives"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetAttribute(ctx, tok.Ref, hsm.AttrModifiable, false); err != nil {
		t.Fatal(err)
	}
	tok, _ = s.GetKey(ctx, tok.Ref)
	before, err := n.VerifyAudit()
	if err != nil || before == 0 {
		t.Fatalf("VerifyAudit before close: %d, %v", before, err)
	}
	path := n.Path()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetKey(ctx, tok.Ref); hsm.CodeOf(err) != hsm.CodeUnavailable {
		t.Errorf("a session of a closed node still works: %v", err)
	}
	if _, err := node.Create(path, node.Options{ID: "x", Lineage: "y", LineageSecret: make([]byte, 32)}); err == nil {
		t.Error("Create over an existing file succeeded")
	}

	n2, err := node.Open(path, node.OpenOptions{KDFIterations: testKDF})
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	if n2.ID() != n.ID() || n2.Policy().KeyCapacity != 77 || !n2.Policy().FIPS || n2.AZ() != "us-east-1b" {
		t.Errorf("options not restored: %s %+v", n2.ID(), n2.Policy())
	}
	s2 := login(t, n2, alice)
	got, err := s2.GetKey(ctx, tok.Ref)
	if err != nil {
		t.Fatalf("token key lost on reopen: %v", err)
	}
	if !bytes.Equal(got.KCV, tok.KCV) || got.Label != "tok" || got.Attrs != tok.Attrs {
		t.Errorf("token key changed on reopen: %+v vs %+v", got, tok)
	}
	for _, r := range []hsm.KeyRef{pub.Ref, priv.Ref} {
		if _, err := s2.GetKey(ctx, r); err != nil {
			t.Errorf("key pair half %s lost: %v", r, err)
		}
	}
	if _, err := s2.GetKey(ctx, ses.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("a session key survived Close/Open: %v", err)
	}
	if pt, err := s2.Decrypt(ctx, tok.Ref, hsm.MechAESGCM, hsm.Params{}, ct); err != nil || string(pt) != "survives" {
		t.Errorf("decrypt after reopen: %q, %v", pt, err)
	}
	// The id index survived too.
	_, err = s2.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{ID: []byte{1}}})
	if hsm.CodeOf(err) != hsm.CodeExists {
		t.Errorf("id uniqueness lost on reopen: %v", err)
	}
	after, err := n2.VerifyAudit()
	if err != nil || after <= before {
		t.Errorf("audit after reopen: %d records (before %d), %v", after, before, err)
	}
	var ops []string
	n2.Audit(func(r node.AuditRecord) error { ops = append(ops, r.Op); return nil })
	joined := strings.Join(ops, ",")
	for _, want := range []string{"user-create", "login", "generate", "encrypt", "set-attribute"} {
		if !strings.Contains(joined, want) {
			t.Errorf("audit lacks %s: %s", want, joined)
		}
	}
	// A second Open of a file in use waits for the lock, then fails.
	_, err = node.Open(path, node.OpenOptions{Timeout: 100 * time.Millisecond})
	if hsm.CodeOf(err) != hsm.CodeUnavailable {
		t.Errorf("open of a locked file: %v", err)
	}
}

func TestAuditContents(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{})
	k, _ := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256})
	n.Login(ctx, hsm.Credentials{User: "alice", Password: "wrong-password"})
	s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: k.Ref, Payload: k.Ref})
	var recs []node.AuditRecord
	if err := n.Audit(func(r node.AuditRecord) error { recs = append(recs, r); return nil }); err != nil {
		t.Fatal(err)
	}
	var failed, wrap bool
	for i, r := range recs {
		if r.Seq != uint64(i+1) || r.Time.IsZero() || r.Hash == "" {
			t.Errorf("record %d: %+v", i+1, r)
		}
		if r.Op == "login-failed" && r.User == "alice" && r.Outcome == string(hsm.CodePermission) {
			failed = true
		}
		if r.Op == "wrap" && r.Outcome != "ok" && len(r.Handles) == 2 && r.Handles[0] == k.Ref {
			wrap = true
		}
	}
	if !failed || !wrap {
		t.Errorf("audit misses the failed login (%v) or the refused wrap (%v)", failed, wrap)
	}
	// Never a password or key material.
	raw := auditBytes(t, n)
	for _, secret := range []string{alice.Password, officer.Password, "wrong-password"} {
		if bytes.Contains(raw, []byte(secret)) {
			t.Errorf("the audit log contains a password")
		}
	}
}

// auditBytes returns every stored audit value concatenated (reads the file
// through a second handle after closing the node's).
func auditBytes(t *testing.T, n *node.Node) []byte {
	t.Helper()
	path := n.Path()
	n.Close()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var out []byte
	db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("audit")).ForEach(func(k, v []byte) error { out = append(out, v...); return nil })
	})
	return out
}

func TestAuditTamper(t *testing.T) {
	cases := []struct {
		name   string
		tamper func(b *bolt.Bucket) error
		want   string
	}{
		{"altered", func(b *bolt.Bucket) error {
			v := bytes.Clone(b.Get(seq(3)))
			v = bytes.Replace(v, []byte(`"admin"`), []byte(`"eve00"`), 1)
			v = bytes.Replace(v, []byte(`"alice"`), []byte(`"eve00"`), 1)
			return b.Put(seq(3), v)
		}, "audit record 3: its contents do not match its hash"},
		{"removed", func(b *bolt.Bucket) error { return b.Delete(seq(3)) }, "audit record 3: is missing"},
		{"removed-last", func(b *bolt.Bucket) error {
			k, _ := b.Cursor().Last()
			return b.Delete(k)
		}, "records were removed from the end"},
		{"reordered", func(b *bolt.Bucket) error {
			v3, v4 := bytes.Clone(b.Get(seq(3))), bytes.Clone(b.Get(seq(4)))
			if err := b.Put(seq(3), v4); err != nil {
				return err
			}
			return b.Put(seq(4), v3)
		}, "audit record 3: holds record 4: records were reordered"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			n, s := withAlice(t, node.Options{})
			for i := 0; i < 3; i++ {
				s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128})
			}
			if _, err := n.VerifyAudit(); err != nil {
				t.Fatal(err)
			}
			path := n.Path()
			n.Close()
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(func(tx *bolt.Tx) error { return c.tamper(tx.Bucket([]byte("audit"))) }); err != nil {
				t.Fatal(err)
			}
			db.Close()
			n2, err := node.Open(path, node.OpenOptions{KDFIterations: testKDF})
			if err != nil {
				t.Fatal(err)
			}
			defer n2.Close()
			_, err = n2.VerifyAudit()
			if err == nil {
				t.Fatal("VerifyAudit found nothing wrong")
			}
			var ae *node.AuditError
			if !errors.As(err, &ae) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("VerifyAudit: %v; want an *AuditError containing %q", err, c.want)
			}
		})
	}
}

func seq(i uint64) []byte {
	b := make([]byte, 8)
	for j := 7; j >= 0; j-- {
		b[j] = byte(i)
		i >>= 8
	}
	return b
}

func TestFaults(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{})
	n.SetFault(node.Fault{Down: true})
	_, err := s.ListKeys(ctx, hsm.Filter{})
	if hsm.CodeOf(err) != hsm.CodeUnavailable || !hsm.IsRetryable(err) {
		t.Errorf("down: %v", err)
	}
	if _, err := n.Login(ctx, alice); hsm.CodeOf(err) != hsm.CodeUnavailable {
		t.Errorf("login while down: %v", err)
	}
	if _, err := n.PeerListKeys(ctx); hsm.CodeOf(err) != hsm.CodeUnavailable {
		t.Errorf("peer call while down: %v", err)
	}
	n.SetFault(node.Fault{FailNext: 2})
	for i := 0; i < 2; i++ {
		if _, err := s.ListKeys(ctx, hsm.Filter{}); hsm.CodeOf(err) != hsm.CodeUnavailable {
			t.Errorf("FailNext op %d: %v", i, err)
		}
	}
	if _, err := s.ListKeys(ctx, hsm.Filter{}); err != nil {
		t.Errorf("after FailNext ran out: %v", err)
	}
	n.SetFault(node.Fault{Throttle: 1})
	if _, err := s.ListKeys(ctx, hsm.Filter{}); hsm.CodeOf(err) != hsm.CodeThrottled || !hsm.IsRetryable(err) {
		t.Errorf("throttle 1.0: %v", err)
	}
	n.SetFault(node.Fault{Throttle: 0.5})
	throttled := 0
	for i := 0; i < 200; i++ {
		if _, err := s.ListKeys(ctx, hsm.Filter{}); hsm.CodeOf(err) == hsm.CodeThrottled {
			throttled++
		}
	}
	if throttled < 50 || throttled > 150 {
		t.Errorf("throttle 0.5 throttled %d of 200", throttled)
	}
	// Latency respects the context and holds no lock: 16 concurrent calls
	// take about one latency, not sixteen.
	n.SetFault(node.Fault{Latency: 100 * time.Millisecond})
	short, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	if _, err := s.ListKeys(short, hsm.Filter{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("latency past the deadline: %v", err)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.ListKeys(ctx, hsm.Filter{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if d := time.Since(start); d > 1200*time.Millisecond {
		t.Errorf("16 calls with 100ms latency took %v: latency is serialised", d)
	}
	n.SetFault(node.Fault{})
	if _, err := s.ListKeys(ctx, hsm.Filter{}); err != nil {
		t.Errorf("after clearing faults: %v", err)
	}
	cancelled, cancel2 := context.WithCancel(ctx)
	cancel2()
	if _, err := s.ListKeys(cancelled, hsm.Filter{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v", err)
	}
}

func TestPeerAndSnapshot(t *testing.T) {
	ctx := context.Background()
	secret := bytes.Repeat([]byte{7}, 32)
	n, s := withAlice(t, node.Options{Lineage: "lineage-peer", LineageSecret: secret})
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "p", Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false}}})
	if err != nil {
		t.Fatal(err)
	}
	ses, _ := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Session: true}})
	keys, err := n.PeerListKeys(ctx)
	if err != nil || len(keys) != 1 || keys[0].Ref != k.Ref {
		t.Fatalf("PeerListKeys: %+v, %v (session keys must not be listed)", keys, err)
	}
	if _, err := n.PeerExportMasked(ctx, ses.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("peer export of a session key: %v", err)
	}
	users, err := n.PeerUsers(ctx)
	if err != nil || len(users) != 2 || len(users[0].Hash) != 32 {
		t.Fatalf("PeerUsers: %+v, %v", users, err)
	}
	blob, err := n.PeerExportMasked(ctx, k.Ref)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := n.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(snap, []byte(alice.Password)) {
		t.Error("snapshot holds a password")
	}

	// A clone: same lineage and secret, users copied by the peer API.
	o := node.Options{Lineage: n.Lineage(), LineageSecret: secret}
	clone := newNode(t, o)
	if _, err := clone.PeerInsertMasked(ctx, blob); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("insert before the owner exists: %v", err)
	}
	for _, u := range users {
		if u.Name == alice.User {
			if err := clone.PeerPutUser(ctx, u); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, err := clone.PeerInsertMasked(ctx, blob)
	if err != nil || got.Ref != k.Ref || !bytes.Equal(got.KCV, k.KCV) {
		t.Fatalf("clone insert: %+v, %v", got, err)
	}
	cs := login(t, clone, alice) // the password hash travelled
	if _, err := cs.GetKey(ctx, k.Ref); err != nil {
		t.Error(err)
	}
	if err := clone.PeerDeleteUser(ctx, alice.User); hsm.CodeOf(err) != hsm.CodePermission {
		t.Errorf("peer delete of a user who owns keys: %v", err)
	}
	if err := clone.PeerDeleteKey(ctx, k.Ref); err != nil {
		t.Fatal(err)
	}
	if err := clone.PeerDeleteKey(ctx, k.Ref); hsm.CodeOf(err) != hsm.CodeNotFound {
		t.Errorf("second peer delete: %v", err)
	}

	// Restore the snapshot into the clone: users and keys come back.
	if err := clone.RestoreSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	cs2 := login(t, clone, alice)
	if got, err := cs2.GetKey(ctx, k.Ref); err != nil || !bytes.Equal(got.KCV, k.KCV) || got.Attrs.Extractable {
		t.Errorf("after restore: %+v, %v", got, err)
	}
	// Another lineage refuses both.
	stranger := newNode(t, node.Options{})
	if _, err := stranger.PeerInsertMasked(ctx, blob); hsm.CodeOf(err) != hsm.CodeIntegrity || !strings.Contains(err.Error(), "only clones share a masking key") {
		t.Errorf("foreign masked object: %v", err)
	}
	if err := stranger.RestoreSnapshot(ctx, snap); hsm.CodeOf(err) != hsm.CodeIntegrity {
		t.Errorf("foreign snapshot: %v", err)
	}
	if _, err := clone.VerifyAudit(); err != nil {
		t.Error(err)
	}
}
