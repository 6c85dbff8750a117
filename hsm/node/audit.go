package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// AuditRecord is one entry of the audit log. It never holds key material or
// passwords.
type AuditRecord struct {
	Seq     uint64       `json:"seq"`
	Time    time.Time    `json:"time"`
	User    string       `json:"user"`              // who acted; "peer" for the cluster layer
	Op      string       `json:"op"`                // login, login-failed, generate, wrap, ...
	Handles []hsm.KeyRef `json:"handles,omitempty"` // keys involved
	Target  string       `json:"target,omitempty"`  // user acted upon (user management, share), or attribute name
	Outcome string       `json:"outcome"`           // "ok" or the error code
	Prev    string       `json:"prev"`              // hex SHA-256 of the previous record
	Hash    string       `json:"-"`                 // hex SHA-256 of Prev ‖ this record's JSON; filled in by Audit
}

// auditHead is the chain's last sequence number and hash, kept in meta so
// that removing records from the end is detected too.
type auditHead struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

func seqKey(s uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], s)
	return b[:]
}

// appendAudit adds rec to the chain inside tx. Stored value: 32-byte hash ‖ JSON.
func (n *Node) appendAudit(tx *bolt.Tx, rec *AuditRecord) error {
	meta := tx.Bucket(bktMeta)
	var head auditHead
	if v := meta.Get(metaAuditHead); v != nil {
		if err := json.Unmarshal(v, &head); err != nil {
			return fmt.Errorf("audit head is corrupt: %w", err)
		}
	}
	rec.Seq = head.Seq + 1
	rec.Prev = head.Hash
	if rec.Time.IsZero() {
		rec.Time = n.now().UTC()
	}
	body, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	prev, _ := hex.DecodeString(head.Hash)
	sum := chainHash(prev, body)
	val := make([]byte, 0, len(sum)+len(body))
	val = append(append(val, sum[:]...), body...)
	if err := tx.Bucket(bktAudit).Put(seqKey(rec.Seq), val); err != nil {
		return err
	}
	hj, _ := json.Marshal(auditHead{Seq: rec.Seq, Hash: hex.EncodeToString(sum[:])})
	return meta.Put(metaAuditHead, hj)
}

func chainHash(prev, body []byte) [32]byte {
	h := sha256.New()
	h.Write(prev)
	h.Write(body)
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// AuditError reports the first bad record of the audit log.
type AuditError struct {
	Seq    uint64 // sequence number (position) of the first bad record
	Reason string
}

// Error names the record and what is wrong with it.
func (e *AuditError) Error() string {
	return fmt.Sprintf("audit record %d: %s", e.Seq, e.Reason)
}

// VerifyAudit walks the hash chain and returns how many records it holds, or
// an *AuditError naming the first altered, missing or reordered record.
func (n *Node) VerifyAudit() (records int, err error) {
	if n.closed.Load() {
		return 0, hsm.Errorf(hsm.CodeUnavailable, "audit verify", 0, "hsm %s is closed", n.opt.ID)
	}
	err = n.db.View(func(tx *bolt.Tx) error {
		var head auditHead
		if v := tx.Bucket(bktMeta).Get(metaAuditHead); v != nil {
			if err := json.Unmarshal(v, &head); err != nil {
				return &AuditError{Seq: 0, Reason: "the log head is corrupt"}
			}
		}
		var prev []byte
		want := uint64(1)
		c := tx.Bucket(bktAudit).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(k) != 8 {
				return &AuditError{Seq: want, Reason: fmt.Sprintf("a record with a malformed key %x sits where record %d should be", k, want)}
			}
			pos := binary.BigEndian.Uint64(k)
			if pos != want {
				return &AuditError{Seq: want, Reason: fmt.Sprintf("is missing (record %d follows record %d): records were removed", pos, want-1)}
			}
			if len(v) < 32 {
				return &AuditError{Seq: pos, Reason: "is truncated"}
			}
			var rec AuditRecord
			if err := json.Unmarshal(v[32:], &rec); err != nil {
				return &AuditError{Seq: pos, Reason: "is not valid json: it was altered"}
			}
			if rec.Seq != pos {
				return &AuditError{Seq: pos, Reason: fmt.Sprintf("holds record %d: records were reordered", rec.Seq)}
			}
			if rec.Prev != hex.EncodeToString(prev) {
				return &AuditError{Seq: pos, Reason: "does not chain to the record before it: records were reordered, removed or altered"}
			}
			sum := chainHash(prev, v[32:])
			if !bytes.Equal(sum[:], v[:32]) {
				return &AuditError{Seq: pos, Reason: "its contents do not match its hash: it was altered"}
			}
			prev = sum[:]
			records++
			want++
		}
		if uint64(records) != head.Seq {
			return &AuditError{Seq: uint64(records) + 1, Reason: fmt.Sprintf("is missing: the log head says the log ends at record %d: records were removed from the end", head.Seq)}
		}
		if head.Seq > 0 && head.Hash != hex.EncodeToString(prev) {
			return &AuditError{Seq: head.Seq, Reason: "does not match the log head's hash: it was altered or replaced"}
		}
		return nil
	})
	if err != nil {
		var ae *AuditError
		if errors.As(err, &ae) {
			return records, fmt.Errorf("audit log of hsm %s is not intact: %w", n.opt.ID, err)
		}
		return records, err
	}
	return records, nil
}

