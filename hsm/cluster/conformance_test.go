package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/hsmtest"
)

// TestConformance runs the hsm contract's suite against clusters of 1, 2
// and 3 HSMs.
func TestConformance(t *testing.T) {
	for _, n := range []int{1, 2, 3} {
		t.Run(fmt.Sprintf("%dHSM", n), func(t *testing.T) {
			hsmtest.Run(t, hsmtest.Harness{
				New: func(t *testing.T) (hsm.Backend, hsm.Credentials) {
					c, err := Init(context.Background(), InitOptions{Dir: filepath.Join(t.TempDir(), "c"), HSMs: n, Officer: officer, KDFIterations: testKDF, KeyCapacity: 250})
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { c.Close() })
					return c, officer
				},
				NewClone: func(t *testing.T, b hsm.Backend) (hsm.Backend, hsm.Credentials) {
					return newEmptyClone(t, b.(*Cluster), n), officer
				},
				Capacity: 250,
				FIPS:     true,
			})
		})
	}
}

// TestCoreConformance runs the core suite (what a PKCS#11 token is held
// to as well) against a 2-HSM cluster, as a crypto user.
func TestCoreConformance(t *testing.T) {
	hsmtest.RunCore(t, hsmtest.CoreHarness{New: func(t *testing.T) (hsm.Backend, hsm.Credentials) {
		c, err := Init(context.Background(), InitOptions{Dir: filepath.Join(t.TempDir(), "c"), HSMs: 2, Officer: officer, KDFIterations: testKDF})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		co, err := c.Login(context.Background(), officer)
		if err != nil {
			t.Fatal(err)
		}
		defer co.Logout(context.Background())
		user := hsm.Credentials{User: "core", Password: "core-pass-1"}
		if err := co.(hsm.Users).CreateUser(context.Background(), user.User, hsm.RoleCryptoUser, user.Password); err != nil {
			t.Fatal(err)
		}
		return c, user
	}})
}

// newEmptyClone makes a cluster of c's lineage with only a crypto officer.
func newEmptyClone(t *testing.T, c *Cluster, n int) *Cluster {
	t.Helper()
	src := c.Info()
	cfg := config{Format: 1, ID: "cluster-" + randomID(), Region: "eu-west-1", Lineage: src.Lineage, Created: src.Created, Policy: src.Policy}
	for i := range n {
		cfg.HSMs = append(cfg.HSMs, hsmConfig{ID: "hsm-" + randomID(), AZ: fmt.Sprintf("eu-west-1%c", 'a'+i)})
	}
	clone, err := create(context.Background(), filepath.Join(t.TempDir(), "clone"), cfg, c.secret, nil, func(ctx context.Context, m Member) error {
		return m.Bootstrap(ctx, officer)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { clone.Close() })
	return clone
}
