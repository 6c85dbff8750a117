package migrate_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
	"github.com/sourcegraph/conc/pool"
)

// BenchmarkMigrate moves KEYMIG_BENCH_KEYS (default 10,000) AES-256 keys
// between two 2-HSM embedded clusters with each transport, the journal
// fsyncing, and prints keys/s beside the bound measured in the same run:
// RSA private-key operations per second on this machine at the same
// worker count (the goal for rsa-oaep and rsa-aes is ≥ 80% of it; for
// session-kek, ≥ 10,000 keys/s).
func BenchmarkMigrate(b *testing.B) {
	n := 10000
	if v, err := strconv.Atoi(os.Getenv("KEYMIG_BENCH_KEYS")); err == nil && v > 0 {
		n = v
	}
	workers := 64
	if v, err := strconv.Atoi(os.Getenv("KEYMIG_BENCH_WORKERS")); err == nil && v > 0 {
		workers = v
	}
	ctx := context.Background()
	dir := b.TempDir()
	_, src := benchCluster(b, filepath.Join(dir, "src"))
	p := pool.New().WithErrors().WithMaxGoroutines(32)
	for i := 0; i < n; i++ {
		p.Go(func() error {
			_, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "bench", ID: hsm.Bytes(fmt.Sprintf("b%06d", i))}})
			return err
		})
	}
	if err := p.Wait(); err != nil {
		b.Fatal(err)
	}
	srcInv := benchInventory(b, "src", src)

	for _, tc := range []struct {
		transport string
		bits      int
	}{{"session-kek", 2048}, {"rsa-oaep", 2048}, {"rsa-aes", 2048}, {"rsa-aes", 3072}} {
		name := tc.transport
		if tc.transport != "session-kek" {
			name = fmt.Sprintf("%s-%d", tc.transport, tc.bits)
		}
		b.Run(name, func(b *testing.B) {
			// As keymig migrate runs (inside b.Run: the testing package
			// sets GOMAXPROCS for each benchmark).
			defer runner.ProcsForStorage()()
			for it := 0; it < b.N; it++ {
				b.StopTimer()
				dstCluster, dst := benchCluster(b, filepath.Join(b.TempDir(), "dst"))
				pl, err := plan.Build(srcInv, benchInventory(b, "dst", dst), plan.Options{Transport: tc.transport, TransportBits: tc.bits}, time.Now())
				if err != nil {
					b.Fatal(err)
				}
				j, err := journal.Open(filepath.Join(b.TempDir(), "j"), journal.Options{BatchSize: workers})
				if err != nil {
					b.Fatal(err)
				}
				r, _, _, err := j.Begin(pl.Digest, migrate.RunKind, nil)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				start := time.Now()
				rep, err := migrate.New(pl, src, dst, migrate.Options{Workers: workers}).Run(ctx, r)
				el := time.Since(start)
				b.StopTimer()
				j.Close()
				if err != nil || rep.Summary.Done != n {
					b.Fatalf("run: %v, %+v", err, rep.Summary)
				}
				rate := float64(n) / el.Seconds()
				b.ReportMetric(rate, "keys/s")
				st := dstCluster.Stats()
				b.Logf("%s: target cluster: %d throttled answers, %d retries, %d copies to a second HSM", name, st.Throttled, st.Retries, st.Clones)
				if tc.transport == "session-kek" {
					b.Logf("%s: %.0f keys/s for %d keys (goal ≥ 10000 keys/s)", name, rate, n)
				} else {
					bound := rsaBound(tc.bits, workers)
					b.ReportMetric(bound, "rsa-ops/s")
					b.Logf("%s: %.0f keys/s for %d keys; bound %.0f RSA-%d private-key ops/s at %d workers (GOMAXPROCS %d): %.0f%% (goal ≥ 80%%)",
						name, rate, n, bound, tc.bits, workers, runtime.GOMAXPROCS(0), 100*rate/bound)
				}
			}
		})
	}
}

// rsaBound measures RSA-OAEP decryptions per second with workers goroutines.
func rsaBound(bits, workers int) float64 {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return 0
	}
	opts := &rsa.OAEPOptions{Hash: crypto.SHA256}
	ct, _ := rsa.EncryptOAEPWithOptions(rand.Reader, &k.PublicKey, make([]byte, 32), opts)
	var ops atomic.Int64
	deadline := time.Now().Add(time.Second)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				k.Decrypt(rand.Reader, ct, opts)
				ops.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(ops.Load()) / time.Since(start).Seconds()
}
