package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

var testOfficer = hsm.Credentials{User: "admin", Password: "officer-password"}

// auditedNode is a bootstrapped node with a few records of both kinds.
func auditedNode(t *testing.T) *Node {
	t.Helper()
	n := newInternal(t, Options{})
	ctx := context.Background()
	if err := n.Bootstrap(ctx, testOfficer); err != nil {
		t.Fatal(err)
	}
	s, err := n.Login(ctx, testOfficer)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.(hsm.FullSession).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "alice-password"); err != nil {
		t.Fatal(err)
	}
	if err := s.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	return n
}

func readHeadOf(t *testing.T, n *Node) auditHead {
	t.Helper()
	var h auditHead
	if err := n.db.View(func(tx *bolt.Tx) error { var err error; h, err = readHead(tx); return err }); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestAuditLineIsMarshalledRecord: the JSON of each line, built by hand
// under the lock, is exactly json.Marshal of the record it holds.
func TestAuditLineIsMarshalledRecord(t *testing.T) {
	n := auditedNode(t)
	n.now = func() time.Time { return time.Date(2026, 3, 4, 5, 6, 7, 8, time.FixedZone("x", 3600)) }
	n.audit(context.Background(), "b<o>b&\"q\"\u2028", "wrap", hsm.Errorf(hsm.CodePermission, "wrap", 0, "no"), 1, 1<<63)
	n.record(hsm.AuditRecord{User: "u", Op: "op", Target: "t", Outcome: "ok", Time: time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC)})
	n.record(hsm.AuditRecord{User: "ünï", Op: "op\x00\x7f", Target: "a&b\\", Handles: []hsm.KeyRef{}, Outcome: "ok"})
	path := n.log.path
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	if len(lines) < 5 || lines[len(lines)-1] != "" {
		t.Fatalf("audit file: %q", b)
	}
	prev := ""
	for i, line := range lines[:len(lines)-1] {
		sum, body, reason := splitLine([]byte(strings.TrimSuffix(line, "\n")))
		if reason != "" {
			t.Fatalf("line %d %s", i+1, reason)
		}
		var rec hsm.AuditRecord
		if err := json.Unmarshal(body, &rec); err != nil {
			t.Fatal(err)
		}
		again, _ := json.Marshal(rec)
		if !bytes.Equal(again, body) {
			t.Errorf("line %d:\n got %s\nwant %s", i+1, body, again)
		}
		p, _ := hex.DecodeString(prev)
		if rec.Seq != uint64(i+1) || rec.Prev != prev || chainHash(p, body) != sum {
			t.Errorf("line %d does not chain: %s", i+1, line)
		}
		prev = hex.EncodeToString(sum[:])
	}
}

func TestAppendRecordJSON(t *testing.T) {
	for _, rec := range []hsm.AuditRecord{
		{},
		{Seq: 1 << 63, Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("", -7*3600)), User: "alice", Op: "wrap",
			Handles: []hsm.KeyRef{1, 0xffffffffffffffff}, Target: "bob", Outcome: "ok", Prev: strings.Repeat("ab", 32), Hash: "x"},
		{User: "\xff\xfe", Op: "\u2028\u2029", Target: "<script>&", Outcome: "\"\\\n\t", Handles: []hsm.KeyRef{}},
	} {
		want, _ := json.Marshal(rec)
		prev, _ := hex.DecodeString(rec.Prev)
		if got := appendRecordJSON([]byte("junk"), &rec, prev); string(got) != "junk"+string(want) {
			t.Errorf("\n got %s\nwant junk%s", got, want)
		}
	}
}

// TestAuditHeadFollowsIdleLog: records not waited for reach the disk, and
// the head in meta follows them within about auditHeadInterval even if
// nothing else happens.
func TestAuditHeadFollowsIdleLog(t *testing.T) {
	n := auditedNode(t)
	for i := 0; i < 10; i++ {
		n.audit(context.Background(), "u", "encrypt", nil)
	}
	n.log.mu.Lock()
	last := n.log.next
	n.log.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for readHeadOf(t, n).Seq != last {
		if time.Now().After(deadline) {
			t.Fatalf("head %+v, last record %d", readHeadOf(t, n), last)
		}
		time.Sleep(10 * time.Millisecond) // polling for the head the flusher writes; the deadline only ends a hang
	}
	if got, err := n.VerifyAudit(); err != nil || uint64(got) != last {
		t.Errorf("VerifyAudit: %d, %v", got, err)
	}
}

