package node

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
	bolt "go.etcd.io/bbolt"
)

// The audit file and its group-commit writer.

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
