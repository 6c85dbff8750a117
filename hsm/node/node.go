package node

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/internal/boltgroup"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Defaults for Options fields left zero.
const (
	DefaultKeyCapacity      = 3300
	DefaultMaxConcurrentOps = 64
	DefaultKDFIterations    = 100_000
	// MaxLoginFailures is how many consecutive failed logins lock a user.
	MaxLoginFailures = 5
)

// Options describe a new HSM. ID, AZ, Lineage, LineageSecret, FIPS,
// KeyCapacity and MaxConcurrentOps are persisted in its file; KDFIterations
// and Now are not (Open takes them again).
type Options struct {
	ID, AZ           string           // HSM id (e.g. "hsm-1a2b3c") and availability zone
	Lineage          string           // public lineage id shared with clones
	LineageSecret    []byte           // 32 bytes; the masking key is derived from it; clones share it
	FIPS             bool             // FIPS mode; the cluster layer creates HSMs with it set
	KeyCapacity      int              // max token keys; 0 means DefaultKeyCapacity
	MaxConcurrentOps int              // operations in flight before CodeThrottled; 0 means DefaultMaxConcurrentOps
	KDFIterations    int              // PBKDF2-SHA256 iterations for new password hashes; 0 means DefaultKDFIterations
	Now              func() time.Time // clock for audit records; nil means time.Now
}

// OpenOptions are the settings of an existing HSM that are not stored in its
// file.
type OpenOptions struct {
	Timeout       time.Duration    // how long to wait for the file lock; 0 waits forever
	KDFIterations int              // PBKDF2 iterations for passwords set from now on; 0 means DefaultKDFIterations
	Now           func() time.Time // nil means time.Now
}

// persisted is the part of Options kept in the file.
type persisted struct {
	ID               string    `json:"id"`
	AZ               string    `json:"az"`
	Lineage          string    `json:"lineage"`
	FIPS             bool      `json:"fips"`
	KeyCapacity      int       `json:"key-capacity"`
	MaxConcurrentOps int       `json:"max-concurrent-ops"`
	Created          time.Time `json:"created"`
	// QuorumUserManagement is M of the user-management quorum (0: off).
	QuorumUserManagement int `json:"quorum-user-management,omitempty"`
}

// Node is one HSM backed by a bbolt file and an audit file beside it. It
// implements hsm.Backend.
type Node struct {
	db      *bolt.DB
	group   *boltgroup.Group // concurrent writes share commits
	path    string
	log     *auditLog
	writing sync.RWMutex // held shared by write from its commit to its audit record; Close takes it
	opt     persisted
	kdfIter int
	now     func() time.Time

	storage cipher.AEAD // seals key material at rest
	masking cipher.AEAD // seals masked objects; shared by clones

	mu       sync.RWMutex
	keys     map[hsm.KeyRef]*key
	revs     map[hsm.KeyRef]uint64 // last applied revision per handle, deleted ones too
	sessions map[uint64]*session

	nextSession atomic.Uint64
	inFlight    atomic.Int64
	closed      atomic.Bool

	pol atomic.Pointer[hsm.Policy] // FIPS and capacity may change at RestoreSnapshot

	faultMu  sync.Mutex
	fault    hsm.Fault
	failNext atomic.Int64
	faultOn  atomic.Bool // fast path: any fault set
}

var _ hsm.Backend = (*Node)(nil)

// Bucket and meta key names in the bbolt file.
var (
	bktMeta  = []byte("meta")
	bktUsers = []byte("users")
	bktKeys  = []byte("keys")
	bktIDs   = []byte("ids")
	bktAudit = []byte("audit") // only in files written before the audit log had its own file

	metaOptions    = []byte("options")
	metaStorageKey = []byte("storage-key")
	metaLineage    = []byte("lineage-secret")
	metaRev        = []byte("rev")
	metaKeyCount   = []byte("key-count")
	metaAuditHead  = []byte("audit-head")
)

