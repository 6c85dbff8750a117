package cluster

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
)

// backupsDir holds a copy of every backup of the cluster.
const backupsDir = "backups"

// backupMagic starts every backup file.
const backupMagic = "KEYMIG-HSM-BACKUP-1\n"

// maxBackupHeader bounds the clear-text header a reader accepts.
const maxBackupHeader = 1 << 16

// BackupInfo is a backup's clear-text header: what it is and where it came
// from. Path is where it was read from; it is not stored in the file.
type BackupInfo struct {
	ID        string    `json:"backup-id"`         // backup-XXXXXXXXXXX
	ClusterID string    `json:"source-cluster-id"` // the cluster backed up
	Region    string    `json:"region"`            // that cluster's region
	Lineage   string    `json:"lineage"`           // shared by the cluster and its clones
	Created   time.Time `json:"created"`           // when the backup was taken (UTC)
	Keys      int       `json:"token-keys"`        // token keys in the backup
	Users     int       `json:"users"`             // users in the backup
	SourceHSM string    `json:"source-hsm"`        // the HSM snapshotted
	Path      string    `json:"path,omitempty"`    // file it was read from or written to
}

// backupHeader is the whole clear-text header. The lineage secret in it is
// wrapped under the built-in vendor key (see vendorKey).
type backupHeader struct {
	BackupInfo
	Policy        hsm.Policy `json:"policy"`
	WrappedSecret []byte     `json:"wrapped-lineage-secret"`
}

// vendorKey stands for the HSM vendor's key hierarchy, which lets the
// vendor restore a backup into a new cluster. It is compiled into keymig:
// this is a simulation, not a security boundary.
func vendorKey() []byte {
	k := sha256.Sum256([]byte("keymig simulated HSM vendor backup key v1"))
	return k[:]
}

// backupKey derives the key that encrypts a backup's body.
func backupKey(secret []byte, backupID string) ([]byte, error) {
	return hkdf.Key(sha256.New, secret, []byte(backupID), "keymig backup v1", 32)
}

func gcmSeal(key, plaintext, aad []byte) ([]byte, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(plaintext)+a.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return a.Seal(nonce, nonce, plaintext, aad), nil
}

func gcmOpen(key, sealed, aad []byte) ([]byte, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	if len(sealed) < a.NonceSize()+a.Overhead() {
		return nil, errors.New("too short")
	}
	return a.Open(nil, sealed[:a.NonceSize()], sealed[a.NonceSize():], aad)
}

// encodeBackup lays out magic ‖ uint32 header length ‖ header JSON ‖
// AES-256-GCM(body), the header being the body's additional data.
func encodeBackup(h backupHeader, secret, snapshot []byte) ([]byte, error) {
	var err error
	h.Path = ""
	h.WrappedSecret, err = gcmSeal(vendorKey(), secret, []byte(h.ID+"\x00"+h.Lineage))
	if err != nil {
		return nil, err
	}
	hdr, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	key, err := backupKey(secret, h.ID)
	if err != nil {
		return nil, err
	}
	body, err := gcmSeal(key, snapshot, hdr)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	buf.WriteString(backupMagic)
	_ = binary.Write(&buf, binary.BigEndian, uint32(len(hdr)))
	buf.Write(hdr)
	buf.Write(body)
	return buf.Bytes(), nil
}

// splitBackup parses the layout defensively and returns the header, its
// exact bytes and the sealed body.
func splitBackup(b []byte) (backupHeader, []byte, []byte, error) {
	var h backupHeader
	if !bytes.HasPrefix(b, []byte(backupMagic)) {
		return h, nil, nil, errors.New("not a keymig HSM backup")
	}
	b = b[len(backupMagic):]
	if len(b) < 4 {
		return h, nil, nil, errors.New("truncated backup header")
	}
	n := binary.BigEndian.Uint32(b)
	b = b[4:]
	if n == 0 || n > maxBackupHeader || uint64(n) > uint64(len(b)) {
		return h, nil, nil, errors.New("corrupt backup header length")
	}
	hdr, body := b[:n], b[n:]
	if err := json.Unmarshal(hdr, &h); err != nil {
		return h, nil, nil, fmt.Errorf("corrupt backup header: %w", err)
	}
	if h.ID == "" || h.Lineage == "" || len(h.WrappedSecret) == 0 {
		return h, nil, nil, errors.New("backup header lacks its id, lineage or wrapped secret")
	}
	return h, hdr, body, nil
}

