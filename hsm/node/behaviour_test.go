package node_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
)

func login(t testing.TB, n *node.Node, c hsm.Credentials) hsm.FullSession {
	t.Helper()
	s, err := n.Login(context.Background(), c)
	if err != nil {
		t.Fatalf("login %s: %v", c.User, err)
	}
	return s.(hsm.FullSession)
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
	if err := s.(hsm.FullSession).SetAttribute(ctx, tok.Ref, hsm.AttrModifiable, false); err != nil {
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

	n2, err := node.Open(path, node.OpenOptions{})
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
	n2.Audit(func(r hsm.AuditRecord) error { ops = append(ops, r.Op); return nil })
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
	var recs []hsm.AuditRecord
	if err := n.Audit(func(r hsm.AuditRecord) error { recs = append(recs, r); return nil }); err != nil {
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

// auditBytes returns the audit file (read after closing the node, which
// writes every buffered record).
func auditBytes(t *testing.T, n *node.Node) []byte {
	t.Helper()
	n.Close()
	b, err := os.ReadFile(node.AuditPath(n.Path()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// auditLines splits an audit file into its lines, each with its '\n'; the
// last element is empty.
func auditLines(b []byte) [][]byte { return bytes.SplitAfter(b, []byte("\n")) }

func TestAuditTamper(t *testing.T) {
	// Each tamper gets the file's lines and returns them altered. Line i-1
	// holds record i.
	cases := []struct {
		name   string
		tamper func(t *testing.T, lines [][]byte) [][]byte
		want   string
		later  string // after new records, if not want
	}{
		{"altered", func(t *testing.T, lines [][]byte) [][]byte {
			v := bytes.Clone(lines[2])
			v = bytes.Replace(v, []byte(`"admin"`), []byte(`"eve00"`), 1)
			v = bytes.Replace(v, []byte(`"alice"`), []byte(`"eve00"`), 1)
			if bytes.Equal(v, lines[2]) {
				t.Fatalf("record 3 has no user to alter: %s", v)
			}
			lines[2] = v
			return lines
		}, "audit record 3: its contents do not match its hash", ""},
		{"altered-json", func(t *testing.T, lines [][]byte) [][]byte {
			lines[2] = bytes.Replace(lines[2], []byte(`{"seq"`), []byte(`["seq"`), 1)
			return lines
		}, "audit record 3: is not valid json: it was altered", ""},
		{"removed", func(t *testing.T, lines [][]byte) [][]byte {
			return slices.Delete(lines, 2, 3)
		}, "audit record 3: is missing (record 4 follows record 2): records were removed", ""},
		{"removed-last", func(t *testing.T, lines [][]byte) [][]byte {
			return slices.Delete(lines, len(lines)-3, len(lines)-1) // the last two records
		}, "records were removed from the end", "is missing (record"}, // the new records follow the head: a gap
		{"reordered", func(t *testing.T, lines [][]byte) [][]byte {
			lines[2], lines[3] = lines[3], lines[2]
			return lines
		}, "audit record 3: holds record 4: records were reordered", ""},
		{"truncated-record", func(t *testing.T, lines [][]byte) [][]byte {
			lines[2] = []byte("0123\n")
			return lines
		}, "audit record 3: is truncated", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			n, s := withAlice(t, node.Options{})
			for i := 0; i < 3; i++ {
				if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128}); err != nil {
					t.Fatal(err)
				}
			}
			total, err := n.VerifyAudit()
			if err != nil {
				t.Fatal(err)
			}
			path := n.Path()
			lines := auditLines(auditBytes(t, n))
			if len(lines) != total+1 || len(lines[total]) != 0 {
				t.Fatalf("%d records in %d lines", total, len(lines))
			}
			if err := os.WriteFile(node.AuditPath(path), bytes.Join(c.tamper(t, lines), nil), 0o600); err != nil {
				t.Fatal(err)
			}
			var cur *node.Node
			check := func(when, want string) {
				t.Helper()
				_, err := cur.VerifyAudit()
				if err == nil {
					t.Fatalf("%s: VerifyAudit found nothing wrong", when)
				}
				var ae *node.AuditError
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), want) {
					t.Errorf("%s: VerifyAudit: %v; want an *AuditError containing %q", when, err, want)
				}
			}
			reopen := func() {
				t.Helper()
				var err error
				if cur, err = node.Open(path, node.OpenOptions{}); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { cur.Close() })
			}
			reopen()
			check("after reopen", c.want)
			later := c.want
			if c.later != "" {
				later = c.later
			}
			// New records neither hide the damage nor move the head back.
			s2 := login(t, cur, alice)
			if _, err := s2.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128}); err != nil {
				t.Fatal(err)
			}
			check("after more records", later)
			if err := cur.Close(); err != nil {
				t.Fatal(err)
			}
			reopen()
			check("after another reopen", later)
		})
	}
}

