package journal

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/internal/boltgroup"
	"github.com/keymig/keymig/internal/failpoint"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// formatVersion is written into every journal; a newer one is refused.
const formatVersion = 1

var (
	bucketMeta   = []byte("meta")
	bucketRuns   = []byte("runs")
	bucketItems  = []byte("items")  // items/<run>/<item>
	bucketEvents = []byte("events") // events/<run>/<seq>
	keyVersion   = []byte("format-version")
	keyLock      = []byte("lock")
)

// Journal is an open journal file.
type Journal struct {
	db       *bolt.DB
	group    *boltgroup.Group // concurrent Puts share commits
	path     string
	lock     Lock
	closed   bool
	readOnly bool
	// TookOver is the stale lock record of a dead process that Open
	// replaced, if any, so the caller can say so.
	TookOver *Lock
}

// Options tune Open.
type Options struct {
	// Wait is how long to wait for another process that has the journal
	// open before failing with a *LockedError; default 1s.
	Wait time.Duration
	// Command describes the holder in the lock record, e.g. "migrate".
	Command string
	// NoSync skips fsync: for benchmarks that measure everything else.
	NoSync bool
	// ReadOnly opens an existing journal to read it, sharing it with other
	// readers and taking no lock record; it never creates the file.
	ReadOnly bool
	// BatchSize bounds how many concurrent transitions share a commit;
	// set it to the worker count. Default 64.
	BatchSize int
}

// Lock is the record of the process that has a journal open.
type Lock struct {
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Command string    `json:"command"`
	Start   time.Time `json:"start"`
}

func (l Lock) String() string {
	return fmt.Sprintf("keymig %s (pid %d on %s, since %s)", l.Command, l.PID, l.Host, l.Start.Format(time.RFC3339))
}

// alive reports whether the lock's process still runs on this host. A
// process on another host is assumed alive: we cannot tell.
func (l Lock) alive() bool {
	h, _ := os.Hostname()
	if l.Host != h {
		return true
	}
	if l.PID == os.Getpid() {
		return true
	}
	err := syscall.Kill(l.PID, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// LockedError says that another process has the journal open.
type LockedError struct {
	Path   string
	Holder *Lock // nil if the holder left no record
}

func (e *LockedError) Error() string {
	who := "another keymig process"
	if e.Holder != nil {
		who = e.Holder.String()
	}
	return fmt.Sprintf("journal %s is in use by %s; wait for it to finish or stop it — two runs of one job at once are refused", e.Path, who)
}

// ErrFormat reports a file that is not a keymig journal or is damaged.
var ErrFormat = errors.New("not a keymig journal, or damaged")

// Open opens or creates the journal at path and takes its lock.
func Open(path string, o Options) (*Journal, error) {
	if o.Wait <= 0 {
		o.Wait = time.Second
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 64
	}
	if o.ReadOnly {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("journal %s: %w", path, err)
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.Wait, NoSync: o.NoSync, ReadOnly: o.ReadOnly, FreelistType: bolt.FreelistMapType})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, &LockedError{Path: path, Holder: readSidecar(path)}
		}
		return nil, fmt.Errorf("open journal %s: %w (%w)", path, err, ErrFormat)
	}
	if err := checkSize(db, path); err != nil {
		db.Close()
		return nil, err
	}
	host, _ := os.Hostname()
	group := boltgroup.New(db)
	group.Max = o.BatchSize
	j := &Journal{db: db, group: group, path: path, lock: Lock{Host: host, PID: os.Getpid(), Command: o.Command, Start: time.Now().UTC()}}
	if o.ReadOnly {
		j.closed = false
		j.readOnly = true
		if err := j.checkReadable(); err != nil {
			db.Close()
			return nil, err
		}
		return j, nil
	}
	if err := j.init(); err != nil {
		db.Close()
		return nil, err
	}
	return j, nil
}

// checkSize refuses a file shorter than its own metadata says it is: a
// truncated copy would otherwise make bbolt read past the end.
func checkSize(db *bolt.DB, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	var want int64
	db.View(func(tx *bolt.Tx) error { want = tx.Size(); return nil })
	if fi.Size() < want {
		return fmt.Errorf("journal %s is truncated (%d bytes, its header says %d): restore it from a copy, or move it away to start the job afresh — the target cluster still holds what was done, and a new run adopts those keys: %w", path, fi.Size(), want, ErrFormat)
	}
	return nil
}

