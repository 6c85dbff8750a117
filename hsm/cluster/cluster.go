package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
)

// configFile is the cluster's description: id, region, lineage, HSMs,
// policy, creation time, backup index.
const configFile = "cluster.json"

// DefaultKeyCapacity is CloudHSM's default number of keys per cluster.
const DefaultKeyCapacity = 3300

// DefaultRegion is the region of a cluster initialised without one.
const DefaultRegion = "us-east-1"

// lineageSecretSize is the size of the secret a cluster and its clones share.
const lineageSecretSize = 32

// config is cluster.json.
type config struct {
	Format  int          `json:"format"`
	ID      string       `json:"cluster-id"`
	Region  string       `json:"region"`
	Lineage string       `json:"lineage"`
	HSMs    []hsmConfig  `json:"hsms"`
	Policy  hsm.Policy   `json:"policy"`
	Created time.Time    `json:"created"`
	Backups []BackupInfo `json:"backups,omitempty"`
	// Deleted holds token keys deleted while an HSM that may hold them was
	// unreachable, so that Sync deletes them there instead of copying
	// them back.
	Deleted []hsm.KeyRef `json:"deleted-keys,omitempty"`
	// OneHSMCheckOff says the key availability check is off only because
	// the cluster had one HSM; AddHSM turns it on at the second HSM.
	OneHSMCheckOff bool `json:"key-availability-check-off-for-one-hsm,omitempty"`
	// Behind holds HSMs that missed a change (a key or user made, a key
	// deleted) while they were down; Open syncs them once they are back.
	Behind []string `json:"hsms-behind,omitempty"`
}

// oneHSMNote is what Init and Restore say about a cluster of one HSM.
const oneHSMNote = "key availability check disabled: a cluster of one HSM cannot keep a key on 2 HSMs; it turns on when you add an HSM with `keymig hsm add-hsm`"

// hsmConfig is one HSM in cluster.json.
type hsmConfig struct {
	ID string `json:"hsm-id"`
	AZ string `json:"availability-zone"`
}

func readConfig(dir string) (*config, error) {
	b, err := os.ReadFile(filepath.Join(dir, configFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, hsm.Errorf(hsm.CodeNotFound, "", 0, "%s is not a cluster directory (no %s); make one with keymig hsm init", dir, configFile)
	}
	if err != nil {
		return nil, fmt.Errorf("read cluster %s: %w", dir, err)
	}
	var cfg config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, configFile), err)
	}
	if cfg.ID == "" || len(cfg.HSMs) == 0 {
		return nil, fmt.Errorf("read %s: no cluster id or no HSMs", filepath.Join(dir, configFile))
	}
	return &cfg, nil
}

func (cfg *config) clone() config {
	c := *cfg
	c.HSMs = append([]hsmConfig(nil), cfg.HSMs...)
	c.Backups = append([]BackupInfo(nil), cfg.Backups...)
	c.Deleted = append([]hsm.KeyRef(nil), cfg.Deleted...)
	c.Behind = append([]string(nil), cfg.Behind...)
	return c
}

// InitOptions describe a new cluster.
type InitOptions struct {
	Dir    string   // new cluster directory; must not exist or be empty
	Region string   // default DefaultRegion
	HSMs   int      // default 1
	AZs    []string // availability zones, assigned round-robin; default region+"a", "b", "c"
	// DisableKeyAvailabilityCheck lets a token key be used while it is on
	// one HSM only. A 1-HSM cluster always has the check disabled, as
	// CloudHSM requires; Init says so in Cluster.Notes.
	DisableKeyAvailabilityCheck bool
	KeyCapacity                 int             // token keys per cluster, default DefaultKeyCapacity
	MaxConcurrentOps            int             // per HSM; 0 = the HSM's default
	NonFIPS                     bool            // default is FIPS mode
	Officer                     hsm.Credentials // first crypto officer, created on every HSM
	// KDFIterations is the cluster's password hashing cost (PBKDF2-SHA256
	// iterations), kept in its policy; 0 = the HSMs' default. Rehearsals
	// and tests lower it to make logins cheap.
	KDFIterations int
	// Members makes the HSMs; nil means LocalHSMs.
	Members Opener
}

// OpenOptions tune how a cluster directory is opened.
type OpenOptions struct {
	// LockTimeout is how long to wait for another keymig process that holds
	// the directory; default 10s. The error names the directory and the
	// holder (pid, host, command, since).
	LockTimeout time.Duration
	// Members opens the HSMs; nil means LocalHSMs.
	Members Opener
}