// Create makes a new HSM in a new file at path, and its audit log at
// AuditPath(path); it fails if either file exists.
func Create(path string, o Options) (*Node, error) {
	if o.ID == "" {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "create", 0, "an hsm needs an id (e.g. hsm-1a2b3c)")
	}
	if o.Lineage == "" {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "create", 0, "hsm %s needs a lineage id", o.ID)
	}
	if len(o.LineageSecret) != 32 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "create", 0, "hsm %s: the lineage secret must be 32 bytes, not %d", o.ID, len(o.LineageSecret))
	}
	if o.KeyCapacity < 0 || o.MaxConcurrentOps < 0 || o.KDFIterations < 0 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "create", 0, "hsm %s: capacity, concurrency and kdf iterations must not be negative", o.ID)
	}
	if o.KeyCapacity == 0 {
		o.KeyCapacity = DefaultKeyCapacity
	}
	if o.MaxConcurrentOps == 0 {
		o.MaxConcurrentOps = DefaultMaxConcurrentOps
	}
	if _, err := os.Stat(path); err == nil {
		return nil, fmt.Errorf("create hsm %s: %s already exists; open it instead or choose another path", o.ID, path)
	}
	// O_EXCL makes the existence check race-free.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create hsm %s: %w", o.ID, err)
	}
	f.Close()
	os.Remove(path) // bbolt initialises only an empty or absent file; we just made it empty
	af, err := os.OpenFile(AuditPath(path), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create hsm %s: audit log: %w; a leftover of a deleted hsm? move it away", o.ID, err)
	}
	af.Close()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		os.Remove(AuditPath(path))
		return nil, fmt.Errorf("create hsm %s: %w", o.ID, err)
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	p := persisted{ID: o.ID, AZ: o.AZ, Lineage: o.Lineage, FIPS: o.FIPS, KeyCapacity: o.KeyCapacity,
		MaxConcurrentOps: o.MaxConcurrentOps, Created: now().UTC()}
	storageKey := make([]byte, 32)
	rand.Read(storageKey)
	storage, _ := newGCM(storageKey)
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bktMeta, bktUsers, bktKeys, bktIDs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bktMeta)
		pj, _ := json.Marshal(p)
		if err := meta.Put(metaOptions, pj); err != nil {
			return err
		}
		if err := meta.Put(metaStorageKey, storageKey); err != nil {
			return err
		}
		return meta.Put(metaLineage, seal(storage, o.LineageSecret, metaLineage))
	})
	if err == nil {
		err = atomicfile.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		db.Close()
		os.Remove(path)
		os.Remove(AuditPath(path))
		return nil, fmt.Errorf("create hsm %s: %w", o.ID, err)
	}
	db.Close()
	return Open(path, OpenOptions{KDFIterations: o.KDFIterations, Now: o.Now})
}

// Open opens the HSM stored at path, restoring its options, users, token
// keys and audit log (AuditPath(path)). It cuts a torn last audit record,
// left by a crash in the middle of a write.
func Open(path string, o OpenOptions) (*Node, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open hsm file %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.Timeout, FreelistType: bolt.FreelistMapType, NoFreelistSync: true})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, hsm.Errorf(hsm.CodeUnavailable, "open", 0, "hsm file %s is locked by another process; stop it or wait", path)
		}
		return nil, fmt.Errorf("open hsm file %s: %w", path, err)
	}
	n := &Node{db: db, group: boltgroup.New(db), path: path, kdfIter: o.KDFIterations, now: o.Now,
		keys: map[hsm.KeyRef]*key{}, revs: map[hsm.KeyRef]uint64{}, sessions: map[uint64]*session{}}
	// A node's writes compete with its own crypto (RSA unwraps) for the
	// CPU: letting runnable writers join a commit first makes fewer,
	// larger commits (migrate bench, rsa-aes-2048: about 520 to 655
	// keys/s, session-kek unchanged).
	n.group.Yield = true
	if n.kdfIter <= 0 {
		n.kdfIter = DefaultKDFIterations
	}
	if n.now == nil {
		n.now = time.Now
	}
	if err := n.load(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open hsm file %s: %w", path, err)
	}
	// Only now, with bbolt's file lock held, so that it is exclusive too.
	if n.log, err = openAuditLog(db, AuditPath(path)); err != nil {
		db.Close()
		return nil, fmt.Errorf("open hsm file %s: %w", path, err)
	}
	return n, nil
}

func (n *Node) load() error {
	return n.db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bktMeta)
		for _, b := range [][]byte{bktMeta, bktUsers, bktKeys, bktIDs} {
			if tx.Bucket(b) == nil {
				return fmt.Errorf("not an hsm file: bucket %q is missing", b)
			}
		}
		if err := json.Unmarshal(meta.Get(metaOptions), &n.opt); err != nil {
			return fmt.Errorf("reading the hsm options: %w", err)
		}
		n.setPolicy(hsm.Policy{FIPS: n.opt.FIPS, KeyCapacity: n.opt.KeyCapacity, MaxConcurrentOps: n.opt.MaxConcurrentOps,
			QuorumUserManagement: n.opt.QuorumUserManagement})
		var err error
		if n.storage, err = newGCM(meta.Get(metaStorageKey)); err != nil {
			return fmt.Errorf("reading the storage key: %w", err)
		}
		secret, err := unseal(n.storage, meta.Get(metaLineage), metaLineage)
		if err != nil {
			return fmt.Errorf("reading the lineage secret: %w", err)
		}
		if err := n.setLineageSecret(secret); err != nil {
			return err
		}
		return tx.Bucket(bktKeys).ForEach(func(k, v []byte) error {
			kk, err := n.decodeKeyRecord(v)
			if err != nil {
				return fmt.Errorf("key record %x: %w", k, err)
			}
			n.keys[kk.info.Ref] = kk
			n.revs[kk.info.Ref] = kk.rev
			return nil
		})
	})
}

