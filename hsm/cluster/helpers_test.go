package cluster

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/keymigtest"
)

const testKDF = 16

var (
	officer = hsm.Credentials{User: "admin", Password: "officer-pw"}
	alice   = hsm.Credentials{User: "alice", Password: "alice-pw1"}
	bob     = hsm.Credentials{User: "bob", Password: "bob-pw12"}
)

// newCluster makes an n-HSM cluster in a temporary directory, with crypto
// users alice and bob, and closes it at the end of the test.
func newCluster(t testing.TB, n int, mod ...func(*InitOptions)) *Cluster {
	t.Helper()
	o := InitOptions{Dir: filepath.Join(keymigtest.TempDir(t), "cluster"), HSMs: n, Officer: officer, KDFIterations: testKDF}
	for _, f := range mod {
		f(&o)
	}
	c, err := Init(context.Background(), o)
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	c.retry.downFor = 200 * time.Millisecond
	co := login(t, c, officer)
	for _, u := range []hsm.Credentials{alice, bob} {
		if err := co.CreateUser(context.Background(), u.User, hsm.RoleCryptoUser, u.Password); err != nil {
			t.Fatalf("CreateUser %s: %v", u.User, err)
		}
	}
	return c
}

func login(t testing.TB, c *Cluster, cr hsm.Credentials) hsm.FullSession {
	t.Helper()
	s, err := c.Login(context.Background(), cr)
	if err != nil {
		t.Fatalf("Login %s: %v", cr.User, err)
	}
	t.Cleanup(func() { s.Logout(context.Background()) })
	return s.(hsm.FullSession)
}

func aesSpec(label string, attrs map[hsm.Attr]bool) hsm.KeySpec {
	all := map[hsm.Attr]bool{hsm.AttrEncrypt: true, hsm.AttrDecrypt: true, hsm.AttrWrap: true, hsm.AttrUnwrap: true}
	for a, v := range attrs {
		all[a] = v
	}
	attrs = all
	return hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: label, Attrs: attrs}}
}

func genAES(t testing.TB, s hsm.Session, label string, attrs map[hsm.Attr]bool) hsm.KeyInfo {
	t.Helper()
	k, err := s.GenerateKey(context.Background(), aesSpec(label, attrs))
	if err != nil {
		t.Fatalf("GenerateKey %s: %v", label, err)
	}
	return k
}

func encrypt(ctx context.Context, s hsm.Session, k hsm.KeyRef) error {
	_, err := s.Encrypt(ctx, k, hsm.MechAESGCM, hsm.Params{}, []byte("hello"))
	return err
}

func hsmIDs(c *Cluster) []string {
	var ids []string
	for _, h := range c.Info().HSMs {
		ids = append(ids, h.ID)
	}
	return ids
}
