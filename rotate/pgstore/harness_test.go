package pgstore_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/pgtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	os.Exit(code)
}

// fixture is one test's cluster, masters and table.
type fixture struct {
	dir      string
	side     rotate.Side
	from, to hsm.Filter
	url      string
	store    *pgstore.Store
	db       *pgtest.Server
	dbName   string
}

// newFixture makes a 2-HSM cluster with an old and a new master, and a
// data-key table app.data_keys of n rows under the old master.
func newFixture(t testing.TB, n int) *fixture {
	t.Helper()
	ctx := context.Background()
	srv := pgtest.Shared(t)
	f := &fixture{dir: t.TempDir(), db: srv}
	keymigtest.CheckAfter(t, f.dir)
	f.url = srv.NewDB(t)
	f.dbName = filepath.Base(f.url[:len(f.url)-len("?sslmode=disable")])
	if err := srv.Exec(ctx, f.dbName, "CREATE SCHEMA app"); err != nil {
		t.Fatal(err)
	}
	cdir := filepath.Join(f.dir, "hsm")
	testcluster.New(t, cdir, 2)
	c, err := cluster.Open(ctx, cdir, cluster.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var ss []rotate.Session
	for range 4 {
		s, err := c.Login(ctx, hsm.Credentials{User: testcluster.User, Password: testcluster.Password})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Logout(context.Background()) })
		ss = append(ss, s.(rotate.Session))
	}
	f.side = rotate.Side{Name: cdir, Sessions: ss}
	f.from = masterKey(t, ss[0], "tde-old")
	f.to = masterKey(t, ss[0], "tde-new")
	st, err := pgstore.Create(ctx, f.url, pgstore.Options{Table: "app.data_keys"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	f.store = st
	if n > 0 {
		if _, err := rotate.GenerateTable(ctx, rotate.GenerateConfig{Cluster: f.side, Master: f.from, Count: n}, st); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func masterKey(t testing.TB, s hsm.Session, label string) hsm.Filter {
	t.Helper()
	k, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
		Label: label, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrWrap: true, hsm.AttrUnwrap: true},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return hsm.Filter{Ref: k.Ref}
}

// exec runs sql in the fixture's database.
func (f *fixture) exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	if err := f.db.Exec(context.Background(), f.dbName, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (f *fixture) rotate(t *testing.T, opts func(*rotate.TableConfig)) (rotate.TableReport, error) {
	t.Helper()
	j, err := journal.Open(filepath.Join(f.dir, "rotate.journal"), journal.Options{Command: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	cfg := rotate.TableConfig{Source: f.side, From: f.from, To: f.to, Table: f.store}
	if opts != nil {
		opts(&cfg)
	}
	return rotate.RunTable(context.Background(), j, cfg)
}

func (f *fixture) verify(t *testing.T) rotate.TableVerifyReport {
	t.Helper()
	rep, err := rotate.VerifyTable(context.Background(), rotate.TableVerifyConfig{Source: f.side, From: f.from, To: f.to, Table: f.store})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}
