package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
)

// TestRotateToOutput rotates to a new table and to new columns: the
// table's own values stay byte for byte, every output value holds the
// same data key as its original (compared inside the HSMs), a row the
// application rewrites after it was rotated is rotated again by the next
// run, and a run after that changes nothing.
func TestRotateToOutput(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts pgstore.Options
	}{
		{"out-table", pgstore.Options{OutTable: "app.data_keys_v2"}},
		{"out-column", pgstore.Options{OutColumn: "wrapped_key_v2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 300
			ctx := context.Background()
			f := newFixture(t, n)
			before := f.verify(t)
			digest := func() string {
				var d string
				f.db.Conn(t, f.dbName).QueryRow(ctx, `SELECT md5(string_agg(id || master_kcv || encode(wrapped_key, 'hex'), ',' ORDER BY id)) FROM app.data_keys`).Scan(&d)
				return d
			}
			own := digest()

			o := tc.opts
			o.Table = "app.data_keys"
			if _, err := pgstore.Open(ctx, f.url, o); !errors.Is(err, pgstore.ErrNoOutput) {
				t.Fatalf("open without Prepare: %v, want ErrNoOutput", err)
			}
			o.Prepare = true
			out, err := pgstore.Open(ctx, f.url, o)
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			rep, err := f.rotate(t, func(c *rotate.TableConfig) { c.Table = out; c.Batch = 64 })
			if err != nil {
				t.Fatal(err)
			}
			if rep.Rotated != n || !rep.Finished {
				t.Fatalf("report: %+v", rep)
			}
			if got := digest(); got != own {
				t.Fatal("the table's own values changed")
			}
			check := func(wantCompared int64) {
				t.Helper()
				v, err := rotate.VerifyTable(ctx, rotate.TableVerifyConfig{Source: f.side, From: f.from, To: f.to, Table: out, Originals: out.Originals()})
				if err != nil {
					t.Fatal(err)
				}
				if !v.OK() || v.Compared != wantCompared || v.Fingerprint != before.Fingerprint {
					t.Fatalf("verify: %+v (fingerprint before %s)", v, before.Fingerprint)
				}
			}
			check(n)
			if orig := f.verifyTable(t, out.Originals()); orig.UnderOld != n || orig.Fingerprint != before.Fingerprint {
				t.Fatalf("originals: %+v", orig)
			}

			// The application gives one row another data key after it was
			// rotated: its output value no longer counts.
			fresh := f.newTable(t, "app.fresh", 1)
			f.exec(t, `UPDATE app.data_keys d SET wrapped_key = x.wrapped_key FROM app.fresh x WHERE x.id = $1 AND d.id = $2`, fresh[0], keyOf(7))
			if v := f.verifyTable(t, out); v.UnderOld != 1 {
				t.Fatalf("after the application's write: %+v, want the row under the old master", v)
			}
			again, err := f.rotate(t, func(c *rotate.TableConfig) { c.Table = out; c.Batch = 64 })
			if err != nil {
				t.Fatal(err)
			}
			if again.Records != 1 || again.FinalPass != 1 {
				t.Fatalf("the second run: %+v, want the rewritten row rotated by the final pass", again)
			}
			v, err := rotate.VerifyTable(ctx, rotate.TableVerifyConfig{Source: f.side, From: f.from, To: f.to, Table: out, Originals: out.Originals()})
			if err != nil || !v.OK() || v.Compared != n {
				t.Fatalf("verify after the second run: %+v, %v", v, err)
			}
			last, err := f.rotate(t, func(c *rotate.TableConfig) { c.Table = out; c.Batch = 64 })
			if err != nil || last.Records != 0 {
				t.Fatalf("a third run rotated %d rows (%v)", last.Records, err)
			}
		})
	}
}

// TestOutputRefused: an output that is the table itself, one of its own
// columns, or a table of another layout is refused before anything is
// written.
func TestOutputRefused(t *testing.T) {
	f := newFixture(t, 10)
	f.exec(t, `CREATE TABLE app.other (id text PRIMARY KEY, wrapped_key bytea)`)
	for _, tc := range []struct {
		opts pgstore.Options
		want string
	}{
		{pgstore.Options{OutTable: "app.data_keys"}, "is the table itself"},
		{pgstore.Options{OutColumn: "wrapped_key"}, "one of the table's data-key columns"},
		{pgstore.Options{OutTable: "app.other"}, "has no column"},
		{pgstore.Options{OutTable: "app.x", OutColumn: "y"}, "give one"},
	} {
		o := tc.opts
		o.Table, o.Prepare = "app.data_keys", true
		_, err := pgstore.Open(context.Background(), f.url, o)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.opts, err, tc.want)
		}
	}
}

func (f *fixture) verifyTable(t *testing.T, tb rotate.Table) rotate.TableVerifyReport {
	t.Helper()
	rep, err := rotate.VerifyTable(context.Background(), rotate.TableVerifyConfig{Source: f.side, From: f.from, To: f.to, Table: tb})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}
