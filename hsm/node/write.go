package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	bolt "go.etcd.io/bbolt"
)

// The commit path of every change: one batched transaction, its audit
// record, and the wait for both to reach the disk.

// txAbort marks an error that must roll back the transaction (storage
// failures), as opposed to an *hsm.Error, which is an operation's refused
// outcome and is audited.
type txAbort struct{ err error }

func (e txAbort) Error() string { return e.err.Error() }

// write runs fn in a batched write transaction, then appends the audit
// record and waits until it is on disk. fn must check everything before it
// writes anything: an *hsm.Error it returns is the operation's outcome
// (recorded; the transaction changes nothing); any other error aborts the
// transaction and nothing is recorded. fn may run more than once (see
// boltgroup), so it must reset whatever it reports through closures. The
// record is appended when the change is final in its transaction, before
// the commit (so the two syncs overlap); a commit that then fails is
// followed by a "rolled-back" record naming it. write returns once both
// the commit and the record are on disk.
func (n *Node) write(ctx context.Context, rec hsm.AuditRecord, fn func(tx *bolt.Tx, rec *hsm.AuditRecord) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// Close waits for writes between their commit and their record.
	n.writing.RLock()
	if n.closed.Load() {
		n.writing.RUnlock()
		return n.closedErr(rec.Op)
	}
	if err := n.log.failed(); err != nil {
		n.writing.RUnlock()
		return n.logErr(rec.Op, err)
	}
	r := rec
	var (
		opErr  error
		seq    uint64
		logErr error
	)
	appendRecord := func() error {
		if r.Outcome == "" {
			r.Outcome = "ok"
		}
		seq, logErr = n.log.append(&r, n.now)
		if logErr != nil {
			return logErr
		}
		return failpoint.Hit(failpoint.NodeAfterAuditAppend)
	}
	if fn == nil {
		appendRecord()
	} else {
		// The record is appended once the change is final in its
		// transaction, just before the commit, so that the audit file's
		// sync runs while the commit does instead of after it.
		err := n.group.DoApplied(func(tx *bolt.Tx) error {
			r = rec
			r.Handles = append([]hsm.KeyRef(nil), rec.Handles...)
			opErr = nil
			if err := fn(tx, &r); err != nil {
				var he *hsm.Error
				if !errors.As(err, &he) {
					return txAbort{err}
				}
				opErr = err
				r.Outcome = string(he.Code)
			}
			return nil
		}, appendRecord)
		if err != nil && logErr == nil {
			if seq != 0 {
				// Logged, then the commit failed: say so in the log.
				n.log.append(&hsm.AuditRecord{User: r.User, Op: r.Op, Handles: r.Handles, Target: r.Target,
					Outcome: "rolled-back: the change of record " + fmt.Sprint(seq) + " was not committed"}, n.now)
			}
			n.writing.RUnlock()
			return fmt.Errorf("hsm %s: writing %s: %w", n.opt.ID, rec.Op, err)
		}
	}
	n.writing.RUnlock()
	err := logErr
	if err == nil && fn != nil {
		err = failpoint.Hit(failpoint.NodeAfterCommit)
	}
	if err == nil {
		err = n.log.waitDurable(seq)
	}
	if err != nil {
		return n.logErr(rec.Op, err)
	}
	return opErr
}

// audit records an operation that changed nothing, with its outcome, and
// returns opErr (or the storage error if the record could not be
// appended). It does not wait for the record to reach the disk.
func (n *Node) audit(_ context.Context, user, op string, opErr error, handles ...hsm.KeyRef) error {
	if err := n.record(hsm.AuditRecord{User: user, Op: op, Handles: handles, Outcome: outcome(opErr)}); err != nil {
		return err
	}
	return opErr
}

// record appends rec (its Outcome set) for an operation that changed
// nothing on disk, without waiting for the disk.
func (n *Node) record(rec hsm.AuditRecord) error {
	if _, err := n.log.append(&rec, n.now); err != nil {
		return n.logErr(rec.Op, err)
	}
	return nil
}

// logErr turns an audit log error into the operation's error.
func (n *Node) logErr(op string, err error) error {
	if n.closed.Load() || errors.Is(err, errAuditClosed) {
		return n.closedErr(op)
	}
	return fmt.Errorf("hsm %s: writing %s: %w", n.opt.ID, op, err)
}

func (n *Node) closedErr(op string) error {
	return hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is closed", n.opt.ID)
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
