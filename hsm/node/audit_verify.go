package node

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/keymig/keymig/hsm"
	bolt "go.etcd.io/bbolt"
)

// Reading and verifying the audit log.

// splitLine splits a line (without its '\n') into the stored hash and the
// JSON, or returns why it is malformed.
func splitLine(line []byte) (sum [32]byte, body []byte, reason string) {
	const hexLen = 2 * len(sum)
	if len(line) <= hexLen {
		return sum, nil, "is truncated"
	}
	if line[hexLen] != ' ' {
		return sum, nil, "is malformed: it was altered"
	}
	if _, err := hex.Decode(sum[:], line[:hexLen]); err != nil {
		return sum, nil, "has a malformed hash: it was altered"
	}
	return sum, line[hexLen+1:], ""
}

// lineReader reads the audit file line by line, lines of any length.
type lineReader struct {
	r    *bufio.Reader
	long []byte
}

// next returns the next line without its '\n' (valid until the next call)
// and whether it had one; io.EOF at the end.
func (lr *lineReader) next() (line []byte, complete bool, err error) {
	lr.long = lr.long[:0]
	for {
		s, err := lr.r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			lr.long = append(lr.long, s...)
			continue
		}
		if len(lr.long) > 0 {
			lr.long = append(lr.long, s...)
			s = lr.long
		}
		switch {
		case err == io.EOF && len(s) == 0:
			return nil, false, io.EOF
		case err == io.EOF:
			return s, false, nil
		case err != nil:
			return nil, false, err
		}
		return s[:len(s)-1], true, nil
	}
}

// openRead flushes the log and opens the file for reading up to what was
// on disk then.
func (n *Node) openRead(op string) (*os.File, *lineReader, error) {
	size, err := n.log.flush()
	if err != nil {
		return nil, nil, n.logErr(op, err)
	}
	f, err := os.Open(n.log.path)
	if err != nil {
		return nil, nil, fmt.Errorf("hsm %s: %s: %w", n.opt.ID, op, err)
	}
	return f, &lineReader{r: bufio.NewReaderSize(io.NewSectionReader(f, 0, size), 64<<10)}, nil
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
	const op = "audit verify"
	if n.closed.Load() {
		return 0, hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is closed", n.opt.ID)
	}
	// The head first: it never claims more than the flush below makes
	// visible.
	var head auditHead
	if err := n.db.View(func(tx *bolt.Tx) error {
		var err error
		head, err = readHead(tx)
		return err
	}); err != nil {
		if errors.Is(err, errAuditHeadCorrupt) {
			return 0, fmt.Errorf("audit log of hsm %s is not intact: %w", n.opt.ID, &AuditError{Seq: 0, Reason: "the log head is corrupt"})
		}
		return 0, err
	}
	f, lr, err := n.openRead(op)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	records, err = verifyChain(lr, head)
	if err != nil {
		var ae *AuditError
		if errors.As(err, &ae) {
			return records, fmt.Errorf("audit log of hsm %s is not intact: %w", n.opt.ID, err)
		}
		return records, fmt.Errorf("hsm %s: %s: %w", n.opt.ID, op, err)
	}
	return records, nil
}

// verifyChain checks every line of lr and the head.
func verifyChain(lr *lineReader, head auditHead) (records int, err error) {
	var (
		prev []byte
		sum  [32]byte
	)
	for want := uint64(1); ; want++ {
		line, complete, err := lr.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return records, err
		}
		if !complete {
			return records, &AuditError{Seq: want, Reason: "is truncated"}
		}
		stored, body, reason := splitLine(line)
		if reason != "" {
			return records, &AuditError{Seq: want, Reason: reason}
		}
		var rec struct {
			Seq  uint64 `json:"seq"`
			Prev string `json:"prev"`
		}
		if err := json.Unmarshal(body, &rec); err != nil {
			return records, &AuditError{Seq: want, Reason: "is not valid json: it was altered"}
		}
		if rec.Seq != want {
			if rec.Seq > want && !lr.nextIsBefore(rec.Seq) {
				return records, &AuditError{Seq: want, Reason: fmt.Sprintf("is missing (record %d follows record %d): records were removed", rec.Seq, want-1)}
			}
			return records, &AuditError{Seq: want, Reason: fmt.Sprintf("holds record %d: records were reordered", rec.Seq)}
		}
		if rec.Prev != hex.EncodeToString(prev) {
			return records, &AuditError{Seq: want, Reason: "does not chain to the record before it: records were reordered, removed or altered"}
		}
		if chainHash(prev, body) != stored {
			return records, &AuditError{Seq: want, Reason: "its contents do not match its hash: it was altered"}
		}
		sum = stored
		prev = sum[:]
		records++
		if want == head.Seq && head.Hash != hex.EncodeToString(sum[:]) {
			return records, &AuditError{Seq: want, Reason: "does not match the log head's hash: it was altered or replaced"}
		}
	}
	if uint64(records) < head.Seq {
		return records, &AuditError{Seq: uint64(records) + 1, Reason: fmt.Sprintf("is missing: the log head says the log ends at record %d: records were removed from the end", head.Seq)}
	}
	return records, nil
}

// nextIsBefore reports whether the next line holds a record numbered
// below seq: a record out of place was moved, not followed by a gap.
func (lr *lineReader) nextIsBefore(seq uint64) bool {
	line, _, err := lr.next()
	if err != nil {
		return false
	}
	_, body, reason := splitLine(line)
	if reason != "" {
		return false
	}
	var rec struct {
		Seq uint64 `json:"seq"`
	}
	return json.Unmarshal(body, &rec) == nil && rec.Seq < seq
}

// Audit calls fn with each record in order, stopping at fn's first error.
// It does not verify the chain (see VerifyAudit).
func (n *Node) Audit(fn func(hsm.AuditRecord) error) error {
	const op = "audit"
	if n.closed.Load() {
		return hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is closed", n.opt.ID)
	}
	f, lr, err := n.openRead(op)
	if err != nil {
		return err
	}
	defer f.Close()
	for pos := uint64(1); ; pos++ {
		line, complete, err := lr.next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("hsm %s: %s: %w", n.opt.ID, op, err)
		}
		if !complete {
			return fmt.Errorf("audit record %d is truncated", pos)
		}
		sum, body, reason := splitLine(line)
		if reason != "" {
			return fmt.Errorf("audit record %d %s", pos, reason)
		}
		var rec hsm.AuditRecord
		if err := json.Unmarshal(body, &rec); err != nil {
			return fmt.Errorf("audit record %d: %w", pos, err)
		}
		rec.Hash = hex.EncodeToString(sum[:])
		if err := fn(rec); err != nil {
			return err
		}
	}
}