// Stats counts what the cluster client did to hide failures.
type Stats struct {
	Retries        int64 // operations tried again, for any reason
	Throttled      int64 // "throttled" answers received
	Failovers      int64 // operations moved to another HSM after one was unavailable
	QuorumRefusals int64 // operations refused by the key availability quorum
	MarkedDown     int64 // times an HSM was marked down after an unavailable answer
	Clones         int64 // masked copies made to replicate new token keys
	CloneFailures  int64 // masked copies that failed (the key then lacks coverage)
}

type counters struct {
	retries, throttled, failovers, quorum, markedDown, clones, cloneFailures atomic.Int64
}

// member is one HSM of an open cluster and what the client knows of its health.
type member struct {
	id, az     string
	m          Member
	inflight   atomic.Int64
	forcedDown atomic.Bool  // a recorded Down fault
	downUntil  atomic.Int64 // unix nanoseconds; after an unavailable answer
}

// ThrottleAttempts is how many times a call answered "throttled" is tried
// in all, with full-jitter backoff between tries, before the throttled
// error is returned.
const ThrottleAttempts = 8

// retryPolicy bounds retries: full-jitter exponential backoff for
// throttling, waits for an HSM to come back when none can serve a call, a
// pause before an unavailable HSM is tried again, and a per-call timeout.
type retryPolicy struct {
	base, cap         time.Duration
	attempts          int
	waitBase, waitCap time.Duration
	waitFor           time.Duration // how long a call waits for an HSM to come back
	downFor           time.Duration
	callTimeout       time.Duration
}

var defaultRetry = retryPolicy{
	base:        2 * time.Millisecond,
	cap:         200 * time.Millisecond,
	attempts:    ThrottleAttempts,
	waitBase:    50 * time.Millisecond,
	waitCap:     2 * time.Second,
	waitFor:     5 * time.Second,
	downFor:     2 * time.Second,
	callTimeout: 30 * time.Second,
}

// Cluster is an open cluster directory: the HSMs in it, the client-side
// state shared by every session (which HSMs hold which token keys, which
// HSMs are down), and the directory lock. It implements hsm.Backend.
type Cluster struct {
	dir    string
	lock   *dirLock
	opener Opener // makes and opens the members
	retry  retryPolicy
	stats  counters
	notes  []string

	mu      sync.RWMutex // guards cfg and members, never held across an HSM call
	cfg     config
	members []*member
	closed  bool

	adminMu sync.Mutex // serialises Sync, backups and membership changes

	keys keyMap

	suspectMu sync.Mutex
	suspect   map[string]bool // see markSuspect

	tombs tombs // see finishDeletes

	// secret is the lineage secret when this process made the cluster
	// (Init, Restore); otherwise the HSMs are asked for it.
	secret []byte
}

var _ hsm.Backend = (*Cluster)(nil)

// Init makes a new cluster directory with o.HSMs HSMs, each with the first
// crypto officer, and returns it open.
func Init(ctx context.Context, o InitOptions) (c *Cluster, err error) {
	if o.Dir == "" {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "init", 0, "no cluster directory given")
	}
	if o.Officer.User == "" || o.Officer.Password == "" {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "init", 0, "a first crypto officer (user and password) is required")
	}
	if o.HSMs == 0 {
		o.HSMs = 1
	}
	if o.HSMs < 0 || o.HSMs > 28 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "init", 0, "%d HSMs: a cluster has 1 to 28", o.HSMs)
	}
	if o.KeyCapacity == 0 {
		o.KeyCapacity = DefaultKeyCapacity
	}
	if o.KeyCapacity < 0 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "init", 0, "key capacity %d must be positive", o.KeyCapacity)
	}
	if o.KDFIterations < 0 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "init", 0, "%d password hashing iterations: want a positive number, or 0 for the default", o.KDFIterations)
	}
	cfg := config{
		Format:  1,
		Region:  orDefault(o.Region, DefaultRegion),
		ID:      "cluster-" + randomID(),
		Lineage: "lineage-" + randomID(),
		Created: time.Now().UTC().Truncate(time.Second),
		Policy: hsm.Policy{
			FIPS:                 !o.NonFIPS,
			KeyCapacity:          o.KeyCapacity,
			KeyAvailabilityCheck: !o.DisableKeyAvailabilityCheck && o.HSMs > 1,
			MaxConcurrentOps:     o.MaxConcurrentOps,
			KDFIterations:        o.KDFIterations,
		},
		OneHSMCheckOff: o.HSMs == 1 && !o.DisableKeyAvailabilityCheck,
	}
	azs := defaultAZs(cfg.Region, o.AZs)
	for i := range o.HSMs {
		cfg.HSMs = append(cfg.HSMs, hsmConfig{ID: "hsm-" + randomID(), AZ: azs[i%len(azs)]})
	}
	secret := make([]byte, lineageSecretSize)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	defer clear(secret)

	c, err = create(ctx, o.Dir, cfg, secret, o.Members, func(ctx context.Context, m Member) error {
		return m.Bootstrap(ctx, o.Officer)
	})
	if err != nil {
		return nil, err
	}
	if o.HSMs == 1 && !o.DisableKeyAvailabilityCheck {
		c.notes = append(c.notes, oneHSMNote)
	}
	return c, nil
}

