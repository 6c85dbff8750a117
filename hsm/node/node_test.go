package node_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/hsmtest"
	"github.com/keymig/keymig/hsm/node"
)

// testKDF keeps logins cheap in tests.
const testKDF = 1000

var officer = hsm.Credentials{User: "admin", Password: "officer-password"}

var hsmSeq atomic.Int64

// newNode creates and bootstraps a node in a temporary directory.
func newNode(tb testing.TB, o node.Options) *node.Node {
	tb.Helper()
	if o.ID == "" {
		o.ID = fmt.Sprintf("hsm-%06d", hsmSeq.Add(1))
	}
	if o.Lineage == "" {
		o.Lineage = "lineage-" + o.ID
	}
	if o.LineageSecret == nil {
		o.LineageSecret = make([]byte, 32)
		rand.Read(o.LineageSecret)
	}
	if o.KDFIterations == 0 {
		o.KDFIterations = testKDF
	}
	path := filepath.Join(tb.TempDir(), o.ID+".db")
	n, err := node.Create(path, o)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { n.Close() })
	if err := n.Bootstrap(context.Background(), officer); err != nil {
		tb.Fatal(err)
	}
	return n
}

func TestConformance(t *testing.T) {
	var secrets sync.Map // *node.Node → node.Options
	hsmtest.Run(t, hsmtest.Harness{
		New: func(t *testing.T) (hsm.Backend, hsm.Credentials) {
			o := node.Options{FIPS: true, KeyCapacity: 250, AZ: "eu-west-1a"}
			o.LineageSecret = make([]byte, 32)
			rand.Read(o.LineageSecret)
			o.ID = fmt.Sprintf("hsm-%06d", hsmSeq.Add(1))
			o.Lineage = "lineage-" + o.ID
			n := newNode(t, o)
			secrets.Store(n, o)
			return n, officer
		},
		NewClone: func(t *testing.T, b hsm.Backend) (hsm.Backend, hsm.Credentials) {
			v, ok := secrets.Load(b)
			if !ok {
				t.Fatal("not a node made by this harness")
			}
			o := v.(node.Options)
			o.ID = ""
			return newNode(t, o), officer
		},
		Capacity: 250,
		FIPS:     true,
	})
}
