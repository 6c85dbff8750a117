package node

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/internal/failpoint"
	bolt "go.etcd.io/bbolt"
)

// AuditPath is the audit log file of the HSM whose bbolt file is hsmPath.
func AuditPath(hsmPath string) string { return hsmPath + ".audit" }

// appendRecordJSON appends what json.Marshal(rec) gives with rec.Prev set
// to hex(prev), without reflection: append runs it under the log's lock
// for every record.
func appendRecordJSON(b []byte, rec *hsm.AuditRecord, prev []byte) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, rec.Seq, 10)
	b = append(b, `,"time":"`...)
	b = rec.Time.AppendFormat(b, time.RFC3339Nano) // as Time.MarshalJSON
	b = append(b, `","user":`...)
	b = appendJSONString(b, rec.User)
	b = append(b, `,"op":`...)
	b = appendJSONString(b, rec.Op)
	if len(rec.Handles) > 0 {
		b = append(b, `,"handles":[`...)
		for i, h := range rec.Handles {
			if i > 0 {
				b = append(b, ',')
			}
			// KeyRef.MarshalText: "0x%016x".
			b = append(b, `"0x`...)
			var hb [8]byte
			binary.BigEndian.PutUint64(hb[:], uint64(h))
			b = hex.AppendEncode(b, hb[:])
			b = append(b, '"')
		}
		b = append(b, ']')
	}
	if rec.Target != "" {
		b = append(b, `,"target":`...)
		b = appendJSONString(b, rec.Target)
	}
	b = append(b, `,"outcome":`...)
	b = appendJSONString(b, rec.Outcome)
	b = append(b, `,"prev":"`...)
	b = hex.AppendEncode(b, prev)
	return append(b, `"}`...)
}