// create makes the directory, takes its lock, creates every HSM of cfg
// with the lineage secret, fills each with fill, and writes cluster.json
// last, so that a directory without it is not a cluster.
func create(ctx context.Context, dir string, cfg config, secret []byte, members Opener, fill func(context.Context, Member) error) (c *Cluster, err error) {
	if err := ensureEmptyDir(dir); err != nil {
		return nil, err
	}
	lock, err := lockDir(dir, 0)
	if err != nil {
		return nil, err
	}
	c = &Cluster{dir: dir, lock: lock, opener: openerOrLocal(members), retry: defaultRetry, cfg: cfg, secret: bytes.Clone(secret)}
	c.keys.init()
	defer func() {
		if err != nil {
			c.Close()
			for _, h := range cfg.HSMs {
				c.opener.Remove(dir, h.ID)
			}
		}
	}()
	for _, h := range cfg.HSMs {
		m, err := c.createMember(cfg, h, secret)
		if err != nil {
			return c, err
		}
		c.members = append(c.members, &member{id: h.ID, az: h.AZ, m: m})
		if err := fill(ctx, m); err != nil {
			return c, fmt.Errorf("cluster %s: set up HSM %s: %w", cfg.ID, h.ID, err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, backupsDir), 0o700); err != nil {
		return c, err
	}
	if err := c.saveConfig(); err != nil {
		return c, err
	}
	c.keys.markLoaded()
	return c, nil
}

// createMember makes one new HSM of the cluster described by cfg.
func (c *Cluster) createMember(cfg config, h hsmConfig, secret []byte) (Member, error) {
	m, err := c.opener.Create(c.dir, MemberSpec{ID: h.ID, AZ: h.AZ, Lineage: cfg.Lineage, LineageSecret: secret, Policy: cfg.Policy})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: create HSM %s: %w", cfg.ID, h.ID, err)
	}
	return m, nil
}

func openerOrLocal(o Opener) Opener {
	if o == nil {
		return LocalHSMs{}
	}
	return o
}

// Open opens an existing cluster directory, taking its lock, and applies the
// faults recorded in it. HSMs recorded as down are skipped until they are
// brought back; HSMs that missed changes while down and are now back are
// synced before Open returns.
func Open(ctx context.Context, dir string, o OpenOptions) (c *Cluster, err error) {
	if _, err := readConfig(dir); err != nil {
		return nil, err
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = 10 * time.Second
	}
	lock, err := lockDir(dir, o.LockTimeout)
	if err != nil {
		return nil, err
	}
	c = &Cluster{dir: dir, lock: lock, opener: openerOrLocal(o.Members), retry: defaultRetry}
	c.keys.init()
	defer func() {
		if err != nil {
			c.Close()
			c = nil
		}
	}()
	cfg, err := readConfig(dir) // again, now that no one else can change it
	if err != nil {
		return c, err
	}
	c.cfg = *cfg
	faults, err := Faults(dir)
	if err != nil {
		return c, err
	}
	for _, h := range cfg.HSMs {
		n, err := c.opener.Open(dir, MemberSpec{ID: h.ID, AZ: h.AZ, Lineage: cfg.Lineage, Policy: cfg.Policy}, o.LockTimeout)
		if err != nil {
			return c, fmt.Errorf("cluster %s: open HSM %s: %w", cfg.ID, h.ID, err)
		}
		m := &member{id: h.ID, az: h.AZ, m: n}
		c.members = append(c.members, m)
		if f, ok := faults[h.ID]; ok {
			n.SetFault(f)
			m.forcedDown.Store(f.Down)
		}
	}
	c.syncReturned(ctx)
	return c, nil
}