// guard turns a panic inside bbolt, which asserts rather than returns on a
// damaged page, into an ErrFormat error naming the file.
func guard(path string, err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("journal %s is damaged (%v): %w", path, r, ErrFormat)
	}
}

func (j *Journal) init() (err error) {
	defer guard(j.path, &err)
	return j.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if v := meta.Get(keyVersion); v != nil {
			n, err := strconv.Atoi(string(v))
			if err != nil {
				return fmt.Errorf("journal %s: bad format version %q: %w", j.path, v, ErrFormat)
			}
			if n > formatVersion {
				return fmt.Errorf("journal %s has format version %d; this keymig reads up to %d: upgrade keymig", j.path, n, formatVersion)
			}
		} else if err := meta.Put(keyVersion, []byte(strconv.Itoa(formatVersion))); err != nil {
			return err
		}
		for _, b := range [][]byte{bucketRuns, bucketItems, bucketEvents} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		if v := meta.Get(keyLock); v != nil {
			var old Lock
			if err := json.Unmarshal(v, &old); err == nil {
				// We hold the flock, so whoever wrote this record is gone
				// (or on another host sharing the file, which we refuse).
				if h, _ := os.Hostname(); old.Host != h {
					return &LockedError{Path: j.path, Holder: &old}
				}
				j.TookOver = &old
			}
		}
		rec, _ := json.Marshal(j.lock)
		if err := meta.Put(keyLock, rec); err != nil {
			return err
		}
		return writeSidecar(j.path, rec)
	})
}

// checkReadable makes sure a journal opened read-only has our buckets.
func (j *Journal) checkReadable() (err error) {
	defer guard(j.path, &err)
	return j.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketRuns, bucketItems, bucketEvents} {
			if tx.Bucket(b) == nil {
				return fmt.Errorf("journal %s: %w", j.path, ErrFormat)
			}
		}
		return nil
	})
}

// Path is the journal's file name.
func (j *Journal) Path() string { return j.path }

// Close releases the lock and closes the file.
func (j *Journal) Close() error {
	if j.closed {
		return nil
	}
	j.closed = true
	if j.readOnly {
		return j.db.Close()
	}
	err := j.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Delete(keyLock)
	})
	os.Remove(sidecarPath(j.path))
	if cerr := j.db.Close(); err == nil {
		err = cerr
	}
	return err
}

func sidecarPath(path string) string { return path + ".lock" }

func writeSidecar(path string, rec []byte) error {
	if err := atomicfile.WriteFile(sidecarPath(path), rec, 0o600); err != nil {
		return fmt.Errorf("journal lock file: %w", err)
	}
	return nil
}

func readSidecar(path string) *Lock {
	b, err := os.ReadFile(sidecarPath(path))
	if err != nil {
		return nil
	}
	var l Lock
	if json.Unmarshal(b, &l) != nil {
		return nil
	}
	return &l
}

// Unlock removes the lock record of a process that died holding the
// journal at path. It refuses while the holder is alive or has the file
// open, and reports the record it removed (nil if there was none).
func Unlock(path string) (*Lock, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("journal %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 500 * time.Millisecond})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			h := readSidecar(path)
			if h != nil && !h.alive() {
				return nil, fmt.Errorf("journal %s is still open by a process that is no longer listed as %s; retry in a moment", path, h)
			}
			return nil, &LockedError{Path: path, Holder: h}
		}
		return nil, fmt.Errorf("open journal %s: %w", path, err)
	}
	defer db.Close()
	var removed *Lock
	err = db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			return fmt.Errorf("journal %s: %w", path, ErrFormat)
		}
		v := meta.Get(keyLock)
		if v == nil {
			return nil
		}
		var l Lock
		if err := json.Unmarshal(v, &l); err != nil {
			return meta.Delete(keyLock)
		}
		if l.alive() {
			h, _ := os.Hostname()
			if l.Host != h {
				return fmt.Errorf("journal %s is locked by %s on another host; make sure that process is gone, then remove the lock there", path, l)
			}
			return &LockedError{Path: path, Holder: &l}
		}
		removed = &l
		return meta.Delete(keyLock)
	})
	if err == nil {
		os.Remove(sidecarPath(path))
	}
	return removed, err
}