// TestAuditWriteFailure: once the file cannot be written, the operation
// waiting for its record and every later one fail with a storage error.
func TestAuditWriteFailure(t *testing.T) {
	n := auditedNode(t)
	ctx := context.Background()
	n.log.f.Close() // the flusher's next write fails
	_, err := n.Login(ctx, testOfficer)
	if err == nil || hsm.CodeOf(err) != "" || !strings.Contains(err.Error(), "hsm hsm-internal: writing login: audit log") {
		t.Fatalf("login with a broken audit file: %v", err)
	}
	if err := n.audit(ctx, "u", "encrypt", nil); err == nil || !strings.Contains(err.Error(), "writing encrypt") {
		t.Errorf("later op: %v", err)
	}
	if _, err := n.VerifyAudit(); err == nil {
		t.Error("VerifyAudit of a failed log succeeded")
	}
	if err := n.Close(); err == nil {
		t.Error("Close of a failed log reported nothing")
	}
}

// TestAuditLegacyBucket: a file written when the audit log was a bbolt
// bucket has its records moved to the audit file on Open.
func TestAuditLegacyBucket(t *testing.T) {
	for _, drop := range []uint64{0, 2} {
		n := auditedNode(t)
		want, err := n.VerifyAudit()
		if err != nil {
			t.Fatal(err)
		}
		path, apath := n.path, n.log.path
		n.Close()
		b, _ := os.ReadFile(apath)
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = db.Update(func(tx *bolt.Tx) error {
			bk, err := tx.CreateBucket(bktAudit)
			if err != nil {
				return err
			}
			for i, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
				if uint64(i+1) == drop {
					continue
				}
				sum, body, _ := splitLine([]byte(line))
				if err := bk.Put(seqKey(uint64(i+1)), append(sum[:], body...)); err != nil {
					return err
				}
			}
			return nil
		})
		db.Close()
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(apath)
		n2, err := Open(path, OpenOptions{KDFIterations: 1000})
		if err != nil {
			t.Fatal(err)
		}
		got, err := n2.VerifyAudit()
		if drop == 0 && (err != nil || got != want) {
			t.Errorf("migrated log: %d records (want %d), %v", got, want, err)
		}
		if drop != 0 && (err == nil || !strings.Contains(err.Error(), "audit record 2: is missing")) {
			t.Errorf("migrated log without record 2: %v", err)
		}
		n2.db.View(func(tx *bolt.Tx) error {
			if tx.Bucket(bktAudit) != nil {
				t.Error("the audit bucket is still there")
			}
			return nil
		})
		n2.Close()
	}
}

// TestAuditLongLines: records longer than every buffer and tail window
// (a logout that drops many session keys) are read, verified and found at
// the tail; a torn line that long is cut.
func TestAuditLongLines(t *testing.T) {
	n := auditedNode(t)
	handles := make([]hsm.KeyRef, 20000)
	for i := range handles {
		handles[i] = hsm.KeyRef(uint64(i+1) << 40)
	}
	n.audit(context.Background(), "u", "logout", nil, handles...)
	n.audit(context.Background(), "u", "logout", nil, handles[:5000]...)
	want, err := n.VerifyAudit()
	if err != nil {
		t.Fatal(err)
	}
	path, apath := n.path, n.log.path
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(apath); fi.Size() < 3*auditTailWindow {
		t.Fatalf("audit file of %d bytes: the records are not long enough", fi.Size())
	}
	f, _ := os.OpenFile(apath, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(bytes.Repeat([]byte("x"), 3*auditTailWindow))
	f.Close()
	n2, err := Open(path, OpenOptions{KDFIterations: 1000})
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	if got, err := n2.VerifyAudit(); err != nil || got != want {
		t.Fatalf("after reopen: %d records (want %d), %v", got, want, err)
	}
	n2.audit(context.Background(), "u", "encrypt", nil)
	var lens []int
	if err := n2.Audit(func(r hsm.AuditRecord) error { lens = append(lens, len(r.Handles)); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(lens) != want+1 || lens[want-2] != 20000 || lens[want-1] != 5000 {
		t.Errorf("handles per record: %v", lens)
	}
	if got, err := n2.VerifyAudit(); err != nil || got != want+1 {
		t.Fatalf("one more: %d records (want %d), %v", got, want+1, err)
	}
}
