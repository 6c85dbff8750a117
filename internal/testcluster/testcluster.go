// Package testcluster makes the included clusters tests start from: a
// cluster with a crypto user and cheap password hashing, a clone pair,
// keys. It is for tests only.
package testcluster

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/sourcegraph/conc/pool"
)

// The users of the clusters NewCluster makes.
const (
	OfficerPIN = "admin:test-admin-pass"
	User       = "alice"
	Password   = "test-alice-pass"
	PIN        = User + ":" + Password
)

// New makes an n-HSM cluster in dir with the crypto user alice,
// cheap password hashing and room for 20,000 keys.
func New(t testing.TB, dir string, hsms int) {
	t.Helper()
	ctx := context.Background()
	officer, _ := hsm.ParsePIN(OfficerPIN)
	c, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, HSMs: hsms, Officer: officer, KDFIterations: 1000, KeyCapacity: 20000})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Logout(ctx)
	if err := s.(hsm.Users).CreateUser(ctx, User, hsm.RoleCryptoUser, Password); err != nil {
		t.Fatal(err)
	}
}

// ClonePair makes a 2-HSM cluster in dir/src (New) and a 2-HSM
// clone of it in dir/dst, as backup and restore.
func ClonePair(t testing.TB, dir string) (src, dst string) {
	t.Helper()
	ctx := context.Background()
	src, dst = filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	New(t, src, 2)
	c, err := cluster.Open(ctx, src, cluster.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(dir, "src.backup")
	_, err = c.Backup(ctx, backup)
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	clone, err := cluster.Restore(ctx, cluster.RestoreOptions{Backup: backup, Dir: dst, Region: "eu-west-1", HSMs: 2})
	if err != nil {
		t.Fatal(err)
	}
	clone.Close()
	return src, dst
}

// WithUser opens the cluster at dir and runs fn logged in as alice.
func WithUser(t testing.TB, dir string, fn func(s hsm.Session)) {
	t.Helper()
	ctx := context.Background()
	c, err := cluster.Open(ctx, dir, cluster.OpenOptions{LockTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Login(ctx, hsm.Credentials{User: User, Password: Password})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Logout(ctx)
	fn(s)
}

// GenerateAES makes n AES-256 keys labelled prefix with ids prefix%05d on
// the cluster at dir, as alice, and returns id → KCV.
func GenerateAES(t testing.TB, dir, prefix string, n int, attrs map[hsm.Attr]bool) map[string]hsm.Bytes {
	t.Helper()
	want := map[string]hsm.Bytes{}
	WithUser(t, dir, func(s hsm.Session) {
		p := pool.NewWithResults[hsm.KeyInfo]().WithErrors().WithMaxGoroutines(8)
		for i := range n {
			p.Go(func() (hsm.KeyInfo, error) {
				return s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
					Label: prefix, ID: hsm.Bytes(fmt.Sprintf("%s%05d", prefix, i)), Attrs: attrs,
				}})
			})
		}
		infos, err := p.Wait()
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range infos {
			want[k.ID.String()] = k.KCV
		}
	})
	return want
}