// appendJSONString appends s as encoding/json writes it: directly when it
// needs no escaping (printable ASCII without ", \, <, > or &), else through
// json.Marshal.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			j, _ := json.Marshal(s)
			return append(b, j...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// auditHead is kept in meta so that removing records from the end of the
// audit file is detected: the file held at least up to Seq, and record Seq
// had Hash. Records beyond it are fine (the head is written lazily).
type auditHead struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

const (
	auditMaxBuffered  = 4 << 20               // appenders wait while this much is not yet handed to the disk
	auditHeadInterval = 50 * time.Millisecond // the head in meta lags the file by at most this much while the log is busy
	auditTailWindow   = 64 << 10              // Open reads the file's tail in windows of this size
)

var (
	errAuditClosed      = errors.New("the audit log is closed")
	errAuditHeadCorrupt = errors.New("the audit log head is corrupt")
)

// chainHash is a record's hash: SHA-256 of the previous record's hash
// (raw 32 bytes; none for record 1) ‖ the record's JSON.
func chainHash(prev, body []byte) [32]byte {
	h := sha256.New()
	h.Write(prev)
	h.Write(body)
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// readHead reads the audit head from meta; a missing head is the zero head.
func readHead(tx *bolt.Tx) (auditHead, error) {
	var head auditHead
	if v := tx.Bucket(bktMeta).Get(metaAuditHead); v != nil {
		if err := json.Unmarshal(v, &head); err != nil {
			return head, errAuditHeadCorrupt
		}
	}
	return head, nil
}

// The audit file -------------------------------------------------------------

// auditLog appends records to the audit file with group commit: append
// adds a line to an in-memory buffer and returns; one flusher goroutine
// writes the whole buffer with one write and one fdatasync, again at once
// while more is buffered, and otherwise sleeps until signalled. A write,
// sync or head error fails the log for good: every later call returns it.
type auditLog struct {
	path string
	f    *os.File // O_RDWR|O_APPEND; written by the flusher only
	db   *bolt.DB // for the head

	mu   sync.Mutex
	work sync.Cond // the flusher waits here for records, a due head update or close
	done sync.Cond // waitDurable, flush and appenders facing a full buffer wait here

	next    uint64   // seq of the last appended record
	last    [32]byte // hash of record next (unused while next is 0)
	buf     []byte   // lines not yet handed to the flusher
	spare   []byte   // the flusher's previous buffer, for reuse
	scratch []byte   // prev hash ‖ JSON of the record being appended

	durable     uint64   // every record up to this seq is on disk
	durableHash [32]byte // hash of record durable
	size        int64    // bytes of the file on disk

	headSeq   uint64      // what the head in meta says
	headAt    time.Time   // when the flusher last wrote the head
	headDue   bool        // the head timer fired
	headTimer *time.Timer // armed while the head lags an idle log
	headBusy  bool        // a head write is in flight
	heads     sync.WaitGroup

	idle    bool  // the flusher is waiting on work
	closing bool  // close was called: no more appends
	stopped bool  // the flusher has exited
	err     error // first write, sync or head error: the log is failed
	exited  chan struct{}
}

// openAuditLog opens (creating it if it is missing) the audit file at path
// of the HSM whose database is db, cuts a torn last line, finds where the
// chain continues from the file's tail and the head, and starts the
// flusher. The caller holds db's file lock.
func openAuditLog(db *bolt.DB, path string) (*auditLog, error) {
	var (
		head   auditHead
		legacy bool
	)
	if err := db.View(func(tx *bolt.Tx) error {
		var err error
		head, err = readHead(tx)
		legacy = tx.Bucket(bktAudit) != nil
		return err
	}); err != nil {
		return nil, err
	}
	if legacy {
		if err := migrateLegacyAudit(db, path); err != nil {
			return nil, fmt.Errorf("moving the audit log out of the hsm file to %s: %w", path, err)
		}
	}
	_, statErr := os.Stat(path)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	if errors.Is(statErr, os.ErrNotExist) {
		// Deleted: start it again. The chain continues after the head,
		// so VerifyAudit reports the records that are gone.
		if err := atomicfile.SyncDir(filepath.Dir(path)); err != nil {
			f.Close()
			return nil, err
		}
	}
	tail, size, err := recoverTail(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit log %s: %w", path, err)
	}
	l := &auditLog{path: path, f: f, db: db, size: size, headSeq: head.Seq, headAt: time.Now(), exited: make(chan struct{})}
	l.work.L, l.done.L = &l.mu, &l.mu
	if tail.ok {
		l.next, l.last = tail.seq, tail.hash
	}
	if head.Seq > l.next {
		// Records were cut off the end (or the tail is unreadable): go
		// on after the head, so that the head never moves back and the
		// gap stays visible to VerifyAudit.
		l.next = head.Seq
		l.last = [32]byte{}
		hex.Decode(l.last[:], []byte(head.Hash))
	}
	l.durable, l.durableHash = l.next, l.last
	go l.run()
	return l, nil
}

// auditTail is the last complete record of the file.
type auditTail struct {
	seq  uint64
	hash [32]byte
	ok   bool // false: empty file, or the last line is unreadable
}

// recoverTail cuts a torn last line (one not ending in '\n', left by a
// crash in the middle of a write) and reads the last complete line. It
// reads only as much of the end of the file as that takes.
func recoverTail(f *os.File) (auditTail, int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return auditTail{}, 0, err
	}
	size := fi.Size()
	if size == 0 {
		return auditTail{}, 0, nil
	}
	var c [1]byte
	if _, err := f.ReadAt(c[:], size-1); err != nil {
		return auditTail{}, 0, err
	}
	if c[0] != '\n' {
		i, err := lastNewline(f, size)
		if err != nil {
			return auditTail{}, 0, err
		}
		size = i + 1
		if err := f.Truncate(size); err != nil {
			return auditTail{}, 0, fmt.Errorf("cutting a torn last record: %w", err)
		}
		if err := fdatasync(f); err != nil {
			return auditTail{}, 0, fmt.Errorf("cutting a torn last record: %w", err)
		}
		if size == 0 {
			return auditTail{}, 0, nil
		}
	}
	start, err := lastNewline(f, size-1)
	if err != nil {
		return auditTail{}, 0, err
	}
	line := make([]byte, size-1-(start+1))
	if _, err := f.ReadAt(line, start+1); err != nil {
		return auditTail{}, 0, err
	}
	sum, body, reason := splitLine(line)
	if reason != "" {
		return auditTail{}, size, nil
	}
	var r struct {
		Seq uint64 `json:"seq"`
	}
	if json.Unmarshal(body, &r) != nil {
		return auditTail{}, size, nil
	}
	return auditTail{seq: r.Seq, hash: sum, ok: true}, size, nil
}

// lastNewline returns the offset of the last '\n' before end, or -1,
// reading backwards from end in windows of auditTailWindow.
func lastNewline(f *os.File, end int64) (int64, error) {
	buf := make([]byte, min(end, auditTailWindow))
	for end > 0 {
		n := min(end, int64(len(buf)))
		b := buf[:n]
		if got, err := f.ReadAt(b, end-n); err != nil && !(err == io.EOF && int64(got) == n) {
			return 0, err
		}
		if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
			return end - n + int64(i), nil
		}
		end -= n
	}
	return -1, nil
}