// setLineageSecret derives the masking key.
func (n *Node) setLineageSecret(secret []byte) error {
	mk, err := hkdf.Key(sha256.New, secret, []byte(n.opt.Lineage), "keymig masking key v1", 32)
	if err != nil {
		return err
	}
	n.masking, err = newGCM(mk)
	return err
}

// ID is the HSM id.
func (n *Node) ID() string { return n.opt.ID }

// AZ is the HSM's availability zone.
func (n *Node) AZ() string { return n.opt.AZ }

// Lineage is the public lineage id the HSM shares with its clones.
func (n *Node) Lineage() string { return n.opt.Lineage }

// Path is the HSM's bbolt file.
func (n *Node) Path() string { return n.path }

// Policy is the HSM's persisted policy.
func (n *Node) Policy() hsm.Policy { return n.policy() }

func (n *Node) policy() hsm.Policy { return *n.pol.Load() }

func (n *Node) setPolicy(p hsm.Policy) { n.pol.Store(&p) }

// Close ends every session, drops session keys, writes and syncs the
// buffered audit records and closes the files. It is idempotent.
func (n *Node) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	n.mu.Lock()
	for ref, k := range n.keys {
		if k.session != 0 {
			delete(n.keys, ref)
		}
	}
	n.sessions = map[uint64]*session{}
	n.mu.Unlock()
	// Wait for writes that committed but have not appended their record;
	// later ones see closed.
	n.writing.Lock()
	n.writing.Unlock()
	lerr := n.log.close()
	return errors.Join(lerr, n.db.Close())
}

// SetFault replaces the node's injected faults; the zero hsm.Fault clears them.
func (n *Node) SetFault(f hsm.Fault) {
	n.faultMu.Lock()
	n.fault = f
	n.failNext.Store(int64(f.FailNext))
	n.faultOn.Store(f.Down || f.FailNext > 0 || f.Throttle > 0 || f.Latency > 0)
	n.faultMu.Unlock()
}

// InFlight reports how many operations are running, for tests and metrics.
func (n *Node) InFlight() int { return int(n.inFlight.Load()) }

// begin admits one operation: it applies faults, then takes a concurrency
// slot. The returned function releases the slot.
func (n *Node) begin(ctx context.Context, op string) (func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if n.closed.Load() {
		return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is closed; open it again", n.opt.ID)
	}
	if n.faultOn.Load() {
		n.faultMu.Lock()
		f := n.fault
		n.faultMu.Unlock()
		if f.Latency > 0 {
			t := time.NewTimer(f.Latency)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
		}
		if f.Down {
			return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is down; retry on another hsm of the cluster", n.opt.ID)
		}
		for {
			c := n.failNext.Load()
			if c <= 0 {
				break
			}
			if n.failNext.CompareAndSwap(c, c-1) {
				return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "hsm %s is unavailable (injected fault); retry", n.opt.ID)
			}
		}
		if f.Throttle > 0 && mrand.Float64() < f.Throttle {
			return nil, hsm.Errorf(hsm.CodeThrottled, op, 0, "hsm %s is throttling requests; retry with backoff", n.opt.ID)
		}
	}
	if c := n.inFlight.Add(1); c > int64(n.opt.MaxConcurrentOps) {
		n.inFlight.Add(-1)
		return nil, hsm.Errorf(hsm.CodeThrottled, op, 0, "hsm %s is at its limit of %d concurrent operations; retry with backoff", n.opt.ID, n.opt.MaxConcurrentOps)
	}
	return func() { n.inFlight.Add(-1) }, nil
}

// newGCM returns AES-GCM under a 16-, 24- or 32-byte key.
func newGCM(k []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// seal encrypts pt as nonce ‖ ciphertext ‖ tag.
func seal(a cipher.AEAD, pt, aad []byte) []byte {
	nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(pt)+a.Overhead())
	rand.Read(nonce)
	return a.Seal(nonce, nonce, pt, aad)
}

var errSealed = errors.New("sealed data is corrupt or was sealed under another key")

// unseal reverses seal.
func unseal(a cipher.AEAD, ct, aad []byte) ([]byte, error) {
	if len(ct) < a.NonceSize()+a.Overhead() {
		return nil, errSealed
	}
	pt, err := a.Open(nil, ct[:a.NonceSize()], ct[a.NonceSize():], aad)
	if err != nil {
		return nil, errSealed
	}
	return pt, nil
}
