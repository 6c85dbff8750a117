package pgstore_test

import (
	"context"
	"strings"
	"sync"
	"testing"

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

// TestApplicationKeepsWriting: an application inserts rows under the old
// master and rewrites existing ones while the rotation runs. No row is
// lost, rotated twice or overwritten with an older value.
func TestApplicationKeepsWriting(t *testing.T) {
	const n = 2000
	f := newFixture(t, n)
	ctx := context.Background()
	// Fresh data keys the "application" writes: made under the old master.
	extra := f.newTable(t, "app.fresh", 400)
	conn := f.db.Conn(t, f.dbName)
	var wg sync.WaitGroup
	pages := make(chan int, 64)
	wg.Go(func() {
		i := 0
		for range pages {
			// Each page the rotation reads, the application inserts a
			// row and replaces one that may not have been rotated yet.
			for range 4 {
				if i >= 200 {
					continue
				}
				_, err := conn.Exec(ctx, `INSERT INTO app.data_keys SELECT 'zz-app-'||id, master_label, master_kcv, alg, wrapped_key FROM app.fresh WHERE id = $1`, extra[i])
				if err != nil {
					t.Error(err)
				}
				_, err = conn.Exec(ctx, `UPDATE app.data_keys d SET wrapped_key = f.wrapped_key FROM app.fresh f
					WHERE f.id = $1 AND d.id = $2 AND d.master_kcv = f.master_kcv`, extra[200+i], keyOf(n-1-i))
				if err != nil {
					t.Error(err)
				}
				i++
			}
		}
	})
	rep, err := f.rotate(t, func(c *rotate.TableConfig) {
		c.Batch = 100
		c.Table = pagedTable{Table: f.store, pages: pages}
	})
	close(pages)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	after := f.verify(t)
	if after.Rows != n+200 || after.UnderNew != n+200 || !after.OK() {
		t.Fatalf("after: %+v (report %+v)", after, rep)
	}
	// The replaced rows hold the application's data key, not the old one.
	var same int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM app.data_keys d JOIN app.fresh f ON d.wrapped_key = f.wrapped_key`).Scan(&same); err != nil {
		t.Fatal(err)
	}
	if same != 0 {
		t.Fatalf("%d rows still hold a ciphertext under the old master", same)
	}
	t.Logf("report: rotated %d, already %d, final pass %d", rep.Rotated, rep.Already, rep.FinalPass)
	if rep.FinalPass == 0 {
		t.Fatal("the final pass found nothing: the writer did not race the rotation")
	}
}

// pagedTable tells a channel each time a page is read.
type pagedTable struct {
	rotate.Table
	pages chan<- int
}

func (p pagedTable) Page(ctx context.Context, after *string, n int, kcv string) ([]rotate.TableRow, error) {
	rows, err := p.Table.Page(ctx, after, n, kcv)
	if kcv == "" {
		p.pages <- len(rows)
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