// migrateLegacyAudit moves the audit records of an HSM file written before
// the audit log had its own file (values 32-byte hash ‖ JSON in the audit
// bucket) to the audit file, in key order, then drops the bucket. Missing
// or reordered records stay that way, so VerifyAudit still reports them.
// Interrupted, it starts over: the bucket goes only once the file is safe.
func migrateLegacyAudit(db *bolt.DB, path string) error {
	f, err := atomicfile.New(path, 0o600)
	if err != nil {
		return err
	}
	defer f.Abort()
	w := bufio.NewWriter(f)
	err = db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bktAudit).ForEach(func(_, v []byte) error {
			if len(v) < 32 {
				w.WriteString(hex.EncodeToString(v)) // too short: VerifyAudit says "is truncated"
			} else {
				w.WriteString(hex.EncodeToString(v[:32]))
				w.WriteByte(' ')
				w.Write(v[32:])
			}
			return w.WriteByte('\n')
		})
	})
	if err == nil {
		err = w.Flush()
	}
	if err == nil {
		err = f.Commit()
	}
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(bktAudit) })
}

// append adds rec to the chain: it fills in Seq and (if zero) Time from
// now, and buffers the line. It returns without waiting for the disk;
// waitDurable does that. It blocks only while auditMaxBuffered bytes wait
// for the flusher.
func (l *auditLog) append(rec *hsm.AuditRecord, now func() time.Time) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for len(l.buf) >= auditMaxBuffered && l.err == nil && !l.closing {
		l.done.Wait()
	}
	if l.err != nil {
		return 0, l.err
	}
	if l.closing {
		return 0, errAuditClosed
	}
	var prev []byte
	if l.next > 0 {
		prev = l.last[:]
	}
	rec.Seq = l.next + 1
	if rec.Time.IsZero() {
		rec.Time = now().UTC()
	}
	// scratch: prev ‖ JSON, hashed in one go (chainHash, without its
	// allocation).
	b := append(l.scratch[:0], prev...)
	b = appendRecordJSON(b, rec, prev)
	sum := sha256.Sum256(b)
	l.buf = hex.AppendEncode(l.buf, sum[:])
	l.buf = append(l.buf, ' ')
	l.buf = append(l.buf, b[len(prev):]...)
	l.buf = append(l.buf, '\n')
	l.scratch = b
	l.next, l.last = rec.Seq, sum
	if l.idle {
		l.idle = false
		l.work.Signal()
	}
	return rec.Seq, nil
}

// waitDurable blocks until record seq is on disk, or returns the error
// that failed the log, or errAuditClosed if the log closed first.
func (l *auditLog) waitDurable(seq uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.durable < seq {
		if l.err != nil {
			return l.err
		}
		if l.stopped {
			return errAuditClosed
		}
		l.done.Wait()
	}
	return nil
}

// flush waits until every record appended so far is on disk and returns
// the file's size then: a reader sees whole lines up to it.
func (l *auditLog) flush() (int64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for target := l.next; l.durable < target; {
		if l.err != nil {
			return 0, l.err
		}
		if l.stopped {
			return 0, errAuditClosed
		}
		l.done.Wait()
	}
	return l.size, nil
}

// failed returns the error that failed the log, if any.
func (l *auditLog) failed() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// fail fails the log with err; l.mu is held.
func (l *auditLog) fail(err error) {
	if l.err == nil {
		l.err = err
	}
	l.done.Broadcast()
}

