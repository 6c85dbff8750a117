package pgstore_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/rotate"
)

// BenchmarkRotateTable rotates 1,000,000 rows (KEYMIG_BENCH_ROWS
// overrides) of a PostgreSQL table in place within one embedded 2-HSM
// cluster and reports rows/s and peak RSS beside, in the same run, the
// JSONL rotation of the same data keys and a bare UPDATE ... FROM of every
// row with precomputed values (the database's own bound). The table holds
// 10,000 distinct data keys made by the HSM, each copied with its own id:
// every row costs the HSMs what a distinct one would. Goals: >= 30,000
// rows/s, >= 50% of the JSONL rate, peak RSS <= 200 MB.
func BenchmarkRotateTable(b *testing.B) {
	rows := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("KEYMIG_BENCH_ROWS")); err == nil && v > 0 {
		rows = v
	}
	distinct := min(rows, 10_000)
	ctx := context.Background()
	f := newFixture(b, distinct)
	copies := rows / distinct
	rows = distinct * copies
	f.exec(b, fmt.Sprintf(`INSERT INTO app.data_keys SELECT id || '-' || lpad(c::text, 4, '0'), master_label, master_kcv, alg, wrapped_key
		FROM app.data_keys, generate_series(1, %d) AS c`, copies-1))
	// The same rows as a JSONL file, for the file rotation.
	in := filepath.Join(f.dir, "datakeys.jsonl")
	f.exportJSONL(b, in)
	// The database's bound: every row rewritten from a precomputed table.
	f.exec(b, `CREATE TABLE app.pre AS SELECT id, wrapped_key FROM app.data_keys; ALTER TABLE app.pre ADD PRIMARY KEY (id); ANALYZE app.pre`)
	start := time.Now()
	f.exec(b, `UPDATE app.data_keys d SET wrapped_key = p.wrapped_key, master_label = master_label FROM app.pre p WHERE d.id = p.id`)
	bound := float64(rows) / time.Since(start).Seconds()
	f.exec(b, `VACUUM app.data_keys`)

	b.ResetTimer()
	j, err := journal.Open(filepath.Join(f.dir, "table.journal"), journal.Options{Command: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	rep, err := rotate.RunTable(ctx, j, rotate.TableConfig{Source: f.side, From: f.from, To: f.to, Table: f.store, Workers: 64, Batch: benchBatch()})
	j.Close()
	if err != nil {
		b.Fatal(err)
	}
	if rep.Rotated != int64(rows) {
		b.Fatalf("rotated %d of %d rows", rep.Rotated, rows)
	}
	b.StopTimer()
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	rss := float64(ru.Maxrss) / 1024

	fj, err := journal.Open(filepath.Join(f.dir, "file.journal"), journal.Options{Command: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	frep, err := rotate.Run(ctx, fj, rotate.Config{Source: f.side, From: f.from, To: f.to, In: in, Out: in + ".rotated", Workers: 64})
	fj.Close()
	if err != nil {
		b.Fatal(err)
	}
	rate, fileRate := rep.Rate(), frep.Rate()
	b.ReportMetric(rate, "rows/s")
	b.ReportMetric(fileRate, "jsonl-records/s")
	b.ReportMetric(bound, "bare-update-rows/s")
	b.ReportMetric(rss, "peak-RSS-MB")
	verdict := func(ok bool) string {
		if ok {
			return "meets"
		}
		return "MISSES"
	}
	fmt.Printf("BenchmarkRotateTable: %d rows in place in a 2-HSM cluster: %.0f rows/s (%s the goal of >= 30000; %.0f%% of the JSONL rotation's %.0f records/s, %s the goal of >= 50%%), peak RSS %.0f MB (%s the goal of <= 200 MB); bound: a bare UPDATE ... FROM rewrites %.0f rows/s\n",
		rows, rate, verdict(rate >= 30000), 100*rate/fileRate, fileRate, verdict(rate >= fileRate/2), rss, verdict(rss <= 200), bound)
}

// exportJSONL writes the table as a data-key file in key order.
func (f *fixture) exportJSONL(b *testing.B, path string) {
	out, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	w := bufio.NewWriterSize(out, 1<<20)
	var after *string
	for {
		rows, err := f.store.Page(context.Background(), after, 10000, "")
		if err != nil {
			b.Fatal(err)
		}
		if len(rows) == 0 {
			break
		}
		for _, r := range rows {
			line, _ := json.Marshal(struct {
				ID         string        `json:"id"`
				Master     rotate.Master `json:"master"`
				Alg        string        `json:"alg"`
				Ciphertext []byte        `json:"ciphertext"`
			}{r.Key, r.Master, r.Alg, r.Ciphertext})
			w.Write(append(line, '\n'))
		}
		k := rows[len(rows)-1].Key
		after = &k
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
}

// benchBatch is the page size (KEYMIG_BENCH_BATCH overrides the default).
func benchBatch() int {
	n, _ := strconv.Atoi(os.Getenv("KEYMIG_BENCH_BATCH"))
	return n
}