// Holder returns the lock record in the journal, if any.
func (j *Journal) Holder() *Lock {
	var l *Lock
	j.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyLock); v != nil {
			l = new(Lock)
			json.Unmarshal(v, l)
		}
		return nil
	})
	return l
}

// RunInfo is a run's header: what job it is, when it ran, how it ended.
type RunInfo struct {
	ID       string          `json:"id"`
	Kind     string          `json:"kind"` // migrate, rotate, synckey
	Created  time.Time       `json:"created"`
	Updated  time.Time       `json:"updated"`
	Finished *time.Time      `json:"finished,omitempty"`
	Status   string          `json:"status"`            // running, done, failed, interrupted
	Meta     json.RawMessage `json:"meta,omitempty"`    // caller's description of the job (no secrets)
	Summary  json.RawMessage `json:"summary,omitempty"` // caller's summary of the last attempt
}

// Run statuses.
const (
	RunRunning     = "running"
	RunDone        = "done"
	RunFailed      = "failed"
	RunInterrupted = "interrupted"
)

// Run is a handle on one run of a journal.
type Run struct {
	j  *Journal
	id string
}

// ID is the run's key.
func (r *Run) ID() string { return r.id }

// Journal is the journal the run belongs to.
func (r *Run) Journal() *Journal { return r.j }

// Begin finds the run with id or creates it with kind and meta; it reports
// whether the run existed (a resume).
func (j *Journal) Begin(id, kind string, meta any) (*Run, RunInfo, bool, error) {
	if id == "" {
		return nil, RunInfo{}, false, errors.New("journal: empty run id")
	}
	var info RunInfo
	var existed bool
	err := j.db.Update(func(tx *bolt.Tx) error {
		runs := tx.Bucket(bucketRuns)
		now := time.Now().UTC()
		if v := runs.Get([]byte(id)); v != nil {
			if err := json.Unmarshal(v, &info); err != nil {
				return fmt.Errorf("journal %s: run %s: %w", j.path, id, ErrFormat)
			}
			if info.Kind != kind {
				return fmt.Errorf("journal %s holds a %s run under %s, not a %s run: use another journal file for it", j.path, info.Kind, id, kind)
			}
			existed = true
		} else {
			m, err := json.Marshal(meta)
			if err != nil {
				return err
			}
			info = RunInfo{ID: id, Kind: kind, Created: now, Meta: m}
		}
		info.Status = RunRunning
		info.Updated = now
		info.Finished = nil
		if _, err := tx.Bucket(bucketItems).CreateBucketIfNotExists([]byte(id)); err != nil {
			return err
		}
		if _, err := tx.Bucket(bucketEvents).CreateBucketIfNotExists([]byte(id)); err != nil {
			return err
		}
		return putJSON(runs, []byte(id), info)
	})
	if err != nil {
		return nil, RunInfo{}, false, err
	}
	return &Run{j: j, id: id}, info, existed, nil
}

// Runs lists every run in the journal, oldest first.
func (j *Journal) Runs() ([]RunInfo, error) {
	var out []RunInfo
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRuns).ForEach(func(k, v []byte) error {
			var ri RunInfo
			if err := json.Unmarshal(v, &ri); err != nil {
				return fmt.Errorf("journal %s: run %q: %w", j.path, k, ErrFormat)
			}
			out = append(out, ri)
			return nil
		})
	})
	sort.Slice(out, func(a, b int) bool { return out[a].Created.Before(out[b].Created) })
	return out, err
}