// Close closes every HSM and releases the directory lock. It is idempotent.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	clear(c.secret)
	members := c.members
	c.mu.Unlock()
	var errs []error
	for _, m := range members {
		if err := m.m.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close HSM %s: %w", m.id, err))
		}
	}
	if err := c.lock.unlock(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Dir is the cluster directory.
func (c *Cluster) Dir() string { return c.dir }

// Notes are remarks Init or Restore made about the cluster's configuration
// (for example that a 1-HSM cluster has the availability check disabled).
func (c *Cluster) Notes() []string { return append([]string(nil), c.notes...) }

// Info describes the cluster: id, region, lineage, HSMs with their state,
// policy, token key count and creation time. It needs no login.
func (c *Cluster) Info() hsm.ClusterInfo {
	if !c.keys.isLoaded() {
		// Count the token keys once, as a login would.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = c.ensureKeyMap(ctx)
		cancel()
	}
	c.mu.RLock()
	cfg := c.cfg.clone()
	members := append([]*member(nil), c.members...)
	c.mu.RUnlock()
	info := hsm.ClusterInfo{
		ID: cfg.ID, Region: cfg.Region, Lineage: cfg.Lineage,
		Policy: cfg.Policy, Created: cfg.Created, Keys: c.keys.count(),
	}
	for _, m := range members {
		state := "active"
		if !c.isLive(m) {
			state = "down"
		}
		info.HSMs = append(info.HSMs, hsm.HSMInfo{ID: m.id, AZ: m.az, State: state})
	}
	return info
}

// ReadInfo describes the cluster at dir from its cluster.json alone,
// without opening it (no lock, no HSM): id, region, lineage, HSMs and their
// zones, policy. HSM states and the key count are not known this way and
// are left empty.
func ReadInfo(dir string) (hsm.ClusterInfo, error) {
	cfg, err := readConfig(dir)
	if err != nil {
		return hsm.ClusterInfo{}, err
	}
	info := hsm.ClusterInfo{ID: cfg.ID, Region: cfg.Region, Lineage: cfg.Lineage, Policy: cfg.Policy, Created: cfg.Created}
	for _, h := range cfg.HSMs {
		info.HSMs = append(info.HSMs, hsm.HSMInfo{ID: h.ID, AZ: h.AZ})
	}
	return info, nil
}

// Stats returns the client's counters since the cluster was opened.
func (c *Cluster) Stats() Stats {
	s := &c.stats
	return Stats{
		Retries: s.retries.Load(), Throttled: s.throttled.Load(), Failovers: s.failovers.Load(),
		QuorumRefusals: s.quorum.Load(), MarkedDown: s.markedDown.Load(),
		Clones: s.clones.Load(), CloneFailures: s.cloneFailures.Load(),
	}
}

// SetFault injects a fault into HSM hsmID (or AllHSMs) of the open cluster
// and records it in the directory, so later processes see it too. A zero
// hsm.Fault clears it; clearing a Down fault lets the HSM be used again at once.
func (c *Cluster) SetFault(hsmID string, f hsm.Fault) error {
	if err := SetFault(c.dir, hsmID, f); err != nil {
		return err
	}
	for _, m := range c.memberList() {
		if hsmID == AllHSMs || m.id == hsmID {
			m.m.SetFault(f)
			m.forcedDown.Store(f.Down)
			if !f.Down {
				m.downUntil.Store(0)
			}
		}
	}
	return nil
}

// saveConfig writes cluster.json from c.cfg.
func (c *Cluster) saveConfig() error {
	c.mu.RLock()
	cfg := c.cfg.clone()
	c.mu.RUnlock()
	return writeJSONAtomic(filepath.Join(c.dir, configFile), cfg, 0o644)
}

// updateConfig changes c.cfg under the lock and saves it.
func (c *Cluster) updateConfig(fn func(*config)) error {
	c.mu.Lock()
	fn(&c.cfg)
	c.mu.Unlock()
	return c.saveConfig()
}

func (c *Cluster) memberList() []*member {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return append([]*member(nil), c.members...)
}

func (c *Cluster) memberByID(id string) *member {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, m := range c.members {
		if m.id == id {
			return m
		}
	}
	return nil
}

func (c *Cluster) policy() hsm.Policy {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.cfg.Policy
}

func (c *Cluster) clusterID() string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.cfg.ID
}

func ensureEmptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return os.MkdirAll(dir, 0o700)
	case err != nil:
		return fmt.Errorf("cluster directory %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.Name() != lockFile {
			return hsm.Errorf(hsm.CodeExists, "", 0, "cluster directory %s is not empty; choose a new directory", dir)
		}
	}
	return nil
}

func defaultAZs(region string, azs []string) []string {
	var out []string
	for _, a := range azs {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		out = []string{region + "a", region + "b", region + "c"}
	}
	return out
}

var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// randomID is 11 random lower-case characters, the shape of CloudHSM ids.
func randomID() string {
	b := make([]byte, 7)
	_, _ = rand.Read(b)
	return idEncoding.EncodeToString(b)[:11]
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