// decodeBackup opens a backup: it unwraps the lineage secret with the
// vendor key and decrypts the snapshot.
func decodeBackup(b []byte) (backupHeader, []byte, []byte, error) {
	h, hdr, body, err := splitBackup(b)
	if err != nil {
		return h, nil, nil, err
	}
	secret, err := gcmOpen(vendorKey(), h.WrappedSecret, []byte(h.ID+"\x00"+h.Lineage))
	if err != nil || len(secret) != lineageSecretSize {
		return h, nil, nil, errors.New("the backup's lineage secret cannot be unwrapped: the backup is corrupt or was altered")
	}
	key, err := backupKey(secret, h.ID)
	if err != nil {
		return h, nil, nil, err
	}
	snap, err := gcmOpen(key, body, hdr)
	if err != nil {
		return h, nil, nil, errors.New("the backup cannot be decrypted: it is corrupt or was altered")
	}
	return h, secret, snap, nil
}

// ReadBackupInfo reads a backup file's clear-text header.
func ReadBackupInfo(path string) (BackupInfo, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("read backup %s: %w", path, err)
	}
	h, _, _, err := splitBackup(b)
	if err != nil {
		return BackupInfo{}, hsm.Errorf(hsm.CodeIntegrity, "", 0, "backup %s: %v", path, err)
	}
	h.Path = path
	return h.BackupInfo, nil
}

// ListBackups lists the backups kept in the cluster directory dir, newest
// first. It needs no lock and no login.
func ListBackups(dir string) ([]BackupInfo, error) {
	if _, err := readConfig(dir); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(dir, backupsDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list backups of cluster %s: %w", dir, err)
	}
	var out []BackupInfo
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".backup") {
			continue
		}
		info, err := ReadBackupInfo(filepath.Join(dir, backupsDir, e.Name()))
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.After(out[j].Created)
		}
		return out[i].ID > out[j].ID
	})
	return out, nil
}

// lineageSecret returns a copy of the cluster's lineage secret: from the
// HSM if it offers it, else from memory if this process made the cluster.
func (c *Cluster) lineageSecret(m *member) ([]byte, error) {
	if ss, ok := m.m.(lineageSecretSource); ok {
		return ss.LineageSecret()
	}
	if len(c.secret) == lineageSecretSize {
		return bytes.Clone(c.secret), nil
	}
	return nil, hsm.Errorf(hsm.CodeUnsupportedMechanism, "backup", 0,
		"cluster %s: HSM %s does not hand over the lineage secret a backup needs, and this process did not create the cluster; back it up from the process that ran init or restore", c.clusterID(), m.id)
}

// lineageSecretSource is an HSM that hands its lineage secret to the
// cluster for backups. It is optional in Member so that a remote HSM need
// not offer it.
type lineageSecretSource interface {
	LineageSecret() ([]byte, error)
}

// Backup snapshots the HSM holding the most token keys and writes the
// encrypted backup to out (mode 0600; empty out writes only the copy) and to
// DIR/backups/ID.backup, recording it in the cluster's backup index.
func (c *Cluster) Backup(ctx context.Context, out string) (BackupInfo, error) {
	c.adminMu.Lock()
	defer c.adminMu.Unlock()
	info, _, err := c.backup(ctx, out)
	return info, err
}

// backup does Backup and also returns the snapshot, for AddHSM.
func (c *Cluster) backup(ctx context.Context, out string) (BackupInfo, []byte, error) {
	listings := c.listAll(ctx)
	var src *member
	for _, m := range c.memberList() {
		if _, ok := listings[m.id]; ok && (src == nil || len(listings[m.id]) > len(listings[src.id])) {
			src = m
		}
	}
	if src == nil {
		return BackupInfo{}, nil, hsm.Errorf(hsm.CodeUnavailable, "backup", 0, "cluster %s: no HSM answered", c.clusterID())
	}
	secret, err := c.lineageSecret(src)
	if err != nil {
		return BackupInfo{}, nil, err
	}
	defer clear(secret)
	var snap []byte
	if err := c.call(ctx, src, func(ctx context.Context) (err error) {
		snap, err = src.m.Snapshot(ctx)
		return err
	}); err != nil {
		return BackupInfo{}, nil, fmt.Errorf("backup of cluster %s: snapshot of HSM %s: %w", c.clusterID(), src.id, err)
	}
	var counts struct {
		Users []json.RawMessage `json:"users"`
		Keys  []json.RawMessage `json:"keys"`
	}
	_ = json.Unmarshal(snap, &counts) // the counts are informative only
	users, tokens := len(counts.Users), len(counts.Keys)
	c.mu.RLock()
	h := backupHeader{
		BackupInfo: BackupInfo{
			ID:        "backup-" + randomID(),
			ClusterID: c.cfg.ID, Region: c.cfg.Region, Lineage: c.cfg.Lineage,
			Created: time.Now().UTC(), Keys: tokens, Users: users, SourceHSM: src.id,
		},
		Policy: c.cfg.Policy,
	}
	c.mu.RUnlock()
	data, err := encodeBackup(h, secret, snap)
	if err != nil {
		return BackupInfo{}, nil, fmt.Errorf("backup of cluster %s: %w", c.clusterID(), err)
	}
	kept := filepath.Join(c.dir, backupsDir, h.ID+".backup")
	if err := os.MkdirAll(filepath.Dir(kept), 0o700); err != nil {
		return BackupInfo{}, nil, err
	}
	if err := atomicfile.WriteFile(kept, data, 0o600); err != nil {
		return BackupInfo{}, nil, err
	}
	info := h.BackupInfo
	info.Path = kept
	if out != "" {
		if err := atomicfile.WriteFile(out, data, 0o600); err != nil {
			return BackupInfo{}, nil, err
		}
		info.Path = out
	}
	idx := h.BackupInfo
	idx.Path = filepath.Join(backupsDir, h.ID+".backup")
	if err := c.updateConfig(func(cfg *config) { cfg.Backups = append(cfg.Backups, idx) }); err != nil {
		return BackupInfo{}, nil, err
	}
	return info, snap, nil
}

