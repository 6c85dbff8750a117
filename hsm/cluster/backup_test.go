package cluster

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// A backup restores into a clone in another directory and region with every
// key's handle and KCV intact, and the clone accepts masked objects from the
// original, keeping handle, KCV, owner and shares; a cluster of another
// lineage refuses them.
func TestBackupRestoreClone(t *testing.T) {
	ctx := context.Background()
	orig := newCluster(t, 2)
	s := login(t, orig, alice)
	var before []hsm.KeyInfo
	for i := range 4 {
		k := genAES(t, s, "k", map[hsm.Attr]bool{hsm.AttrExtractable: i%2 == 0})
		before = append(before, k)
	}
	pub, priv, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048,
		Public: hsm.Template{Label: "pub"}, Private: hsm.Template{Label: "priv"}})
	if err != nil {
		t.Fatal(err)
	}
	before = append(before, pub, priv)

	out := filepath.Join(t.TempDir(), "b.backup")
	info, err := orig.Backup(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	if info.Keys != len(before) || info.Users != 3 || info.ClusterID != orig.Info().ID || info.Lineage != orig.Info().Lineage {
		t.Errorf("BackupInfo = %+v", info)
	}
	if st, _ := os.Stat(out); st.Mode().Perm() != 0o600 {
		t.Errorf("backup mode %v", st.Mode())
	}
	hdr, err := ReadBackupInfo(out)
	if err != nil || hdr.ID != info.ID || hdr.Region != DefaultRegion {
		t.Fatalf("ReadBackupInfo = %+v, %v", hdr, err)
	}
	list, err := ListBackups(orig.Dir())
	if err != nil || len(list) != 1 || list[0].ID != info.ID {
		t.Fatalf("ListBackups = %+v, %v", list, err)
	}
	raw, _ := os.ReadFile(out)
	if bytes.Contains(raw, []byte(alice.Password)) {
		t.Fatal("backup holds a password in the clear")
	}

	// A key made after the backup, non-extractable and shared, goes over as
	// a masked object.
	late := genAES(t, s, "late", map[hsm.Attr]bool{hsm.AttrExtractable: false})
	if err := s.ShareKey(ctx, late.Ref, bob.User); err != nil {
		t.Fatal(err)
	}

	clone, err := Restore(ctx, RestoreOptions{Backup: out, Dir: filepath.Join(t.TempDir(), "clone"), Region: "eu-west-1", HSMs: 2, KDFIterations: testKDF})
	if err != nil {
		t.Fatal(err)
	}
	defer clone.Close()
	ci := clone.Info()
	if ci.ID == orig.Info().ID || ci.Region != "eu-west-1" || ci.Lineage != orig.Info().Lineage || ci.HSMs[0].AZ != "eu-west-1a" {
		t.Errorf("clone info %+v", ci)
	}
	cs, err := clone.Login(ctx, alice)
	if err != nil {
		t.Fatalf("alice logs in to the clone: %v", err)
	}
	defer cs.Logout(ctx)
	got, err := cs.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(before) {
		t.Fatalf("clone has %d keys, want %d", len(got), len(before))
	}
	for _, want := range before {
		i := slices.IndexFunc(got, func(k hsm.KeyInfo) bool { return k.Ref == want.Ref })
		if i < 0 || !bytes.Equal(got[i].KCV, want.KCV) || !got[i].Coverage.Full() {
			t.Errorf("key %s: clone has %+v", want.Ref, got)
		}
	}

	blob, err := s.ExportMasked(ctx, late.Ref)
	if err != nil {
		t.Fatal(err)
	}
	ins, err := cs.(hsm.FullSession).InsertMasked(ctx, blob)
	if err != nil {
		t.Fatalf("insert masked object into the clone: %v", err)
	}
	if ins.Ref != late.Ref || !bytes.Equal(ins.KCV, late.KCV) || ins.Owner != alice.User || !slices.Equal(ins.SharedWith, []string{bob.User}) || ins.Attrs.Extractable {
		t.Errorf("inserted %+v, want handle, KCV, owner and shares of %+v", ins, late)
	}
	if !ins.Coverage.Full() || ins.Coverage.Count() != 2 {
		t.Errorf("inserted key coverage %s", ins.Coverage)
	}
	if err := encrypt(ctx, cs, late.Ref); err != nil {
		t.Errorf("use the copy in the clone: %v", err)
	}
	// Inserting again is idempotent.
	if _, err := cs.(hsm.FullSession).InsertMasked(ctx, blob); err != nil {
		t.Errorf("second insert: %v", err)
	}

	other := newCluster(t, 2)
	os2 := login(t, other, alice)
	_, err = os2.InsertMasked(ctx, blob)
	if !errors.Is(err, hsm.ErrIntegrity) || !strings.Contains(err.Error(), "lineage") {
		t.Fatalf("insert into a cluster of another lineage: %v", err)
	}
}

func TestBackupTamperingDetected(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 1)
	genAES(t, login(t, c, alice), "k", nil)
	out := filepath.Join(t.TempDir(), "b.backup")
	if _, err := c.Backup(ctx, out); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(out)
	// Change the region in the clear header: the body no longer opens.
	bad := bytes.Replace(raw, []byte(`"region":"us-east-1"`), []byte(`"region":"us-east-2"`), 1)
	os.WriteFile(out, bad, 0o600)
	_, err := Restore(ctx, RestoreOptions{Backup: out, Dir: filepath.Join(t.TempDir(), "x"), KDFIterations: testKDF})
	if !errors.Is(err, hsm.ErrIntegrity) {
		t.Fatalf("restore of altered backup: %v", err)
	}
	for _, b := range [][]byte{nil, []byte(backupMagic), append([]byte(backupMagic), 0xff, 0xff, 0xff, 0xff)} {
		if _, _, _, err := decodeBackup(b); err == nil {
			t.Errorf("decodeBackup(%q) accepted", b)
		}
	}
}

func FuzzDecodeBackup(f *testing.F) {
	f.Add([]byte(backupMagic + "\x00\x00\x00\x02{}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		decodeBackup(b) // must not panic
	})
}