// TestAuditTornLine appends half a record to the file of a closed node, as
// a power cut in the middle of a write leaves it: Open cuts it, the chain is
// intact, and it goes on.
func TestAuditTornLine(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{})
	if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128}); err != nil {
		t.Fatal(err)
	}
	before, err := n.VerifyAudit()
	if err != nil {
		t.Fatal(err)
	}
	path := n.Path()
	clean := auditBytes(t, n)
	torn := append(bytes.Clone(clean), `9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 {"seq":99,"time":"2026-01-`...)
	if err := os.WriteFile(node.AuditPath(path), torn, 0o600); err != nil {
		t.Fatal(err)
	}
	n2, err := node.Open(path, node.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	if got, _ := os.ReadFile(node.AuditPath(path)); !bytes.Equal(got, clean) {
		t.Errorf("Open did not cut the torn line: %q", got[min(len(got), len(clean)):])
	}
	if got, err := n2.VerifyAudit(); err != nil || got != before {
		t.Fatalf("after cutting the torn line: %d records (want %d), %v", got, before, err)
	}
	login(t, n2, alice)
	if got, err := n2.VerifyAudit(); err != nil || got != before+1 {
		t.Fatalf("one more record: %d records (want %d), %v", got, before+1, err)
	}
}

// TestAuditConcurrent runs operations that change nothing (their records
// are not waited for) and state changes (waited for) from 32 goroutines,
// then checks that every one of them is in the chain, before and after a
// reopen.
func TestAuditConcurrent(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{KeyCapacity: 10000, MaxConcurrentOps: 1000})
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Session: true,
		Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrEncrypt: true}}})
	if err != nil {
		t.Fatal(err)
	}
	payload, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Session: true,
		Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true}}})
	if err != nil {
		t.Fatal(err)
	}
	base, err := n.VerifyAudit()
	if err != nil {
		t.Fatal(err)
	}
	const goroutines, each = 32, 40 // each a multiple of 5
	var wg sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				var err error
				switch i % 5 {
				case 0: // a state change: a token key
					_, err = s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128})
				case 1:
					_, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: payload.Ref})
				case 2:
					_, err = s.Encrypt(ctx, kek.Ref, hsm.MechAESGCM, hsm.Params{}, []byte("audit me"))
				case 3: // a session object made and destroyed: two records
					var k hsm.KeyInfo
					if k, err = s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Session: true}}); err == nil {
						err = s.(hsm.FullSession).DeleteKey(ctx, k.Ref)
					}
				case 4: // refused, and recorded all the same
					_, err = s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: payload.Ref, Payload: kek.Ref})
					if hsm.CodeOf(err) == "" {
						t.Errorf("wrap with a key that may not wrap: %v", err)
					}
					err = nil
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := base + goroutines*(each+each/5) // case 3 makes two records
	if got, err := n.VerifyAudit(); err != nil || got != want {
		t.Fatalf("VerifyAudit: %d records (want %d), %v", got, want, err)
	}
	path := n.Path()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	n2, err := node.Open(path, node.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	if got, err := n2.VerifyAudit(); err != nil || got != want {
		t.Fatalf("after reopen: %d records (want %d), %v", got, want, err)
	}
	ops := map[string]int{}
	if err := n2.Audit(func(r hsm.AuditRecord) error { ops[r.Op+" "+r.Outcome]++; return nil }); err != nil {
		t.Fatal(err)
	}
	if ops["wrap ok"] != goroutines*each/5 || ops["encrypt ok"] != goroutines*each/5 {
		t.Errorf("records by op and outcome: %v", ops)
	}
}

func TestFaults(t *testing.T) {
	ctx := context.Background()
	n, s := withAlice(t, node.Options{})
	n.SetFault(hsm.Fault{Down: true})
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
	n.SetFault(hsm.Fault{FailNext: 2})
	for i := 0; i < 2; i++ {
		if _, err := s.ListKeys(ctx, hsm.Filter{}); hsm.CodeOf(err) != hsm.CodeUnavailable {
			t.Errorf("FailNext op %d: %v", i, err)
		}
	}
	if _, err := s.ListKeys(ctx, hsm.Filter{}); err != nil {
		t.Errorf("after FailNext ran out: %v", err)
	}
	n.SetFault(hsm.Fault{Throttle: 1})
	if _, err := s.ListKeys(ctx, hsm.Filter{}); hsm.CodeOf(err) != hsm.CodeThrottled || !hsm.IsRetryable(err) {
		t.Errorf("throttle 1.0: %v", err)
	}
	n.SetFault(hsm.Fault{Throttle: 0.5})
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
	n.SetFault(hsm.Fault{Latency: 100 * time.Millisecond})
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
	n.SetFault(hsm.Fault{})
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
