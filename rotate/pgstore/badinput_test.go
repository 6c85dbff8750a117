package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
)

// TestBadRows: each bad row is named by its primary key; under stop the
// run stops and writes nothing of its page, under skip it is set aside
// and every other row is rotated.
func TestBadRows(t *testing.T) {
	cases := []struct {
		name, sql, want string
	}{
		{"null ciphertext", `ALTER TABLE app.data_keys ALTER COLUMN wrapped_key DROP NOT NULL;
			UPDATE app.data_keys SET wrapped_key = NULL WHERE id = 'dk-00000007'`, "the column wrapped_key is NULL"},
		{"null kcv", `ALTER TABLE app.data_keys ALTER COLUMN master_kcv DROP NOT NULL;
			UPDATE app.data_keys SET master_kcv = NULL WHERE id = 'dk-00000007'`, "the column master_kcv is NULL"},
		{"unknown alg", `UPDATE app.data_keys SET alg = 'des3' WHERE id = 'dk-00000007'`, `unknown alg "des3"`},
		{"another master", `UPDATE app.data_keys SET master_kcv = 'abcdef' WHERE id = 'dk-00000007'`, "names neither the old master"},
		{"does not unwrap", `UPDATE app.data_keys SET wrapped_key = set_byte(wrapped_key, 3, get_byte(wrapped_key, 3) # 1) WHERE id = 'dk-00000007'`, "unwrap"},
		{"truncated", `UPDATE app.data_keys SET wrapped_key = substring(wrapped_key from 1 for 5) WHERE id = 'dk-00000007'`, "dk-00000007"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, 40)
			f.exec(t, c.sql)
			_, err := f.rotate(t, func(cfg *rotate.TableConfig) { cfg.Batch = 16 })
			var re *rotate.RowError
			if !errors.As(err, &re) || re.Key != "dk-00000007" || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("stop: got %v, want a row error on dk-00000007 saying %q", err, c.want)
			}
			// Nothing of the bad row's page is written (the page after
			// it, in flight meanwhile, may be).
			var page []string
			for i := range 16 {
				page = append(page, keyOf(i))
			}
			got, err := f.store.Get(context.Background(), page)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range got {
				if r.Master.Label == "tde-new" {
					t.Fatalf("stop: row %s of the bad row's page was written", r.Key)
				}
			}
			rep, err := f.rotate(t, func(cfg *rotate.TableConfig) { cfg.Batch = 16; cfg.OnError = rotate.Skip })
			if err != nil {
				t.Fatal(err)
			}
			if rep.Rotated != 39 || rep.Rejected != 1 || rep.Rejects[0].Key != "dk-00000007" {
				t.Fatalf("skip: %+v", rep)
			}
			if v := f.verify(t); v.UnderNew != 39 || v.Bad+v.UnderOld != 1 {
				t.Fatalf("skip: after %+v", v)
			}
		})
	}
}

// TestRefusedTables: a table rotate cannot work on is refused before
// anything is read, with the reason.
func TestRefusedTables(t *testing.T) {
	f := newFixture(t, 0)
	ctx := context.Background()
	f.exec(t, `CREATE TABLE app.nopk (id text, master_label text, master_kcv text, alg text, wrapped_key bytea)`)
	f.exec(t, `CREATE TABLE app.twopk (id text, n int, master_label text, master_kcv text, alg text, wrapped_key bytea, PRIMARY KEY (id, n))`)
	f.exec(t, `CREATE TABLE app.textkey (id text PRIMARY KEY, master_label text, master_kcv text, alg text, wrapped_key text)`)
	f.exec(t, `CREATE TABLE app.nocol (id text PRIMARY KEY, master_kcv text, alg text, wrapped_key bytea)`)
	for _, c := range []struct{ table, want string }{
		{"app.nopk", "has no primary key"},
		{"app.twopk", "its primary key is (id, n)"},
		{"app.textkey", "is text, not bytea"},
		{"app.nocol", "has no column master_label (--master-label-column)"},
		{"app.missing", "no such table"},
		{`app.x"; DROP TABLE app.data_keys; --`, "no such table"},
	} {
		_, err := pgstore.Open(ctx, f.url, pgstore.Options{Table: c.table})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.table, err, c.want)
		}
	}
	if _, err := pgstore.Open(ctx, f.url, pgstore.Options{Table: "app.data_keys"}); err != nil {
		t.Fatalf("the table survived? %v", err)
	}
}

// TestFilter: --filter restricts the rows, as a query parameter.
func TestFilter(t *testing.T) {
	f := newFixture(t, 30)
	f.exec(t, `ALTER TABLE app.data_keys ADD COLUMN tenant text`)
	f.exec(t, `UPDATE app.data_keys SET tenant = CASE WHEN id <= 'dk-00000010' THEN 'acme' ELSE 'other''; --' END`)
	st, err := pgstore.Open(context.Background(), f.url, pgstore.Options{Table: "app.data_keys",
		Filters: []pgstore.Filter{{Column: "tenant", Value: "acme"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rep, err := f.rotate(t, func(c *rotate.TableConfig) { c.Table = st })
	if err != nil {
		t.Fatal(err)
	}
	if rep.Rotated != 10 {
		t.Fatalf("rotated %d rows, want the 10 of tenant acme", rep.Rotated)
	}
	if v := f.verify(t); v.UnderNew != 10 || v.UnderOld != 20 {
		t.Fatalf("after: %+v", v)
	}
}

// TestLostConnection: the database drops every connection of the store
// between pages; the statements are retried on new connections and the
// rotation finishes with every row under the new master.
func TestLostConnection(t *testing.T) {
	f := newFixture(t, 500)
	admin := f.db.Conn(t, f.dbName)
	var (
		drops atomic.Int64
		mu    sync.Mutex // two pages may be written at once; admin is one connection
	)
	rep, err := f.rotate(t, func(c *rotate.TableConfig) {
		c.Batch = 50
		c.Table = swapHook{Table: f.store, before: func() {
			mu.Lock()
			defer mu.Unlock()
			if drops.Add(1)%3 != 0 {
				return
			}
			var n int
			if err := admin.QueryRow(context.Background(), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE datname = current_database() AND pid <> pg_backend_pid()`).Scan(&n); err != nil || n == 0 {
				t.Errorf("terminating the store's connections: %d, %v", n, err)
			}
		}}
	})
	if err != nil {
		t.Fatal(err)
	}
	if v := f.verify(t); v.UnderNew != 500 || !v.OK() {
		t.Fatalf("after %d dropped connections: %+v (report %+v)", drops.Load()/3, v, rep)
	}
}

// swapHook calls before ahead of every Swap.
type swapHook struct {
	rotate.Table
	before func()
}

func (h swapHook) Swap(ctx context.Context, from string, to rotate.Master, swaps []rotate.Swap) ([]string, error) {
	h.before()
	return h.Table.Swap(ctx, from, to, swaps)
}