// Prune deletes the oldest finished (done) runs of kind, with their items
// and events, so that at most keep of them remain, and returns how many it
// deleted. Runs that are running, failed or interrupted are never deleted:
// they may still be resumed or looked into.
func (j *Journal) Prune(kind string, keep int) (removed int, err error) {
	if keep < 0 {
		return 0, fmt.Errorf("journal %s: keep %d runs: want 0 or more", j.path, keep)
	}
	runs, err := j.Runs()
	if err != nil {
		return 0, err
	}
	var done []RunInfo
	for _, r := range runs {
		if r.Kind == kind && r.Status == RunDone {
			done = append(done, r)
		}
	}
	if len(done) <= keep {
		return 0, nil
	}
	old := done[:len(done)-keep] // Runs is oldest first
	err = j.db.Update(func(tx *bolt.Tx) error {
		for _, r := range old {
			id := []byte(r.ID)
			for _, b := range [][]byte{bucketItems, bucketEvents} {
				if tx.Bucket(b).Bucket(id) != nil {
					if err := tx.Bucket(b).DeleteBucket(id); err != nil {
						return err
					}
				}
			}
			if err := tx.Bucket(bucketRuns).Delete(id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("journal %s: pruning old runs: %w", j.path, err)
	}
	return len(old), nil
}

// Run returns a handle on an existing run.
func (j *Journal) Run(id string) (*Run, RunInfo, error) {
	var info RunInfo
	err := j.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketRuns).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("journal %s has no run %s", j.path, id)
		}
		return json.Unmarshal(v, &info)
	})
	if err != nil {
		return nil, RunInfo{}, err
	}
	return &Run{j: j, id: id}, info, nil
}

// Finish records the run's final status and summary.
func (r *Run) Finish(status string, summary any) error {
	s, err := json.Marshal(summary)
	if err != nil {
		return err
	}
	return r.j.db.Update(func(tx *bolt.Tx) error {
		runs := tx.Bucket(bucketRuns)
		var info RunInfo
		if err := json.Unmarshal(runs.Get([]byte(r.id)), &info); err != nil {
			return fmt.Errorf("journal %s: run %s: %w", r.j.path, r.id, ErrFormat)
		}
		now := time.Now().UTC()
		info.Status, info.Summary, info.Updated = status, s, now
		if status != RunRunning {
			info.Finished = &now
		}
		return putJSON(runs, []byte(r.id), info)
	})
}

func putJSON(b *bolt.Bucket, k []byte, v any) error {
	buf, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(k, buf)
}