// Audit calls fn with each record in order, stopping at fn's first error.
// It does not verify the chain (see VerifyAudit).
func (n *Node) Audit(fn func(AuditRecord) error) error {
	if n.closed.Load() {
		return hsm.Errorf(hsm.CodeUnavailable, "audit", 0, "hsm %s is closed", n.opt.ID)
	}
	// Read in pages so fn never runs inside a long read transaction.
	var from uint64 = 1
	for {
		var page []AuditRecord
		err := n.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bktAudit).Cursor()
			for k, v := c.Seek(seqKey(from)); k != nil && len(page) < 512; k, v = c.Next() {
				var rec AuditRecord
				if len(v) < 32 {
					return fmt.Errorf("audit record %x is truncated", k)
				}
				if err := json.Unmarshal(v[32:], &rec); err != nil {
					return fmt.Errorf("audit record %x: %w", k, err)
				}
				rec.Hash = hex.EncodeToString(v[:32])
				page = append(page, rec)
				from = binary.BigEndian.Uint64(k) + 1
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, r := range page {
			if err := fn(r); err != nil {
				return err
			}
		}
		if len(page) < 512 {
			return nil
		}
	}
}

// txAbort marks an error that must roll back the transaction (storage
// failures), as opposed to an *hsm.Error, which is an operation's refused
// outcome and is audited.
type txAbort struct{ err error }

func (e txAbort) Error() string { return e.err.Error() }

// write runs fn in a batched write transaction and appends the audit record
// in the same transaction. fn must check everything before it writes
// anything: an *hsm.Error it returns is the operation's outcome (recorded,
// and the transaction commits the audit record only); any other error
// aborts the transaction. fn may run more than once (bbolt Batch), so it
// must reset whatever it reports through closures.
func (n *Node) write(ctx context.Context, rec AuditRecord, fn func(tx *bolt.Tx, rec *AuditRecord) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var opErr error
	err := n.db.Batch(func(tx *bolt.Tx) error {
		r := rec
		r.Handles = append([]hsm.KeyRef(nil), rec.Handles...)
		opErr = nil
		if fn != nil {
			if err := fn(tx, &r); err != nil {
				var he *hsm.Error
				if !errors.As(err, &he) {
					return txAbort{err}
				}
				opErr = err
				r.Outcome = string(he.Code)
			}
		}
		if r.Outcome == "" {
			r.Outcome = "ok"
		}
		return n.appendAudit(tx, &r)
	})
	if err != nil {
		if n.closed.Load() {
			return hsm.Errorf(hsm.CodeUnavailable, rec.Op, 0, "hsm %s is closed", n.opt.ID)
		}
		return fmt.Errorf("hsm %s: writing %s: %w", n.opt.ID, rec.Op, err)
	}
	return opErr
}

// audit records an operation that changed nothing, with its outcome, and
// returns opErr (or the storage error if the record could not be written).
func (n *Node) audit(ctx context.Context, user, op string, opErr error, handles ...hsm.KeyRef) error {
	rec := AuditRecord{User: user, Op: op, Handles: handles, Outcome: outcome(opErr)}
	// The audit must land even if the caller gave up meanwhile.
	if err := n.write(context.WithoutCancel(ctx), rec, nil); err != nil {
		return err
	}
	return opErr
}

func outcome(err error) string {
	if err == nil {
		return "ok"
	}
	if c := hsm.CodeOf(err); c != "" {
		return string(c)
	}
	return "error"
}