// RestoreOptions describe a clone made from a backup.
type RestoreOptions struct {
	Backup                      string   // backup file
	Dir                         string   // new cluster directory; must not exist or be empty
	Region                      string   // default: the backup's region
	HSMs                        int      // default 1
	AZs                         []string // default region+"a", "b", "c"
	DisableKeyAvailabilityCheck bool     // a 1-HSM clone always has the check disabled
	KDFIterations               int      // password hashing cost; 0 = the backup's policy
	Members                     Opener   // makes the HSMs; nil means LocalHSMs
}

// Restore makes a clone from a backup: a new cluster, with a new id, in
// o.Dir and o.Region, that shares the source's lineage, so masked objects
// move between the two, and holds its users and keys with the same handles.
func Restore(ctx context.Context, o RestoreOptions) (*Cluster, error) {
	b, err := os.ReadFile(o.Backup)
	if err != nil {
		return nil, fmt.Errorf("restore: read backup %s: %w", o.Backup, err)
	}
	h, secret, snap, err := decodeBackup(b)
	if err != nil {
		return nil, hsm.Errorf(hsm.CodeIntegrity, "restore", 0, "backup %s: %v", o.Backup, err)
	}
	defer clear(secret)
	if o.HSMs == 0 {
		o.HSMs = 1
	}
	if o.HSMs < 0 || o.HSMs > 28 {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "restore", 0, "%d HSMs: a cluster has 1 to 28", o.HSMs)
	}
	if o.Dir == "" {
		return nil, hsm.Errorf(hsm.CodeInvalidInput, "restore", 0, "no cluster directory given")
	}
	cfg := config{
		Format:  1,
		ID:      "cluster-" + randomID(),
		Region:  orDefault(o.Region, h.Region),
		Lineage: h.Lineage,
		Created: time.Now().UTC().Truncate(time.Second),
		Policy:  h.Policy,
	}
	cfg.Policy.KeyAvailabilityCheck = !o.DisableKeyAvailabilityCheck && o.HSMs > 1
	cfg.OneHSMCheckOff = o.HSMs == 1 && !o.DisableKeyAvailabilityCheck
	if o.KDFIterations != 0 {
		if o.KDFIterations < 0 {
			return nil, hsm.Errorf(hsm.CodeInvalidInput, "restore", 0, "%d password hashing iterations: want a positive number, or 0 for the backup's", o.KDFIterations)
		}
		cfg.Policy.KDFIterations = o.KDFIterations
	}
	azs := defaultAZs(cfg.Region, o.AZs)
	for i := range o.HSMs {
		cfg.HSMs = append(cfg.HSMs, hsmConfig{ID: "hsm-" + randomID(), AZ: azs[i%len(azs)]})
	}
	c, err := create(ctx, o.Dir, cfg, secret, o.Members, func(ctx context.Context, m Member) error {
		return m.RestoreSnapshot(ctx, snap)
	})
	if err != nil {
		return nil, err
	}
	c.notes = append(c.notes, fmt.Sprintf("clone of cluster %s (%s) from backup %s of %s", h.ClusterID, h.Region, h.ID, h.Created.Format(time.RFC3339)))
	if o.HSMs == 1 && !o.DisableKeyAvailabilityCheck {
		c.notes = append(c.notes, oneHSMNote)
	}
	// The key map starts from what the restored HSMs hold.
	for id, keys := range c.listAll(ctx) {
		for _, k := range keys {
			if k.Attrs.Token {
				c.keys.add(k.Ref, id)
			}
		}
	}
	return c, nil
}