// Item is the journal's record of one unit of work. Result and Data are
// opaque to the journal.
type Item struct {
	Key       string          `json:"key"`
	State     string          `json:"state"`
	Attempts  int             `json:"attempts"`
	LastError string          `json:"last-error,omitempty"`
	Result    string          `json:"result,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Started   time.Time       `json:"started,omitzero"`
	Updated   time.Time       `json:"updated,omitzero"`
}

// DecodeItem parses a stored item record, checking what it must hold.
func DecodeItem(k, v []byte) (Item, error) {
	var it Item
	dec := json.NewDecoder(bytes.NewReader(v))
	if err := dec.Decode(&it); err != nil {
		return Item{}, fmt.Errorf("item %q: %v: %w", k, err, ErrFormat)
	}
	if dec.More() {
		return Item{}, fmt.Errorf("item %q: trailing data: %w", k, ErrFormat)
	}
	if it.Key != string(k) {
		return Item{}, fmt.Errorf("item %q: record names key %q: %w", k, it.Key, ErrFormat)
	}
	if it.State == "" || it.Attempts < 0 {
		return Item{}, fmt.Errorf("item %q: no state or negative attempts: %w", k, ErrFormat)
	}
	return it, nil
}

// AddItems records items that do not exist yet; existing ones keep their
// state. It is how a run is seeded, safely, on every start.
func (r *Run) AddItems(items []Item) (added int, err error) {
	const chunk = 5000
	for len(items) > 0 {
		n := min(chunk, len(items))
		part := items[:n]
		items = items[n:]
		err = r.j.db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketItems).Bucket([]byte(r.id))
			now := time.Now().UTC()
			for _, it := range part {
				if b.Get([]byte(it.Key)) != nil {
					continue
				}
				if it.Updated.IsZero() {
					it.Updated = now
				}
				if err := putJSON(b, []byte(it.Key), it); err != nil {
					return err
				}
				added++
			}
			return nil
		})
		if err != nil {
			return added, err
		}
	}
	return added, nil
}

// Get returns one item.
func (r *Run) Get(key string) (Item, bool, error) {
	var it Item
	var ok bool
	err := r.j.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketItems).Bucket([]byte(r.id)).Get([]byte(key))
		if v == nil {
			return nil
		}
		var err error
		it, err = DecodeItem([]byte(key), v)
		ok = err == nil
		return err
	})
	return it, ok, err
}

// Items calls fn for every item of the run in key order.
func (r *Run) Items(fn func(Item) error) error {
	return r.j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketItems).Bucket([]byte(r.id)).ForEach(func(k, v []byte) error {
			it, err := DecodeItem(k, v)
			if err != nil {
				return fmt.Errorf("journal %s: %w", r.j.path, err)
			}
			return fn(it)
		})
	})
}

// Put durably records it, replacing the stored item with the same key.
// Concurrent Puts share a commit. The record is computed before the batch,
// so a batch retried by bbolt writes the same bytes again.
func (r *Run) Put(it Item) error {
	if it.Key == "" || it.State == "" {
		return errors.New("journal: item needs a key and a state")
	}
	it.Updated = time.Now().UTC()
	buf, err := json.Marshal(it)
	if err != nil {
		return err
	}
	if err := failpoint.Hit(failpoint.JournalBeforeCommit); err != nil {
		return err
	}
	if err := r.j.group.Do(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketItems).Bucket([]byte(r.id)).Put([]byte(it.Key), buf)
	}); err != nil {
		return err
	}
	return failpoint.Hit(failpoint.JournalAfterCommit)
}

// Counts returns how many items are in each state.
func (r *Run) Counts() (map[string]int, error) {
	c := map[string]int{}
	err := r.Items(func(it Item) error { c[it.State]++; return nil })
	return c, err
}

// Event is a line of a run's history.
type Event struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	Kind string    `json:"kind"`
	Msg  string    `json:"msg"`
}

// Event appends a line to the run's history.
func (r *Run) Event(kind, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return r.j.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEvents).Bucket([]byte(r.id))
		seq, _ := b.NextSequence()
		return putJSON(b, seqKey(seq), Event{Seq: seq, Time: time.Now().UTC(), Kind: kind, Msg: msg})
	})
}

// Events calls fn for each event of the run in order.
func (r *Run) Events(fn func(Event) error) error {
	return r.j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketEvents).Bucket([]byte(r.id)).ForEach(func(k, v []byte) error {
			var e Event
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("journal %s: event %x: %w", r.j.path, k, ErrFormat)
			}
			return fn(e)
		})
	})
}

func seqKey(n uint64) []byte {
	return []byte(fmt.Sprintf("%016x", n))
}

// Check verifies the file: bbolt's own page consistency check, then every
// run, item and event record. It returns every problem found.
func (j *Journal) Check() (errs []error) {
	var err error
	defer func() {
		if err != nil {
			errs = append(errs, err)
		}
	}()
	defer guard(j.path, &err)
	err = j.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			errs = append(errs, fmt.Errorf("bbolt: %w", err))
		}
		runs := tx.Bucket(bucketRuns)
		items := tx.Bucket(bucketItems)
		events := tx.Bucket(bucketEvents)
		if runs == nil || items == nil || events == nil {
			errs = append(errs, fmt.Errorf("missing buckets: %w", ErrFormat))
			return nil
		}
		runs.ForEach(func(k, v []byte) error {
			var ri RunInfo
			if err := json.Unmarshal(v, &ri); err != nil || ri.ID != string(k) {
				errs = append(errs, fmt.Errorf("run %q: bad record: %w", k, ErrFormat))
			}
			ib := items.Bucket(k)
			if ib == nil {
				errs = append(errs, fmt.Errorf("run %q: no items bucket: %w", k, ErrFormat))
				return nil
			}
			ib.ForEach(func(ik, iv []byte) error {
				if _, err := DecodeItem(ik, iv); err != nil {
					errs = append(errs, fmt.Errorf("run %q: %w", k, err))
				}
				return nil
			})
			return nil
		})
		return items.ForEach(func(k, v []byte) error {
			if runs.Get(k) == nil {
				errs = append(errs, fmt.Errorf("items for unknown run %q: %w", k, ErrFormat))
			}
			return nil
		})
	})
	return errs
}

// DefaultPath is where a job's journal lives unless the user says
// otherwise: beside the plan (or input) file.
func DefaultPath(besides string) string {
	return filepath.Clean(besides) + ".journal"
}
