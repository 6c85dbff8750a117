package pgstore_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keymig/keymig/journal"

	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
)

// TestRoundTrip rotates a table in place and checks every row inside the
// HSMs: the same data keys, all under the new master; a second run
// changes nothing.
func TestRoundTrip(t *testing.T) {
	f := newFixture(t, rows)
	before := f.verify(t)
	if before.UnderOld != rows || before.Bad != 0 {
		t.Fatalf("before: %+v", before)
	}
	rep, err := f.rotate(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Rotated != rows || rep.Already != 0 || rep.Rejected != 0 || !rep.Finished {
		t.Fatalf("report: %+v", rep)
	}
	after := f.verify(t)
	if after.UnderNew != rows || !after.OK() {
		t.Fatalf("after: %+v", after)
	}
	if after.Fingerprint != before.Fingerprint {
		t.Fatalf("the data keys changed: fingerprint %s before, %s after", before.Fingerprint, after.Fingerprint)
	}
	t.Logf("%d rows in %s (%.0f rows/s)", rep.Records, rep.Elapsed, rep.Rate())
	again, err := f.rotate(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if again.Records != 0 {
		t.Fatalf("a second run rotated %d rows", again.Records)
	}
}

// TestApplicationKeepsWriting: while the rotation runs, an application
// inserts rows under the old master behind the rotation's cursor and
// rewrites rows the rotation has just read (before it writes them back).
// The writes happen at each page read, so the race is the same every
// run. No row is lost, rotated twice or overwritten with an older value:
// every row ends under the new master, the rewritten ones holding the
// application's data key.
func TestApplicationKeepsWriting(t *testing.T) {
	const n = 2000
	f := newFixture(t, n)
	ctx := context.Background()
	fresh := f.newTable(t, "app.fresh", 100) // data keys the application writes
	conn := f.db.Conn(t, f.dbName)
	var inserted, rewritten []string
	app := func(page []rotate.TableRow) {
		if len(page) == 0 || len(inserted) >= 50 {
			return
		}
		i := len(inserted)
		key := fmt.Sprintf("aa-app-%03d", i) // sorts before every dk- key: behind the cursor
		if _, err := conn.Exec(ctx, `INSERT INTO app.data_keys SELECT $2, master_label, master_kcv, alg, wrapped_key FROM app.fresh WHERE id = $1`, fresh[i], key); err != nil {
			t.Fatal(err)
		}
		inserted = append(inserted, key)
		if _, err := conn.Exec(ctx, `UPDATE app.data_keys d SET wrapped_key = f.wrapped_key FROM app.fresh f WHERE f.id = $1 AND d.id = $2`, fresh[50+i], page[0].Key); err != nil {
			t.Fatal(err)
		}
		rewritten = append(rewritten, page[0].Key)
	}
	rep, err := f.rotate(t, func(c *rotate.TableConfig) {
		c.Batch = 100
		c.Table = appTable{Table: f.store, app: app}
	})
	if err != nil {
		t.Fatal(err)
	}
	total := n + len(inserted)
	after := f.verify(t)
	if after.Rows != int64(total) || after.UnderNew != int64(total) || !after.OK() {
		t.Fatalf("after: %+v (report %+v)", after, rep)
	}
	if want := len(inserted) + len(rewritten); rep.FinalPass != int64(want) {
		t.Fatalf("the final pass took %d rows, want the %d the application wrote behind the cursor or under the rotation", rep.FinalPass, want)
	}
	// Each rewritten row holds the application's data key: its row in
	// app.fresh, rotated the same way, has the same ciphertext (AES-KWP is
	// deterministic).
	st, err := pgstore.Open(ctx, f.url, pgstore.Options{Table: "app.fresh"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	j := filepath.Join(t.TempDir(), "fresh.journal")
	jr, err := journal.Open(j, journal.Options{Command: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer jr.Close()
	if _, err := rotate.RunTable(ctx, jr, rotate.TableConfig{Source: f.side, From: f.from, To: f.to, Table: st}); err != nil {
		t.Fatal(err)
	}
	var stale int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM unnest($1::text[], $2::text[]) AS w(row_id, fresh_id)
		JOIN app.data_keys d ON d.id = w.row_id JOIN app.fresh f ON f.id = w.fresh_id
		WHERE d.wrapped_key <> f.wrapped_key`, rewritten, fresh[50:50+len(rewritten)]).Scan(&stale); err != nil {
		t.Fatal(err)
	}
	if stale != 0 {
		t.Fatalf("%d rewritten rows do not hold the application's data key", stale)
	}
	t.Logf("report: rotated %d, final pass %d, %d inserted and %d rewritten by the application", rep.Rotated, rep.FinalPass, len(inserted), len(rewritten))
}

// appTable runs the application's writes each time the main pass reads a
// page, before handing the page to the rotation.
type appTable struct {
	rotate.Table
	app func([]rotate.TableRow)
}

func (a appTable) Page(ctx context.Context, after *string, n int, kcv string) ([]rotate.TableRow, error) {
	rows, err := a.Table.Page(ctx, after, n, kcv)
	if err == nil && kcv == "" {
		a.app(rows)
	}
	return rows, err
}

func keyOf(i int) string { return "dk-" + strings.Repeat("0", 8-len(itoa(i+1))) + itoa(i+1) }

func itoa(i int) string {
	s := ""
	for ; i > 0; i /= 10 {
		s = string(rune('0'+i%10)) + s
	}
	return s
}

// newTable fills another table of the layout with n data keys under the
// old master and returns their keys.
func (f *fixture) newTable(t *testing.T, name string, n int) []string {
	t.Helper()
	st, err := pgstore.Create(context.Background(), f.url, pgstore.Options{Table: name})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := rotate.GenerateTable(context.Background(), rotate.GenerateConfig{Cluster: f.side, Master: f.from, Count: n, IDPrefix: "fresh-"}, st); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for i := range n {
		keys = append(keys, "fresh-"+keyOf(i)[3:])
	}
	return keys
}

// TestRunAgainAfterDone: the table is live, so running a finished
// rotation again rotates what the application wrote under the old master
// since (its final pass runs again); nothing else changes.
func TestRunAgainAfterDone(t *testing.T) {
	f := newFixture(t, 50)
	if _, err := f.rotate(t, nil); err != nil {
		t.Fatal(err)
	}
	fresh := f.newTable(t, "app.fresh", 3)
	f.exec(t, `INSERT INTO app.data_keys SELECT 'zz-late-' || id, master_label, master_kcv, alg, wrapped_key FROM app.fresh`)
	rep, err := f.rotate(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Records != int64(len(fresh)) || !rep.Resumed {
		t.Fatalf("the second run rotated %d rows (resumed %v), want the %d written since", rep.Records, rep.Resumed, len(fresh))
	}
	if v := f.verify(t); v.UnderNew != 53 || !v.OK() {
		t.Fatalf("after: %+v", v)
	}
}