// run is the flusher.
func (l *auditLog) run() {
	defer close(l.exited)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		for len(l.buf) == 0 && !l.closing && !l.headDue && l.err == nil {
			l.idle = true
			l.work.Wait()
		}
		l.idle = false
		if l.err != nil {
			break
		}
		if len(l.buf) > 0 {
			data, seq, sum := l.buf, l.next, l.last
			l.buf, l.spare = l.spare[:0], nil
			l.mu.Unlock()
			_, err := l.f.Write(data)
			if err == nil {
				err = fdatasync(l.f)
			}
			l.mu.Lock()
			if err != nil {
				l.fail(fmt.Errorf("audit log %s: %w", l.path, err))
				break
			}
			l.durable, l.durableHash = seq, sum
			l.size += int64(len(data))
			if cap(data) <= 2*auditMaxBuffered {
				l.spare = data
			}
			l.done.Broadcast()
		}
		final := l.closing && len(l.buf) == 0
		switch {
		case final:
			// The last head, written after any still in flight.
			l.mu.Unlock()
			l.heads.Wait()
			l.mu.Lock()
			if l.durable > l.headSeq {
				seq, sum := l.durable, l.durableHash
				l.mu.Unlock()
				err := l.putHead(seq, sum)
				l.mu.Lock()
				if err != nil {
					l.fail(fmt.Errorf("audit log %s: updating its head: %w", l.path, err))
					break
				}
				l.headSeq = seq
			}
		case l.durable > l.headSeq && !l.headBusy && (l.headDue || time.Since(l.headAt) >= auditHeadInterval):
			// The head is written beside the flusher, not by it: its bbolt
			// commit waits behind the HSM's own writes, and records must
			// not wait behind it.
			seq, sum := l.durable, l.durableHash
			l.headBusy, l.headAt = true, time.Now()
			l.heads.Add(1)
			go l.writeHead(seq, sum)
		}
		if l.err != nil {
			break
		}
		l.headDue = false
		if final {
			break
		}
		if l.durable > l.headSeq && len(l.buf) == 0 && l.headTimer == nil {
			// Idle with the head behind: bring it up to date soon.
			l.headTimer = time.AfterFunc(auditHeadInterval-time.Since(l.headAt), func() {
				l.mu.Lock()
				l.headTimer = nil
				l.headDue = true
				if l.idle {
					l.idle = false
					l.work.Signal()
				}
				l.mu.Unlock()
			})
		}
	}
	if l.headTimer != nil {
		l.headTimer.Stop()
	}
	l.stopped = true
	l.done.Broadcast()
}

// writeHead is putHead for the flusher, run on its own goroutine (one at
// a time: headBusy).
func (l *auditLog) writeHead(seq uint64, sum [32]byte) {
	defer l.heads.Done()
	err := l.putHead(seq, sum)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.headBusy = false
	if err != nil {
		l.fail(fmt.Errorf("audit log %s: updating its head: %w", l.path, err))
		if l.idle {
			l.idle = false
			l.work.Signal()
		}
		return
	}
	l.headSeq = max(l.headSeq, seq)
}

// putHead records in meta that the file holds record seq with hash sum. It
// only ever moves the head forward.
func (l *auditLog) putHead(seq uint64, sum [32]byte) error {
	hj, err := json.Marshal(auditHead{Seq: seq, Hash: hex.EncodeToString(sum[:])})
	if err != nil {
		return err
	}
	return l.db.Update(func(tx *bolt.Tx) error {
		if cur, err := readHead(tx); err == nil && cur.Seq >= seq {
			return nil
		}
		return tx.Bucket(bktMeta).Put(metaAuditHead, hj)
	})
}

// close refuses further appends, waits for the flusher to write and sync
// what is buffered and to update the head, and closes the file. It returns
// the error that failed the log, if any. The database must still be open.
func (l *auditLog) close() error {
	l.mu.Lock()
	l.closing = true
	if l.idle {
		l.idle = false
		l.work.Signal()
	}
	l.mu.Unlock()
	<-l.exited
	l.mu.Lock()
	err := l.err
	l.mu.Unlock()
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Reading ----------------------------------------------------------------------

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

// Writing ----------------------------------------------------------------------

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
